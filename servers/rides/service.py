"""sysdesign.rides.v1: RiderService and DriverService, and the dispatcher worker.

Thin adapters: the caller comes from the token, messages become calls on
RidesCore (servers/rides/core.py) and rows become messages again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import structlog
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.rides.v1 import rides_pb2 as pb
from sysdesign.rides.v1 import rides_pb2_grpc as pb_grpc

from servers.platform import validation
from servers.platform.auth import require_caller
from servers.platform.errors import InvalidArgument
from servers.platform.runtime import Runtime
from servers.rides import core as c
from servers.rides import geo
from servers.rides.core import RidesCore, RideView, dispatch_queue
from servers.rides.drivers import DriverView, PingRefused
from servers.rides.geo import ESTIMATE_METHOD, RidesSettings
from servers.rides.livemap import Box, live_map
from servers.rides.livemap import edge_routes as edge_routes
from servers.rides.signals import Wake
from servers.rides.tables import TABLES as RIDES_TABLES
from servers.storage.queue import Job

log = structlog.get_logger("sysdesign.rides")

RIDER = pb.DESCRIPTOR.services_by_name["RiderService"].full_name
DRIVER = pb.DESCRIPTOR.services_by_name["DriverService"].full_name
MAP = pb.DESCRIPTOR.services_by_name["MapService"].full_name
PUBLIC_METHODS: set[str] = set()
UPDATE_LOCATION = f"/{DRIVER}/UpdateLocation"
# Each ping is checked on its own: a bad one is refused, the stream goes on.
OWN_STREAM_CHECKS = {UPDATE_LOCATION}
# A driver's ping stream stays open for their whole shift.
OPEN_STREAMS = {UPDATE_LOCATION}
TABLES = RIDES_TABLES
MAX_REFUSALS_LISTED = 100
# How often a rider's stream looks at the driver's position (it changes about once a second).
WATCH_POLL_S = 0.25
# Watches wake on signals (servers/rides/signals.py); without one they look again this often.
WATCH_RECHECK_S = 1.0


def dispatch_concurrency() -> int:
    return RidesSettings().dispatch_concurrency


def _ts(ms: int) -> Timestamp | None:
    if not ms:
        return None
    t = Timestamp()
    t.FromMilliseconds(int(ms))
    return t


def _dur(seconds: float) -> Duration:
    d = Duration()
    d.FromMilliseconds(round(seconds * 1000))
    return d


def _money(currency: str, minor: int) -> pb.Money:
    return pb.Money(currency_code=currency, amount_minor=int(minor))


def fare_message(currency: str, base: int, distance: int, time_: int, surge: int, total: int) -> pb.Fare:
    return pb.Fare(total=_money(currency, total), base=_money(currency, base),
                   distance=_money(currency, distance), time=_money(currency, time_), surge_milli=surge)


def ride_message(v: RideView) -> pb.Ride:
    h, n = v.header, v.now
    cur = h["currency"] or "USD"
    fee = int(n["fee_minor"] or 0)
    return pb.Ride(
        ride_id=str(v.ride_id), state=v.state,  # type: ignore[arg-type]
        rider_id=str(v.rider_id), driver_id=str(v.driver_id) if v.driver_id else "",
        pickup=pb.LatLng(lat=h["pickup_lat"], lng=h["pickup_lng"]),
        dropoff=pb.LatLng(lat=h["dropoff_lat"], lng=h["dropoff_lng"]),
        fare=fare_message(cur, h["base_minor"], h["distance_minor"], h["time_minor"], h["surge_milli"],
                          h["total_minor"]),
        distance_meters=int(h["distance_m"]), trip_duration=_dur(int(h["duration_s"])),
        cancel_reason=int(n["cancel_reason"] or 0),  # type: ignore[arg-type]
        cancellation_fee=_money(cur, fee) if fee else None,
        create_time=_ts(int(h["create_ms"])), update_time=_ts(int(n["at_ms"])),
        offers=int(n["offers"] or 0),
    )


def _id(raw: str) -> int:
    return int(raw)


async def _until(messages: AsyncIterator[Any], closing: asyncio.Event) -> AsyncIterator[Any]:
    """The stream's messages until it ends or the process starts shutting down."""
    it = messages.__aiter__()
    stop = asyncio.ensure_future(closing.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                return
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        stop.cancel()


class RiderServicer(pb_grpc.RiderServiceServicer):
    def __init__(self, core: RidesCore) -> None:
        self.core = core

    async def GetQuote(self, request: pb.GetQuoteRequest, context: Any) -> pb.GetQuoteResponse:
        caller = require_caller()
        q, token, eta = await self.core.get_quote(caller.user_id, (request.pickup.lat, request.pickup.lng),
                                                  (request.dropoff.lat, request.dropoff.lng))
        return pb.GetQuoteResponse(
            quote_id=token,
            fare=fare_message(q.currency, q.fare.base, q.fare.distance, q.fare.time, q.fare.surge_milli,
                              q.fare.total),
            pickup_eta=_dur(eta) if eta is not None else None, distance_meters=q.distance_m,
            trip_duration=_dur(q.duration_s), expire_time=_ts(q.expire_ms), pickup_cell=q.cell,
            estimate_method=ESTIMATE_METHOD)

    async def RequestRide(self, request: pb.RequestRideRequest, context: Any) -> pb.RequestRideResponse:
        caller = require_caller()
        view = await self.core.request_ride(caller.user_id, request.quote_id)
        return pb.RequestRideResponse(ride=ride_message(view))

    async def GetRide(self, request: pb.GetRideRequest, context: Any) -> pb.GetRideResponse:
        caller = require_caller()
        return pb.GetRideResponse(ride=ride_message(await self.core.ride_for(caller.user_id, _id(request.ride_id))))

    async def ListRides(self, request: pb.ListRidesRequest, context: Any) -> pb.ListRidesResponse:
        caller = require_caller()
        try:
            views, token = await self.core.list_rides(caller.user_id, request.page_size, request.page_token)
        except ValueError as exc:
            raise InvalidArgument([("page_token", "is not a token this list returned")]) from exc
        return pb.ListRidesResponse(rides=[ride_message(v) for v in views], next_page_token=token)

    async def WatchRide(self, request: pb.WatchRideRequest, context: Any) -> AsyncIterator[pb.WatchRideResponse]:
        caller = require_caller()
        ride_id = _id(request.ride_id)
        view = await self.core.ride_for(caller.user_id, ride_id)
        with self.core.signals.on("r", ride_id) as changed:
            async for message in self._watch_ride(caller.user_id, ride_id, view, changed):
                yield message

    async def _watch_ride(self, caller: int, ride_id: int, view: RideView,
                          changed: Wake) -> AsyncIterator[pb.WatchRideResponse]:
        version = await self.core.version(ride_id)
        last_ping = 0
        last_ride: pb.Ride | None = None
        while True:
            pos = None
            if view.driver_id and view.state in (c.ACCEPTED, c.ARRIVING, c.IN_PROGRESS):
                dv = await self.core.index.view(view.driver_id)
                if dv is not None and dv.ts_ms and dv.ts_ms != last_ping:
                    last_ping = dv.ts_ms
                    pos = self._position(view, dv)
            ride = ride_message(view)
            if ride != last_ride or pos is not None:
                yield pb.WatchRideResponse(ride=ride, driver=pos)
                last_ride = ride
            if view.state in c.ENDED or self.core.closing.is_set():
                return
            if view.driver_id and view.state in (c.ACCEPTED, c.ARRIVING, c.IN_PROGRESS):
                await asyncio.sleep(WATCH_POLL_S)  # the driver's position, about once a second
            else:
                await changed.wait(WATCH_RECHECK_S)
            now_version = await self.core.version(ride_id)
            if now_version != version:
                version = now_version
                view = await self.core.ride_for(caller, ride_id)

    def _position(self, view: RideView, dv: DriverView) -> pb.DriverPosition:
        eta = None
        if view.state == c.ACCEPTED:
            eta = _dur(geo.pickup_eta_s(self.core.s, driver=(dv.lat, dv.lng), heading=dv.heading,
                                        moving_mps=dv.speed, pickup=view.pickup, hour=datetime.now().hour))
        return pb.DriverPosition(position=pb.LatLng(lat=dv.lat, lng=dv.lng), heading_degrees=dv.heading,
                                 speed_mps=dv.speed, time=_ts(dv.ts_ms), pickup_eta=eta)

    async def CancelRide(self, request: pb.CancelRideRequest, context: Any) -> pb.CancelRideResponse:
        caller = require_caller()
        return pb.CancelRideResponse(ride=ride_message(await self.core.cancel(caller.user_id,
                                                                              _id(request.ride_id))))


class DriverServicer(pb_grpc.DriverServiceServicer):
    def __init__(self, core: RidesCore) -> None:
        self.core = core

    async def UpdateLocation(self, request_iterator: AsyncIterator[pb.UpdateLocationRequest],
                             context: Any) -> pb.UpdateLocationResponse:
        caller = require_caller()
        out = pb.UpdateLocationResponse()
        index = -1
        try:
            async for ping in _until(request_iterator, self.core.closing):
                index += 1
                found = validation.violations(ping)
                if not found:
                    try:
                        await self.core.ping(caller.user_id, ping.position.lat, ping.position.lng,
                                             ping.heading_degrees, ping.speed_mps, ping.time.ToMilliseconds())
                        out.accepted += 1
                        continue
                    except PingRefused as exc:
                        found = [(exc.field, exc.description)]
                out.refused += 1
                for field, description in found:
                    if len(out.refusals) < MAX_REFUSALS_LISTED:
                        out.refusals.append(pb.PingRefusal(index=index, field=field, description=description))
        finally:
            # However the driver's stream ended, one holding no ride stops being matched;
            # one this replica let go of as it shuts down reconnects elsewhere and stays on.
            if not self.core.closing.is_set():
                await asyncio.shield(self.core.index.go_offline(caller.user_id, c.now_ms()))
        return out

    async def WatchOffers(self, request: pb.WatchOffersRequest,
                          context: Any) -> AsyncIterator[pb.WatchOffersResponse]:
        caller = require_caller()
        open_offer = 0
        with self.core.signals.on("d", caller.user_id) as changed:
            while not self.core.closing.is_set():
                v = await self.core.index.view(caller.user_id)
                current = v.offer_id if v is not None and v.state == "offered" else 0
                if open_offer and current != open_offer:
                    accepted = v is not None and v.state == "assigned" and v.offer_id == open_offer
                    if not accepted:
                        yield pb.WatchOffersResponse(withdrawn_offer_id=str(open_offer))
                    open_offer = 0
                if current and current != open_offer:
                    offer = await self._offer(caller.user_id, current)
                    if offer is not None:
                        yield pb.WatchOffersResponse(offer=offer)
                        open_offer = current
                # Woken when the driver's offer changes; an offer's lapse sends no signal, so
                # an open one is looked at again within WATCH_RECHECK_S.
                await changed.wait(WATCH_RECHECK_S)

    async def _offer(self, driver_id: int, offer_id: int) -> pb.Offer | None:
        try:
            row = await self.core.offer_for(driver_id, offer_id)
        except Exception:
            return None  # written a moment after the driver's state: seen on the next look
        view = await self.core.ride(int(row["ride_id"]))
        if view is None:
            return None
        ride = ride_message(view)
        return pb.Offer(offer_id=str(offer_id), ride_id=ride.ride_id, pickup=ride.pickup, dropoff=ride.dropoff,
                        fare=ride.fare, pickup_eta=_dur(int(row["eta_s"] or 0)),
                        expire_time=_ts(int(row["deadline_ms"])))

    async def AcceptOffer(self, request: pb.AcceptOfferRequest, context: Any) -> pb.AcceptOfferResponse:
        caller = require_caller()
        return pb.AcceptOfferResponse(ride=ride_message(await self.core.accept(caller.user_id,
                                                                               _id(request.offer_id))))

    async def DeclineOffer(self, request: pb.DeclineOfferRequest, context: Any) -> pb.DeclineOfferResponse:
        caller = require_caller()
        await self.core.decline(caller.user_id, _id(request.offer_id))
        return pb.DeclineOfferResponse()

    async def UpdateTrip(self, request: pb.UpdateTripRequest, context: Any) -> pb.UpdateTripResponse:
        caller = require_caller()
        view = await self.core.update_trip(caller.user_id, _id(request.ride_id), int(request.state))
        return pb.UpdateTripResponse(ride=ride_message(view))


class MapServicer(pb_grpc.MapServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def WatchMap(self, request: pb.WatchMapRequest, context: Any) -> AsyncIterator[pb.WatchMapResponse]:
        require_caller()
        lm = live_map(self.rt)
        box = Box.checked(request.south_west.lat, request.south_west.lng, request.north_east.lat,
                          request.north_east.lng)
        every = request.interval.ToMilliseconds() / 1000 if request.HasField("interval") else 1.0
        every = min(60.0, max(0.25, every))
        while not lm.core.closing.is_set():
            f = await lm.frame(box)
            yield pb.WatchMapResponse(
                drivers=[pb.MapDriver(driver_key=d["key"], position=pb.LatLng(lat=d["lat"], lng=d["lng"]),
                                      state=d["state"], heading_degrees=d["heading"]) for d in f["drivers"]],
                rides=[pb.MapRide(ride_id=r["id"], state=r["state"],
                                  pickup=pb.LatLng(lat=r["pickup"][0], lng=r["pickup"][1]),
                                  dropoff=pb.LatLng(lat=r["dropoff"][0], lng=r["dropoff"][1]),
                                  driver_key=r["driver"]) for r in f["rides"]],
                surge=[pb.SurgeCell(cell=x["cell"], surge_milli=x["milli"],
                                    boundary=[pb.LatLng(lat=p[0], lng=p[1]) for p in x["boundary"]])
                       for x in f["surge"]],
                time=_ts(f["time_ms"]))
            await asyncio.sleep(every)


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    core = RidesCore.for_runtime(rt)

    async def end_watches() -> None:
        core.closing.set()

    rt.drainers.append(end_watches)
    pb_grpc.add_RiderServiceServicer_to_server(RiderServicer(core), server)
    pb_grpc.add_DriverServiceServicer_to_server(DriverServicer(core), server)
    pb_grpc.add_MapServiceServicer_to_server(MapServicer(rt), server)
    return [RIDER, DRIVER, MAP]


async def handle_dispatch(rt: Runtime, job: Job) -> None:
    """The `dispatch` worker's handler: finds one ride a driver (at-least-once, resumable)."""
    await RidesCore.for_runtime(rt).dispatch(int(job.fields["ride_id"]))  # type: ignore[arg-type]


async def sweep(rt: Runtime) -> float:
    """The `dispatch` worker's sweep: recomputes surge; returns the seconds until the next."""
    core = RidesCore.for_runtime(rt)
    await core.sweep_surge()
    return core.s.surge_every_s


__all__ = ["OPEN_STREAMS", "OWN_STREAM_CHECKS", "PUBLIC_METHODS", "TABLES", "dispatch_concurrency",
           "dispatch_queue", "edge_routes", "handle_dispatch", "register", "sweep"]
