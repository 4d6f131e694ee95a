"""The live map: WatchMap over gRPC, its feed on the edge, and the page in headless Chromium.

The page test loads /rides/map in Debian's Chromium (scripts/chromium.py)
driven by Playwright, with a real driver streaming pings: it sees the
driver's dot, then sees it move.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from sysdesign.rides.v1 import rides_pb2 as pb
from sysdesign.rides.v1 import rides_pb2_grpc as pbg

from clients import chromium
from tests.integration.helpers import violations
from tests.integration.test_rides import RIDES_ENV, Driver, area, new_users
from tests.stack import StackProcess

pytestmark = [pytest.mark.redis_cluster]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("ridesmap") / "data", extra_env=RIDES_ENV).start()
    yield s
    assert s.stop() == 0, s.logs()


def _box(lat: float, lng: float) -> dict[str, float]:
    return {"south": lat - 0.02, "west": lng - 0.02, "north": lat + 0.02, "east": lng + 0.02}


def test_watch_map_shows_drivers_and_open_rides_anonymised(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            driver_u, rider_u, viewer_u = await new_users(ch, 3)
            d = await Driver(ch, driver_u, lat + 0.001, lng).start()   # never answers: the offer stays open
            await asyncio.sleep(0.3)
            rider = pbg.RiderServiceStub(ch)
            pickup = pb.LatLng(lat=lat + 0.00123, lng=lng - 0.00456)
            q = await rider.GetQuote(pb.GetQuoteRequest(pickup=pickup, dropoff=pb.LatLng(lat=lat + 0.01, lng=lng)),
                                     metadata=rider_u.md)
            ride = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=rider_u.md)).ride
            await d.next_offer()
            b = _box(lat, lng)
            stub = pbg.MapServiceStub(ch)
            req = pb.WatchMapRequest(south_west=pb.LatLng(lat=b["south"], lng=b["west"]),
                                     north_east=pb.LatLng(lat=b["north"], lng=b["east"]),
                                     interval=Duration(nanos=300_000_000))
            frames = []
            async with asyncio.timeout(20):
                async for f in stub.WatchMap(req, metadata=viewer_u.md):
                    frames.append(f)
                    if len(frames) == 2:
                        break
            f = frames[-1]
            [md] = list(f.drivers)
            assert md.driver_key and md.driver_key != driver_u.user_id and driver_u.user_id not in md.driver_key
            assert md.state == pb.DRIVER_STATE_OFFERED
            assert abs(md.position.lat - (lat + 0.001)) < 1e-5
            [mr] = [r for r in f.rides if r.ride_id == ride.ride_id]
            assert mr.state == pb.RIDE_STATE_OFFERED
            assert (mr.pickup.lat, mr.pickup.lng) == (round(lat + 0.00123, 3), round(lng - 0.00456, 3))
            # A box too large, or upside down, names the field.
            for sw, ne in (((lat, lng), (lat + 2, lng + 2)), ((lat, lng), (lat - 0.01, lng + 0.01))):
                bad = pb.WatchMapRequest(south_west=pb.LatLng(lat=sw[0], lng=sw[1]),
                                         north_east=pb.LatLng(lat=ne[0], lng=ne[1]))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.WatchMap(bad, metadata=viewer_u.md):
                        pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "north_east" in violations(e.value)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.WatchMap(req):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await rider.CancelRide(pb.CancelRideRequest(ride_id=ride.ride_id), metadata=rider_u.md)
            await d.stop()

    asyncio.run(go())


def test_the_feed_needs_a_token_and_a_sane_box(stack: StackProcess) -> None:
    base = f"{stack.http_base}/rides/map/frames?south=10&west=10&north=10.1&east=10.1"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(base, timeout=10)
    assert e.value.code == 401
    token = stack.token("mapviewer")
    bad = urllib.request.Request(f"{stack.http_base}/rides/map/frames?south=10&west=10&north=12&east=12",
                                 headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=10)
    assert e.value.code == 400
    page = urllib.request.urlopen(f"{stack.http_base}/rides/map", timeout=10)
    html = page.read().decode()
    assert "<canvas" in html and "http://" not in html and "https://" not in html  # nothing fetched from elsewhere


def test_the_page_draws_a_driver_and_sees_it_move(stack: StackProcess) -> None:
    path = chromium.browser()
    if path is None:
        why = chromium.unavailable() or "Chromium is not installed (make browser)"
        assert os.environ.get("CI") != "true", why
        pytest.skip(why)
    from playwright.async_api import async_playwright

    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            driver_u, viewer_u = await new_users(ch, 2)
            d = await Driver(ch, driver_u, lat, lng).start()
            b = _box(lat, lng)
            url = (f"{stack.http_base}/rides/map?south={b['south']}&west={b['west']}&north={b['north']}"
                   f"&east={b['east']}&interval=0.25#token={viewer_u.token}")
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=path, args=chromium.LAUNCH_ARGS)
                try:
                    # The page's CSP forbids eval; Playwright's probes use it, the page does not.
                    ctx = await browser.new_context(bypass_csp=True)
                    page = await ctx.new_page()
                    await page.goto(url)
                    await page.wait_for_function("Object.keys(window.mapState.drivers).length === 1",
                                                 timeout=20_000)
                    first = await page.evaluate("Object.values(window.mapState.drivers)[0]")
                    assert abs(first["lat"] - lat) < 1e-5
                    for i in range(1, 4):   # 11 m a second: a car in town
                        await asyncio.sleep(1.0)
                        await d.move(lat + 0.0001 * i, lng)
                    await page.wait_for_function(
                        f"Object.values(window.mapState.drivers)[0].lat > {lat + 0.00025}", timeout=20_000)
                    status = await page.text_content("#status")
                    assert status is not None and status.startswith("1 drivers")
                    # The canvas has something on it: the dot's colour is among its pixels.
                    painted = await page.evaluate("""() => {
                        const c = document.getElementById('map');
                        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                        for (let i = 0; i < px.length; i += 4)
                          if (px[i] === 0x1a && px[i + 1] === 0x98 && px[i + 2] === 0x50) return true;
                        return false; }""")
                    assert painted
                    # Without a token the page asks for one instead of showing anything.
                    bare = await ctx.new_page()
                    await bare.goto(url.split("#")[0])
                    assert await bare.is_visible("#login")
                finally:
                    await browser.close()
            await d.stop()

    asyncio.run(go())
