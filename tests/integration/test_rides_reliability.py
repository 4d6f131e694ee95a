"""Ride dispatch survives its dispatcher: SIGKILL mid-offer, and another takes over.

The API and the dispatcher run as separate processes (as on Kubernetes) on
one Redis of the test's own. The dispatcher is killed while a driver holds
the ride's offer; a second dispatcher claims the job once it has been idle
for the claim time, waits out the open offer, releases that driver and
offers the ride to the next one.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from sysdesign.rides.v1 import rides_pb2 as pb
from sysdesign.rides.v1 import rides_pb2_grpc as pbg

from tests.integration.test_rides import RIDES_ENV, Driver, area, new_users, wait_state
from tests.stack import StackProcess, own_redis

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]


def test_a_killed_dispatcher_mid_offer_is_taken_over(tmp_path: Path) -> None:
    valkey = own_redis(tmp_path / "valkey")
    url = valkey.start()
    data = tmp_path / "data"
    env = {**RIDES_ENV, "SYSDESIGN_REDIS_URL": url, "SYSDESIGN_RIDES_OFFER_SECONDS": "4"}
    server = StackProcess(data, extra_env=env)
    workers: list[StackProcess] = []

    async def go() -> None:
        lat, lng = area()
        async with grpc.aio.insecure_channel(server.grpc_addr) as ch:
            rider_u, silent_u, eager_u = await new_users(ch, 3)
            rider = pbg.RiderServiceStub(ch)
            silent = await Driver(ch, silent_u, lat + 0.001, lng).start()
            eager = await Driver(ch, eager_u, lat + 0.01, lng, auto="accept").start()
            await asyncio.sleep(0.3)
            q = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                        dropoff=pb.LatLng(lat=lat, lng=lng + 0.02)),
                                     metadata=rider_u.md)
            ride = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id), metadata=rider_u.md)).ride
            first = StackProcess(data, extra_env=env)
            workers.append(first)
            await asyncio.to_thread(first.start, ["worker", "dispatch"])
            offer = await silent.next_offer(within=30)
            assert offer.ride_id == ride.ride_id
            # The driver can hear of the offer a moment before the ride's log records it:
            # kill the dispatcher mid-offer, once the ride says OFFERED.
            offered = await wait_state(rider, rider_u, ride.ride_id, {pb.RIDE_STATE_OFFERED}, within=10)
            assert offered.state == pb.RIDE_STATE_OFFERED
            await asyncio.to_thread(first.stop, signal.SIGKILL)

            second = StackProcess(data, extra_env=env)
            workers.append(second)
            await asyncio.to_thread(second.start, ["worker", "dispatch"])
            done = await wait_state(rider, rider_u, ride.ride_id, {pb.RIDE_STATE_ACCEPTED, pb.RIDE_STATE_CANCELLED},
                                    within=60)
            assert done.state == pb.RIDE_STATE_ACCEPTED and done.driver_id == eager_u.user_id
            assert done.offers == 2
            # The silent driver was released: their offer was withdrawn and cannot be taken now.
            ev = await asyncio.wait_for(silent.offers.get(), 10)
            assert ev.withdrawn_offer_id == offer.offer_id
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await silent.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=offer.offer_id), metadata=silent_u.md)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            # ...and is free for the next ride, which reaches them first (they are nearer).
            q2 = await rider.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                         dropoff=pb.LatLng(lat=lat, lng=lng + 0.02)),
                                      metadata=eager_u.md)
            r2 = (await rider.RequestRide(pb.RequestRideRequest(quote_id=q2.quote_id), metadata=eager_u.md)).ride
            o2 = await silent.next_offer(within=30)
            assert o2.ride_id == r2.ride_id
            assert [r.ride_id for r in eager.accepted] == [ride.ride_id]  # one ride, never two
            await silent.stop()
            await eager.stop()

    try:
        server.start(["serve", "--services", "identity,rides"])
        asyncio.run(asyncio.wait_for(go(), 240))
    finally:
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.stop()
        if server.proc is not None:
            server.stop()
        valkey.stop()



def test_a_draining_server_answers_open_ping_streams(tmp_path: Path) -> None:
    """SIGTERM: each driver's open ping stream is answered (OK, with its counts) as the
    drain starts, not cut when the grace period runs out, so the app reconnects elsewhere."""
    server = StackProcess(tmp_path / "data", extra_env={**RIDES_ENV, "SYSDESIGN_SHUTDOWN_GRACE_SECONDS": "20"})
    server.start(["serve", "--services", "identity,rides"])

    async def go() -> pb.UpdateLocationResponse:
        lat, lng = area()
        async with grpc.aio.insecure_channel(server.grpc_addr) as ch:
            [u] = await new_users(ch, 1)
            d = await Driver(ch, u, lat, lng).start()
            await asyncio.sleep(0.5)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            # A stream cut at the end of the grace would raise here instead.
            return await asyncio.wait_for(d.call, 60)

    try:
        res = asyncio.run(go())
        assert res.accepted == 1 and res.refused == 0
        assert server.proc is not None and server.proc.wait(timeout=60) == 0
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
