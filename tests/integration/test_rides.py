"""Ride matching against a real stack: quotes, dispatch, the offer handshake, trips,
cancellation, surge, bad pings, who sees what, and dispatch under contention.

Drivers are real gRPC clients streaming pings; each test works in its own
patch of the map (a different H3 neighbourhood) so tests sharing the stack
do not see each other's drivers. Offers last two seconds here.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.rides.v1 import rides_pb2 as pb
from sysdesign.rides.v1 import rides_pb2_grpc as pbg

from tests.integration.helpers import error_reason, violations
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

OFFER_S = 2.0
RIDES_ENV = {
    "SYSDESIGN_RIDES_OFFER_SECONDS": str(OFFER_S),
    "SYSDESIGN_RIDES_NO_DRIVER_WAIT_SECONDS": "3",
    "SYSDESIGN_RIDES_MAX_OFFERS": "3",
    "SYSDESIGN_RIDES_SURGE_EVERY_SECONDS": "0.3",
    "SYSDESIGN_RIDES_CANCEL_GRACE_SECONDS": "1",
    "SYSDESIGN_RIDES_DISPATCH_CLAIM_MS": "3000",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("rides") / "data", extra_env=RIDES_ENV).start()
    yield s
    assert s.stop() == 0, s.logs()


_area = itertools.count(random.randrange(0, 1600))


def area() -> tuple[float, float]:
    """A fresh patch of the map, far from every other test's."""
    n = next(_area) % 1600
    return 30.0 + 0.25 * (n % 40), -120.0 + 0.25 * (n // 40)


@dataclass
class User:
    name: str
    user_id: str
    token: str
    md: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        self.md = (("authorization", f"Bearer {self.token}"),)


async def new_users(ch: grpc.aio.Channel, n: int) -> list[User]:
    ident = ipbg.IdentityServiceStub(ch)

    async def one() -> User:
        name = "r" + uuid.uuid4().hex[:12]
        reg = await ident.RegisterUser(ipb.RegisterUserRequest(username=name, password="correct horse battery"))
        tok = await ident.Login(ipb.LoginRequest(username=name, password="correct horse battery"))
        return User(name, reg.user.user_id, tok.access_token)

    sem = asyncio.Semaphore(8)

    async def limited() -> User:
        async with sem:
            return await one()

    return list(await asyncio.gather(*(limited() for _ in range(n))))


def ts(ms: int | None = None) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms if ms is not None else int(time.time() * 1000))
    return t


def ping(lat: float, lng: float, *, ms: int | None = None, heading: float = 0.0,
         speed: float = 0.0) -> pb.UpdateLocationRequest:
    return pb.UpdateLocationRequest(position=pb.LatLng(lat=lat, lng=lng), heading_degrees=heading,
                                    speed_mps=speed, time=ts(ms))


class Driver:
    """A driver's app: a ping stream kept open, and the offers stream."""

    def __init__(self, ch: grpc.aio.Channel, user: User, lat: float, lng: float, *,
                 auto: str = "") -> None:
        self.user, self.lat, self.lng, self.auto = user, lat, lng, auto
        self.stub = pbg.DriverServiceStub(ch)
        self.pings: asyncio.Queue[pb.UpdateLocationRequest | None] = asyncio.Queue()
        self.offers: asyncio.Queue[pb.WatchOffersResponse] = asyncio.Queue()
        self.accepted: list[pb.Ride] = []
        self.errors: list[grpc.aio.AioRpcError] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.result: pb.UpdateLocationResponse | None = None
        self.watch_ended: BaseException | str = "open"

    async def _requests(self) -> AsyncIterator[pb.UpdateLocationRequest]:
        while True:
            p = await self.pings.get()
            if p is None:
                return
            yield p

    async def start(self) -> Driver:
        self.call = self.stub.UpdateLocation(self._requests(), metadata=self.user.md)
        self.tasks.append(asyncio.create_task(self._watch()))
        await self.move(self.lat, self.lng)
        return self

    async def move(self, lat: float, lng: float, **kw: Any) -> None:
        self.lat, self.lng = lat, lng
        await self.pings.put(ping(lat, lng, **kw))

    async def _watch(self) -> None:
        try:
            await self._watch_offers()
        except BaseException as exc:
            self.watch_ended = exc
            raise
        self.watch_ended = EOFError("the server ended the offers stream")

    async def _watch_offers(self) -> None:
        async for ev in self.stub.WatchOffers(pb.WatchOffersRequest(), metadata=self.user.md):
            if ev.HasField("offer") and self.auto == "accept":
                try:
                    r = await self.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=ev.offer.offer_id),
                                                    metadata=self.user.md)
                    self.accepted.append(r.ride)
                except grpc.aio.AioRpcError as exc:
                    self.errors.append(exc)
            elif ev.HasField("offer") and self.auto == "decline":
                await self.stub.DeclineOffer(pb.DeclineOfferRequest(offer_id=ev.offer.offer_id),
                                             metadata=self.user.md)
            await self.offers.put(ev)

    async def next_offer(self, within: float = 15) -> pb.Offer:
        """The next offer pushed to this driver; a timeout says what its offers stream was doing
        (the servers' side is in the stack log the report carries)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                ev = await asyncio.wait_for(self.offers.get(), max(0.01, deadline - loop.time()))
            except TimeoutError:
                raise AssertionError(f"no offer for driver {self.user.user_id} within {within}s "
                                     f"(offers stream: {self.watch_ended!r})") from None
            if ev.HasField("offer"):
                return ev.offer

    async def stop(self) -> pb.UpdateLocationResponse:
        await self.pings.put(None)
        self.result = await self.call
        for t in self.tasks:
            t.cancel()
        return self.result


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def wait_state(rider: pbg.RiderServiceStub, u: User, ride_id: str, states: set[int],
                     within: float = 20) -> pb.Ride:
    deadline = time.monotonic() + within
    while True:
        r = (await rider.GetRide(pb.GetRideRequest(ride_id=ride_id), metadata=u.md)).ride
        if r.state in states or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.1)


def test_a_ride_from_quote_to_completed_trip(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            rider_u, driver_u = await new_users(ch, 2)
            rider = pbg.RiderServiceStub(ch)
            d = await Driver(ch, driver_u, lat + 0.005, lng).start()
            await asyncio.sleep(0.3)
            q = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                        dropoff=pb.LatLng(lat=lat + 0.05, lng=lng + 0.05)),
                                     metadata=rider_u.md)
            assert q.HasField("pickup_eta") and q.pickup_eta.seconds > 0
            assert q.distance_meters > 6000 and q.fare.total.currency_code == "USD"
            parts = q.fare.base.amount_minor + q.fare.distance.amount_minor + q.fare.time.amount_minor
            assert q.fare.surge_milli == 1000 and q.fare.total.amount_minor == parts
            req = await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=rider_u.md)
            ride = req.ride
            assert ride.state in (pb.RIDE_STATE_REQUESTED, pb.RIDE_STATE_OFFERED)
            assert ride.fare == q.fare and ride.rider_id == rider_u.user_id and not ride.driver_id
            # The same quote again is the same ride, not a second booking.
            again = await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=rider_u.md)
            assert again.ride.ride_id == ride.ride_id

            watch = rider.WatchRide(pb.WatchRideRequest(ride_id=ride.ride_id), metadata=rider_u.md)
            offer = await d.next_offer()
            assert offer.ride_id == ride.ride_id and offer.fare == q.fare
            assert offer.expire_time.ToMilliseconds() > time.time() * 1000
            acc = await d.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=offer.offer_id), metadata=driver_u.md)
            assert acc.ride.state == pb.RIDE_STATE_ACCEPTED and acc.ride.driver_id == driver_u.user_id
            # Accepting twice answers the same ride.
            acc2 = await d.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=offer.offer_id), metadata=driver_u.md)
            assert acc2.ride.ride_id == ride.ride_id and acc2.ride.driver_id == driver_u.user_id

            await d.move(lat + 0.0047, lng, heading=180, speed=8)  # 33 m on
            seen_states, positions = [], []
            async with asyncio.timeout(20):
                async for ev in watch:
                    seen_states.append(ev.ride.state)
                    if ev.HasField("driver"):
                        positions.append((round(ev.driver.position.lat, 4), ev.driver.HasField("pickup_eta")))
                    if positions and positions[-1][0] == round(lat + 0.0047, 4):
                        break
            assert pb.RIDE_STATE_ACCEPTED in seen_states
            assert (round(lat + 0.0047, 4), True) in positions  # the live position, with its ETA

            for st in (pb.RIDE_STATE_ARRIVING, pb.RIDE_STATE_IN_PROGRESS, pb.RIDE_STATE_COMPLETED):
                r = await d.stub.UpdateTrip(pb.UpdateTripRequest(ride_id=ride.ride_id, state=st),
                                            metadata=driver_u.md)
                assert r.ride.state == st
            # A step already taken answers the ride as it is; one out of order is refused.
            r = await d.stub.UpdateTrip(pb.UpdateTripRequest(ride_id=ride.ride_id,
                                                             state=pb.RIDE_STATE_ARRIVING), metadata=driver_u.md)
            assert r.ride.state == pb.RIDE_STATE_COMPLETED
            listed = await rider.ListRides(pb.ListRidesRequest(), metadata=rider_u.md)
            assert [x.ride_id for x in listed.rides] == [ride.ride_id]
            assert listed.rides[0].state == pb.RIDE_STATE_COMPLETED
            # The driver is free again: the next ride is offered to them.
            q2 = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                         dropoff=pb.LatLng(lat=lat + 0.01, lng=lng)),
                                      metadata=rider_u.md)
            r2 = await rider.RequestRide(pb.RequestRideRequest(quote_id=q2.quote_id), metadata=rider_u.md)
            o2 = await d.next_offer()
            assert o2.ride_id == r2.ride.ride_id
            await rider.CancelRide(pb.CancelRideRequest(ride_id=r2.ride.ride_id), metadata=rider_u.md)
            ev = await asyncio.wait_for(d.offers.get(), 10)
            assert ev.withdrawn_offer_id == o2.offer_id
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await d.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=o2.offer_id), metadata=driver_u.md)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(e.value) == "OFFER_EXPIRED"
            res = await d.stop()
            assert res.accepted == 2 and res.refused == 0

    run(go())


def test_an_unanswered_or_declined_offer_passes_to_the_next_driver(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            rider_u, near_u, far_u = await new_users(ch, 3)
            rider = pbg.RiderServiceStub(ch)
            near = await Driver(ch, near_u, lat + 0.002, lng).start()   # silent
            far = await Driver(ch, far_u, lat + 0.01, lng).start()
            await asyncio.sleep(0.3)
            q = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                        dropoff=pb.LatLng(lat=lat, lng=lng + 0.03)),
                                     metadata=rider_u.md)
            ride = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id),
                                            metadata=rider_u.md)).ride
            first = await near.next_offer()  # the nearest is asked first
            t0 = time.monotonic()
            second = await far.next_offer()
            assert time.monotonic() - t0 > OFFER_S * 0.5  # only once the first lapsed
            assert first.ride_id == second.ride_id == ride.ride_id and first.offer_id != second.offer_id
            ev = await asyncio.wait_for(near.offers.get(), 5)
            assert ev.withdrawn_offer_id == first.offer_id
            await far.stub.DeclineOffer(pb.DeclineOfferRequest(offer_id=second.offer_id), metadata=far_u.md)
            # Both asked; the third offer goes to nobody (the near one was asked already).
            done = await wait_state(rider, rider_u, ride.ride_id, {pb.RIDE_STATE_CANCELLED})
            assert done.state == pb.RIDE_STATE_CANCELLED
            assert done.cancel_reason == pb.CANCEL_REASON_NO_DRIVER_AVAILABLE and done.offers == 2
            # A lapsed offer cannot be accepted.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await near.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=first.offer_id), metadata=near_u.md)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await near.stop()
            await far.stop()

    run(go())


def test_nobody_near_means_no_driver_available(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            [u] = await new_users(ch, 1)
            rider = pbg.RiderServiceStub(ch)
            q = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                        dropoff=pb.LatLng(lat=lat, lng=lng + 0.01)), metadata=u.md)
            assert not q.HasField("pickup_eta")
            ride = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=u.md)).ride
            done = await wait_state(rider, u, ride.ride_id, {pb.RIDE_STATE_CANCELLED})
            assert done.cancel_reason == pb.CANCEL_REASON_NO_DRIVER_AVAILABLE and done.offers == 0
            # The ride ended: the rider may book again.
            q2 = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                         dropoff=pb.LatLng(lat=lat, lng=lng + 0.01)), metadata=u.md)
            r2 = await rider.RequestRide(pb.RequestRideRequest(quote_id=q2.quote_id), metadata=u.md)
            assert r2.ride.ride_id != ride.ride_id

    run(go())


def test_quotes_are_the_callers_own_and_one_ride_at_a_time(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            alice, mallory = await new_users(ch, 2)
            rider = pbg.RiderServiceStub(ch)
            req = pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng), dropoff=pb.LatLng(lat=lat, lng=lng + 0.02))
            q = await rider.GetQuote(req, metadata=alice.md)
            body, _, sig = q.quote_id.partition(".")
            forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + sig
            for who, quote_id in ((mallory, q.quote_id), (alice, forged), (alice, "not-a-quote")):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await rider.RequestRide(pb.RequestRideRequest(quote_id=quote_id), metadata=who.md)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "quote_id" in violations(e.value)
            # Nothing was booked by any of those.
            for who in (alice, mallory):
                assert not (await rider.ListRides(pb.ListRidesRequest(), metadata=who.md)).rides
            ride = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=alice.md)).ride
            q2 = await rider.GetQuote(req, metadata=alice.md)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rider.RequestRide(pb.RequestRideRequest(quote_id=q2.quote_id), metadata=alice.md)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(e.value) == "RIDE_IN_PROGRESS"
            # Another user cannot see, watch or cancel it: it does not exist for them.
            for call in (rider.GetRide(pb.GetRideRequest(ride_id=ride.ride_id), metadata=mallory.md),
                         rider.CancelRide(pb.CancelRideRequest(ride_id=ride.ride_id), metadata=mallory.md)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in rider.WatchRide(pb.WatchRideRequest(ride_id=ride.ride_id), metadata=mallory.md):
                    pass
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # Nor move it along as if they drove it.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pbg.DriverServiceStub(ch).UpdateTrip(
                    pb.UpdateTripRequest(ride_id=ride.ride_id, state=pb.RIDE_STATE_COMPLETED), metadata=mallory.md)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # Cancelling before any driver accepted is free; cancelling again answers the same.
            c1 = (await rider.CancelRide(pb.CancelRideRequest(ride_id=ride.ride_id), metadata=alice.md)).ride
            assert c1.state == pb.RIDE_STATE_CANCELLED and c1.cancel_reason == pb.CANCEL_REASON_RIDER
            assert not c1.HasField("cancellation_fee")
            c2 = (await rider.CancelRide(pb.CancelRideRequest(ride_id=ride.ride_id), metadata=alice.md)).ride
            assert c2.state == pb.RIDE_STATE_CANCELLED and c2.update_time == c1.update_time

    run(go())


def test_cancelling_late_costs_a_fee_and_a_started_trip_cannot_be_cancelled(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            rider_u, driver_u, other_u = await new_users(ch, 3)
            rider = pbg.RiderServiceStub(ch)
            d = await Driver(ch, driver_u, lat, lng + 0.003, auto="accept").start()
            await asyncio.sleep(0.3)
            req = pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng), dropoff=pb.LatLng(lat=lat + 0.02, lng=lng))
            q = await rider.GetQuote(req, metadata=rider_u.md)
            ride = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=rider_u.md)).ride
            acc = await wait_state(rider, rider_u, ride.ride_id, {pb.RIDE_STATE_ACCEPTED})
            assert acc.driver_id == driver_u.user_id
            # A rider cannot accept an offer, nor can another driver: offers are the driver's own.
            [offer_ev] = [ev for ev in [await d.offers.get()] if ev.HasField("offer")]
            for who in (rider_u, other_u):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await d.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=offer_ev.offer.offer_id),
                                             metadata=who.md)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            # The driver sees the ride too.
            got = await rider.GetRide(pb.GetRideRequest(ride_id=ride.ride_id), metadata=driver_u.md)
            assert got.ride.driver_id == driver_u.user_id
            await asyncio.sleep(1.3)  # past the 1 s grace
            c = (await rider.CancelRide(pb.CancelRideRequest(ride_id=ride.ride_id), metadata=rider_u.md)).ride
            assert c.state == pb.RIDE_STATE_CANCELLED and c.cancellation_fee.amount_minor == 500
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await d.stub.UpdateTrip(pb.UpdateTripRequest(ride_id=ride.ride_id, state=pb.RIDE_STATE_IN_PROGRESS),
                                        metadata=driver_u.md)
            assert error_reason(e.value) == "BAD_TRANSITION"

            # The driver was freed by the cancel: the next ride goes to them, and once
            # its trip starts the rider can no longer cancel.
            q2 = await rider.GetQuote(req, metadata=rider_u.md)
            r2 = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q2.quote_id), metadata=rider_u.md)).ride
            acc2 = await wait_state(rider, rider_u, r2.ride_id, {pb.RIDE_STATE_ACCEPTED})
            assert acc2.driver_id == driver_u.user_id
            await d.stub.UpdateTrip(pb.UpdateTripRequest(ride_id=r2.ride_id, state=pb.RIDE_STATE_IN_PROGRESS),
                                    metadata=driver_u.md)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await rider.CancelRide(pb.CancelRideRequest(ride_id=r2.ride_id), metadata=rider_u.md)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(e.value) == "RIDE_STARTED"
            await d.stop()

    run(go())


def test_bad_pings_are_refused_one_by_one_and_the_stream_goes_on(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            [u] = await new_users(ch, 1)
            stub = pbg.DriverServiceStub(ch)
            t = int(time.time() * 1000) - 60_000
            pings = [
                ping(lat, lng, ms=t),                       # 0 ok
                ping(91.0, lng, ms=t + 1000),               # 1 latitude out of range
                ping(lat, lng + 0.0001, ms=t - 5000),       # 2 backwards
                ping(lat + 1.0, lng, ms=t + 2000),          # 3 111 km in a second
                pb.UpdateLocationRequest(position=pb.LatLng(lat=lat, lng=lng), speed_mps=-1, time=ts(t + 3000)),
                pb.UpdateLocationRequest(position=pb.LatLng(lat=lat, lng=lng)),  # 5 no time
                ping(lat + 0.0005, lng, ms=t + 4000, speed=12),  # 6 ok
                ping(lat, lng, ms=int(time.time() * 1000) + 3_600_000),  # 7 an hour ahead
            ]
            res = await stub.UpdateLocation(iter(pings), metadata=u.md)
            assert res.accepted == 2 and res.refused == 6
            by_index = {r.index: (r.field, r.description) for r in res.refusals}
            assert by_index[1][0] == "position.lat"
            assert by_index[2][0] == "time" and "later than" in by_index[2][1]
            assert by_index[3][0] == "position" and "faster than" in by_index[3][1]
            assert by_index[4][0] == "speed_mps"
            assert by_index[5][0] == "time"
            assert by_index[7][0] == "time" and "future" in by_index[7][1]
            assert set(by_index) == {1, 2, 3, 4, 5, 7}
            # Without a token there is no stream at all.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.UpdateLocation(iter(pings[:1]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(go())


def test_bad_requests_name_the_field(stack: StackProcess) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            [u] = await new_users(ch, 1)
            rider = pbg.RiderServiceStub(ch)
            driver = pbg.DriverServiceStub(ch)
            cases: list[tuple[Any, str]] = [
                (rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=10, lng=200),
                                                   dropoff=pb.LatLng(lat=10, lng=10)), metadata=u.md),
                 "pickup.lng"),
                (rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=10, lng=10)), metadata=u.md), "dropoff"),
                (rider.GetRide(pb.GetRideRequest(ride_id="abc"), metadata=u.md), "ride_id"),
                (driver.UpdateTrip(pb.UpdateTripRequest(ride_id="12", state=pb.RIDE_STATE_ACCEPTED),
                                   metadata=u.md), "state"),
                (driver.AcceptOffer(pb.AcceptOfferRequest(offer_id="-1"), metadata=u.md), "offer_id"),
                (rider.ListRides(pb.ListRidesRequest(page_size=1000), metadata=u.md), "page_size"),
            ]
            for call, fld in cases:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fld
                assert fld in violations(e.value), (fld, violations(e.value))
            assert not (await rider.ListRides(pb.ListRidesRequest(), metadata=u.md)).rides

    run(go())


def test_surge_rises_where_demand_outruns_supply(stack: StackProcess) -> None:
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            users = await new_users(ch, 7)
            driver_u, riders = users[0], users[1:]
            rider = pbg.RiderServiceStub(ch)
            d = await Driver(ch, driver_u, lat + 0.001, lng).start()   # never answers
            await asyncio.sleep(0.3)
            req = pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng), dropoff=pb.LatLng(lat=lat, lng=lng + 0.02))
            calm = await rider.GetQuote(req, metadata=riders[0].md)
            assert calm.fare.surge_milli == 1000
            quotes = await asyncio.gather(*(rider.GetQuote(req, metadata=r.md) for r in riders))
            await asyncio.gather(*(rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=r.md)
                                   for q, r in zip(quotes, riders, strict=True)))
            deadline = time.monotonic() + 10
            surged = calm
            while surged.fare.surge_milli == 1000 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                surged = await rider.GetQuote(req, metadata=riders[0].md)
            assert surged.pickup_cell == calm.pickup_cell
            assert 1000 < surged.fare.surge_milli <= 3000
            assert surged.fare.total.amount_minor > calm.fare.total.amount_minor
            await d.stop()

    run(go())


def test_many_riders_at_once_never_share_a_driver(stack: StackProcess) -> None:
    """40 riders request at once in one neighbourhood with 15 drivers who accept every offer."""
    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
            users = await new_users(ch, 55)
            drivers_u, riders_u = users[:15], users[15:]
            rider = pbg.RiderServiceStub(ch)
            drivers = [await Driver(ch, u, lat + 0.001 * (i % 5), lng + 0.001 * (i // 5), auto="accept").start()
                       for i, u in enumerate(drivers_u)]
            await asyncio.sleep(0.5)
            req = pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng), dropoff=pb.LatLng(lat=lat, lng=lng + 0.02))
            quotes = await asyncio.gather(*(rider.GetQuote(req, metadata=r.md) for r in riders_u))
            rides = await asyncio.gather(*(rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id),
                                                             metadata=r.md)
                                           for q, r in zip(quotes, riders_u, strict=True)))
            ids = [r.ride.ride_id for r in rides]
            finals = await asyncio.gather(*(wait_state(rider, u, i, {pb.RIDE_STATE_ACCEPTED, pb.RIDE_STATE_CANCELLED},
                                                       within=60)
                                            for u, i in zip(riders_u, ids, strict=True)))
            matched = [f for f in finals if f.state == pb.RIDE_STATE_ACCEPTED]
            unmatched = [f for f in finals if f.state == pb.RIDE_STATE_CANCELLED]
            assert len(matched) + len(unmatched) == len(riders_u)
            assert all(f.cancel_reason == pb.CANCEL_REASON_NO_DRIVER_AVAILABLE for f in unmatched)
            by_driver = [f.driver_id for f in matched]
            assert len(by_driver) == len(set(by_driver))  # no driver holds two rides
            assert len(matched) == len(drivers)            # and every driver got one
            # Each driver's own view agrees: exactly one accepted ride each.
            assert sorted(len(d.accepted) for d in drivers) == [1] * len(drivers)
            for d in drivers:
                await d.stop()

    run(go())
