"""`sysdesign rides simulate`: simulated drivers and riders on the public gRPC API.

Each driver keeps one UpdateLocation stream open and pings once a second while
it drives a Manhattan-style grid walk (east-west, then north-south, to a
random corner of the box) at a steady speed, so no ping ever implies a jump
faster than the speed asked for; it watches its offers, accepts one with
probability ``accept_rate`` (else declines it or lets it lapse), drives to the
pickup (ARRIVING), picks the rider up (IN_PROGRESS), drives to the dropoff
(COMPLETED) and roams again. Each rider waits an exponential think time, asks
for a quote between two random points of the box, books it and watches the
ride until it ends.

Stopping (the duration is over, or Ctrl-C) cancels the rides that have not
started, drops off the riders already in a car, and closes every driver's
stream: the server's answer to each stream (pings accepted and refused) goes
into the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.rides.v1 import rides_pb2 as pb
from sysdesign.rides.v1 import rides_pb2_grpc as pbg

EARTH_M = 6371008.8
# The server refuses pings implying more than 200 km/h (SYSDESIGN_RIDES_MAX_SPEED_KMH).
MAX_SPEED_KMH = 200.0
# A driver this close to the pickup or the dropoff is there.
ARRIVED_M = 15.0
# City blocks of the grid walk, in metres.
BLOCK_M = 150.0
BOARDING_S = 1.0
PASSWORD = "simulated rider and driver"
ENDED = {pb.RIDE_STATE_COMPLETED, pb.RIDE_STATE_CANCELLED}
# Around San Francisco's downtown, about 6 km by 6 km.
SF_BOX = (37.7480, -122.4530, 37.8020, -122.3850)


@dataclass(frozen=True)
class Box:
    south: float
    west: float
    north: float
    east: float

    @classmethod
    def parse(cls, text: str) -> Box:
        """"lat1,lng1,lat2,lng2": two opposite corners, in either order."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4:
            raise ValueError("expected lat1,lng1,lat2,lng2")
        try:
            lat1, lng1, lat2, lng2 = (float(p) for p in parts)
        except ValueError:
            raise ValueError("expected four numbers: lat1,lng1,lat2,lng2") from None
        if not all(math.isfinite(v) for v in (lat1, lng1, lat2, lng2)):
            raise ValueError("expected finite numbers")
        if not (-85 <= lat1 <= 85 and -85 <= lat2 <= 85 and -180 <= lng1 <= 180 and -180 <= lng2 <= 180):
            raise ValueError("latitudes must be within ±85, longitudes within ±180")
        box = cls(min(lat1, lat2), min(lng1, lng2), max(lat1, lat2), max(lng1, lng2))
        if box.height_m < 100 or box.width_m < 100:
            raise ValueError("the box must be at least 100 m on each side")
        if box.height_m > 200_000 or box.width_m > 200_000:
            raise ValueError("the box must be at most 200 km on each side")
        return box

    @property
    def height_m(self) -> float:
        return math.radians(self.north - self.south) * EARTH_M

    @property
    def width_m(self) -> float:
        mid = math.radians((self.north + self.south) / 2)
        return math.radians(self.east - self.west) * EARTH_M * math.cos(mid)

    def point(self, rng: random.Random) -> tuple[float, float]:
        return rng.uniform(self.south, self.north), rng.uniform(self.west, self.east)

    def corner(self, rng: random.Random) -> tuple[float, float]:
        """A random street corner of the grid (blocks of BLOCK_M)."""
        rows = max(1, int(self.height_m // BLOCK_M))
        cols = max(1, int(self.width_m // BLOCK_M))
        return (self.south + (self.north - self.south) * rng.randint(0, rows) / rows,
                self.west + (self.east - self.west) * rng.randint(0, cols) / cols)


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * EARTH_M * math.asin(min(1.0, math.sqrt(h)))


def bearing(a: tuple[float, float], b: tuple[float, float]) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    y = math.sin(lo2 - lo1) * math.cos(la2)
    x = math.cos(la1) * math.sin(la2) - math.sin(la1) * math.cos(la2) * math.cos(lo2 - lo1)
    return math.degrees(math.atan2(y, x)) % 360.0


def toward(a: tuple[float, float], b: tuple[float, float], metres: float) -> tuple[float, float]:
    """The point ``metres`` from a on the straight line to b (b itself if nearer)."""
    d = distance_m(a, b)
    if d <= metres or d == 0:
        return b
    f = metres / d
    return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f


def grid_route(a: tuple[float, float], b: tuple[float, float]) -> list[tuple[float, float]]:
    """Manhattan-style: along the east-west street first, then north-south."""
    corner = (a[0], b[1])
    return [p for p in (corner, b) if distance_m(a, p) > 0.5 or p == b]


@dataclass
class Stats:
    drivers_online: int = 0
    drivers_available: int = 0
    drivers_on_trip: int = 0
    drivers_offered: int = 0
    offers: int = 0
    accepted: int = 0
    declined: int = 0
    lapsed: int = 0
    quotes: int = 0
    requested: int = 0
    matched: int = 0
    completed: int = 0
    unmatched: int = 0
    cancelled_other: int = 0
    cancelled_at_exit: int = 0
    dropped_at_exit: int = 0
    pings_sent: int = 0
    pings_accepted: int = 0
    pings_refused: int = 0
    refusals: list[str] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""
    surge_max_milli: int = 1000
    surge_by_rider: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def error(self, what: str, e: BaseException) -> None:
        self.errors += 1
        detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
        code = e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
        self.last_error = f"{what}: {code} {detail}"[:200]

    @property
    def surge_now_milli(self) -> int:
        return max(self.surge_by_rider.values(), default=1000)

    def line(self) -> str:
        return (f"drivers {self.drivers_online} online · {self.drivers_available} available · "
                f"{self.drivers_on_trip} on trip │ rides {self.requested} requested · {self.matched} matched · "
                f"{self.completed} completed · {self.unmatched} unmatched │ surge max "
                f"{self.surge_now_milli / 1000:.2f}x │ pings {self.pings_sent} sent · "
                f"{self.pings_refused} refused" + (f" │ {self.errors} errors" if self.errors else ""))


@dataclass
class SimOptions:
    drivers: int = 50
    riders: int = 20
    box: Box = field(default_factory=lambda: Box(*SF_BOX))
    duration: float | None = None
    seed: int | None = None
    accept_rate: float = 0.9
    speed_kmh: float = 30.0
    think_seconds: float = 5.0
    target: str = "127.0.0.1:50051"
    # Instead of RegisterUser + Login: username -> (token, user id), e.g. minted with the
    # data dir's secret (for a stack whose API limits allow few registrations).
    mint: Callable[[str], Awaitable[tuple[str, str]]] | None = None


@dataclass
class SimUser:
    name: str
    user_id: str
    md: tuple[tuple[str, str], ...]


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


class SimDriver:
    def __init__(self, sim: Simulation, ch: grpc.aio.Channel, user: SimUser, rng: random.Random) -> None:
        self.sim, self.user, self.rng = sim, user, rng
        self.stub = pbg.DriverServiceStub(ch)
        self.pos = sim.o.box.point(rng)
        self.route: list[tuple[float, float]] = []
        self.heading = 0.0
        self.speed_mps = sim.o.speed_kmh / 3.6
        self.state = "offline"  # offline | available | offered | to_pickup | on_trip
        self.ride_id = ""
        self.pickup: tuple[float, float] = self.pos
        self.dropoff: tuple[float, float] = self.pos
        self.pings: asyncio.Queue[pb.UpdateLocationRequest | None] = asyncio.Queue()
        self.call: Any = None
        self.watch: Any = None
        self.last_ms = 0
        self.last_move = time.monotonic()

    # -- the ping stream --------------------------------------------------------------------

    async def _requests(self, q: asyncio.Queue[pb.UpdateLocationRequest | None]
                        ) -> AsyncIterator[pb.UpdateLocationRequest]:
        while True:
            p = await q.get()
            if p is None:
                return
            yield p

    def _open_stream(self) -> None:
        self.pings = asyncio.Queue()
        self.call = self.stub.UpdateLocation(self._requests(self.pings), metadata=self.user.md)

    async def _close_stream(self, call: Any = None,
                            q: asyncio.Queue[pb.UpdateLocationRequest | None] | None = None) -> None:
        """Ends a ping stream (this one by default) and counts what the server says of its pings."""
        if call is None:
            call, q, self.call = self.call, self.pings, None
        if call is None or q is None:
            return
        await q.put(None)
        try:
            res = await asyncio.wait_for(call, 10)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            self.sim.stats.error("UpdateLocation", e)
            call.cancel()
            return
        s = self.sim.stats
        s.pings_accepted += res.accepted
        s.pings_refused += res.refused
        for r in res.refusals:
            if len(s.refusals) < 20:
                s.refusals.append(f"{self.user.name} #{r.index} {r.field}: {r.description}")

    def _ping(self) -> None:
        ms = max(int(time.time() * 1000), self.last_ms + 1)
        self.last_ms = ms
        self.pings.put_nowait(pb.UpdateLocationRequest(
            position=pb.LatLng(lat=self.pos[0], lng=self.pos[1]), heading_degrees=self.heading % 360.0,
            speed_mps=self.speed_mps if self.route else 0.0, time=_ts(ms)))
        self.sim.stats.pings_sent += 1

    def _advance(self) -> None:
        now = time.monotonic()
        # However late this tick is, the car covers only what its speed allows in the time
        # that passed, so the implied speed of every ping is at most --speed-kmh.
        budget = self.speed_mps * min(now - self.last_move, 5.0)
        self.last_move = now
        while budget > 0 and self.route:
            nxt = self.route[0]
            d = distance_m(self.pos, nxt)
            if d > 0.01:
                self.heading = bearing(self.pos, nxt)
            if d <= budget:
                self.pos = nxt
                self.route.pop(0)
                budget -= d
            else:
                self.pos = toward(self.pos, nxt, budget)
                budget = 0

    def _go(self, to: tuple[float, float]) -> None:
        self.route = grid_route(self.pos, to)

    async def run(self) -> None:
        self._open_stream()
        self._ping()
        self.state = "available"
        self.watch = asyncio.create_task(self._watch_offers())
        try:
            while not self.sim.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.sim.stop.wait(), 1.0)
                if self.sim.stop.is_set():
                    break
                self._advance()
                if self.call is not None and self.call.done():
                    # The stream broke (the server restarted, say): count its end, open another.
                    await self._close_stream()
                    self._open_stream()
                self._ping()
                await self._step()
        finally:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.watch
            await self._at_exit()

    async def _step(self) -> None:
        if self.state in ("available", "offered") and not self.route:
            self._go(self.sim.o.box.corner(self.rng))  # roam
        elif self.state == "to_pickup" and not self.route and distance_m(self.pos, self.pickup) <= ARRIVED_M:
            if await self._trip(pb.RIDE_STATE_ARRIVING) and await self._board():
                if await self._trip(pb.RIDE_STATE_IN_PROGRESS):
                    self.state = "on_trip"
                    self._go(self.dropoff)
                    # Holding a ride, the driver stays matched-out while a fresh stream opens:
                    # the closed one's answer brings its refused pings into the line now.
                    old_call, old_q = self.call, self.pings
                    self._open_stream()
                    self.last_ms += 1
                    self.sim.background(self._close_stream(old_call, old_q))
        elif self.state == "on_trip" and not self.route and distance_m(self.pos, self.dropoff) <= ARRIVED_M:
            await self._trip(pb.RIDE_STATE_COMPLETED)  # counted on the rider's side
            self._free()

    async def _board(self) -> bool:
        try:
            await asyncio.wait_for(self.sim.stop.wait(), BOARDING_S)
        except TimeoutError:
            return True
        return False

    async def _trip(self, state: pb.RideState.ValueType) -> bool:
        try:
            r = await self.stub.UpdateTrip(pb.UpdateTripRequest(ride_id=self.ride_id, state=state),
                                           metadata=self.user.md, timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                self.sim.stats.error("UpdateTrip", e)
            self._free()  # the ride ended some other way (the rider cancelled)
            return False
        if r.ride.state == pb.RIDE_STATE_CANCELLED:
            self._free()
            return False
        return True

    def _free(self) -> None:
        self.state, self.ride_id, self.route = "available", "", []

    async def _watch_offers(self) -> None:
        while not self.sim.stop.is_set():
            try:
                async for ev in self.stub.WatchOffers(pb.WatchOffersRequest(), metadata=self.user.md):
                    if ev.HasField("offer"):
                        await self._offer(ev.offer)
                    elif ev.withdrawn_offer_id and self.state == "offered":
                        self.state = "available"
            except grpc.aio.AioRpcError as e:
                if self.sim.stop.is_set():
                    return
                self.sim.stats.error("WatchOffers", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sim.stop.wait(), 1.0)

    async def _offer(self, offer: pb.Offer) -> None:
        s = self.sim.stats
        s.offers += 1
        if self.state not in ("available", "offered") or self.sim.stop.is_set():
            return
        u = self.rng.random()
        if u >= self.sim.o.accept_rate:
            # Half the refusals are explicit, half let the offer run out.
            if self.rng.random() < 0.5:
                s.declined += 1
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.stub.DeclineOffer(pb.DeclineOfferRequest(offer_id=offer.offer_id),
                                                 metadata=self.user.md, timeout=10)
                self.state = "available"
            else:
                s.lapsed += 1
                self.state = "offered"
            return
        self.state = "offered"
        try:
            r = await self.stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=offer.offer_id),
                                            metadata=self.user.md, timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # OFFER_EXPIRED: too late, fine
                s.error("AcceptOffer", e)
            self.state = "available"
            return
        s.accepted += 1
        self.ride_id = r.ride.ride_id
        self.pickup = (r.ride.pickup.lat, r.ride.pickup.lng)
        self.dropoff = (r.ride.dropoff.lat, r.ride.dropoff.lng)
        self.state = "to_pickup"
        self._go(self.pickup)

    async def _at_exit(self) -> None:
        if self.state == "on_trip" and self.ride_id:
            # The simulation ends: drop the rider off where the car is.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.UpdateTrip(pb.UpdateTripRequest(ride_id=self.ride_id,
                                                                state=pb.RIDE_STATE_COMPLETED),
                                           metadata=self.user.md, timeout=10)
                self.sim.stats.dropped_at_exit += 1
        self.state = "offline"
        await self._close_stream()


def _canceller(call: Any) -> Callable[[asyncio.Task[Any]], None]:
    def cancel(_t: asyncio.Task[Any]) -> None:
        call.cancel()

    return cancel


class SimRider:
    def __init__(self, sim: Simulation, ch: grpc.aio.Channel, user: SimUser, index: int,
                 rng: random.Random) -> None:
        self.sim, self.user, self.index, self.rng = sim, user, index, rng
        self.stub = pbg.RiderServiceStub(ch)
        self.ride_id = ""
        self.ride_ids: list[str] = []

    async def _think(self) -> bool:
        """Waits a think time; False when the simulation stopped meanwhile."""
        wait = self.rng.expovariate(1 / self.sim.o.think_seconds) if self.sim.o.think_seconds > 0 else 0
        try:
            await asyncio.wait_for(self.sim.stop.wait(), wait)
        except TimeoutError:
            return True
        return False

    async def run(self) -> None:
        s = self.sim.stats
        try:
            while await self._think():
                box = self.sim.o.box
                pickup = box.point(self.rng)
                dropoff = box.point(self.rng)
                while distance_m(pickup, dropoff) < min(box.width_m, box.height_m) / 4:
                    dropoff = box.point(self.rng)
                try:
                    q = await self.stub.GetQuote(pb.GetQuoteRequest(
                        pickup=pb.LatLng(lat=pickup[0], lng=pickup[1]),
                        dropoff=pb.LatLng(lat=dropoff[0], lng=dropoff[1])), metadata=self.user.md, timeout=10)
                    s.quotes += 1
                    s.surge_by_rider[self.index] = q.fare.surge_milli or 1000
                    s.surge_max_milli = max(s.surge_max_milli, q.fare.surge_milli)
                    if self.sim.stop.is_set():
                        break
                    r = await self.stub.RequestRide(pb.RequestRideRequest(quote_id=q.quote_id),
                                                    metadata=self.user.md, timeout=10)
                except grpc.aio.AioRpcError as e:
                    s.error("RequestRide", e)
                    continue
                s.requested += 1
                self.ride_id = r.ride.ride_id
                self.ride_ids.append(self.ride_id)
                await self._watch(r.ride)
                self.ride_id = ""
        finally:
            await self._at_exit()

    async def _watch(self, ride: pb.Ride) -> None:
        s = self.sim.stats
        matched = False
        while not self.sim.stop.is_set():
            call = self.stub.WatchRide(pb.WatchRideRequest(ride_id=ride.ride_id), metadata=self.user.md)
            stopper = asyncio.create_task(self.sim.stop.wait())
            stopper.add_done_callback(_canceller(call))
            try:
                async for ev in call:
                    ride = ev.ride
                    if ride.driver_id and not matched:
                        matched = True
                        s.matched += 1
                    if ride.state in ENDED:
                        break
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED and self.sim.stop.is_set():
                    return
                s.error("WatchRide", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.sim.stop.wait(), 1.0)
            finally:
                stopper.cancel()
            if ride.state in ENDED:
                break
        if ride.state == pb.RIDE_STATE_COMPLETED:
            s.completed += 1
        elif ride.state == pb.RIDE_STATE_CANCELLED:
            if ride.cancel_reason == pb.CANCEL_REASON_NO_DRIVER_AVAILABLE:
                s.unmatched += 1
            else:
                s.cancelled_other += 1

    async def _at_exit(self) -> None:
        if not self.ride_id:
            return
        try:
            r = await self.stub.CancelRide(pb.CancelRideRequest(ride_id=self.ride_id), metadata=self.user.md,
                                           timeout=10)
            if r.ride.state == pb.RIDE_STATE_CANCELLED:
                self.sim.stats.cancelled_at_exit += 1
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # RIDE_STARTED: the driver drops them off
                self.sim.stats.error("CancelRide", e)


class Simulation:
    def __init__(self, o: SimOptions) -> None:
        self.o = o
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.rng = random.Random(o.seed)
        self.run_id = (f"{o.seed:x}"[-6:] if o.seed is not None else "") + uuid.uuid4().hex[:4]
        self.drivers: list[SimDriver] = []
        self.riders: list[SimRider] = []
        self._background: set[asyncio.Task[Any]] = set()

    def background(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _users(self, ch: grpc.aio.Channel, prefix: str, n: int) -> list[SimUser]:
        ident = ipbg.IdentityServiceStub(ch)
        sem = asyncio.Semaphore(8)
        mint = self.o.mint

        async def one(i: int) -> SimUser:
            name = f"{prefix}_{self.run_id}_{i}"
            async with sem:
                if mint is not None:
                    token, user_id = await mint(name)
                    return SimUser(name, user_id, (("authorization", f"Bearer {token}"),))
                reg = await ident.RegisterUser(ipb.RegisterUserRequest(username=name, password=PASSWORD),
                                               timeout=30)
                tok = await ident.Login(ipb.LoginRequest(username=name, password=PASSWORD), timeout=30)
            return SimUser(name, reg.user.user_id, (("authorization", f"Bearer {tok.access_token}"),))

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    def _count(self) -> None:
        s = self.stats
        online = [d for d in self.drivers if d.state != "offline"]
        s.drivers_online = len(online)
        s.drivers_available = sum(1 for d in online if d.state == "available")
        s.drivers_offered = sum(1 for d in online if d.state == "offered")
        s.drivers_on_trip = sum(1 for d in online if d.state in ("to_pickup", "on_trip"))

    async def run(self, on_tick: Callable[[Stats], None] | None = None,
                  on_users: Callable[[int], None] | None = None) -> Stats:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        from clients.sdk import channel_options

        # A channel for every 25 simulated people: no single connection carries every stream.
        n_ch = max(1, math.ceil((self.o.drivers + self.o.riders) / 25))
        channels = [grpc.aio.insecure_channel(self.o.target, options=channel_options()) for _ in range(n_ch)]
        try:
            drv_users = await self._users(channels[0], "simdrv", self.o.drivers)
            rdr_users = await self._users(channels[0], "simrdr", self.o.riders)
            if on_users:
                on_users(len(drv_users) + len(rdr_users))
            self.drivers = [SimDriver(self, channels[i % n_ch], u, random.Random(self.rng.random()))
                            for i, u in enumerate(drv_users)]
            self.riders = [SimRider(self, channels[(i + len(drv_users)) % n_ch], u, i,
                                    random.Random(self.rng.random())) for i, u in enumerate(rdr_users)]
            self.stats.started = time.monotonic()
            tasks = [asyncio.create_task(d.run()) for d in self.drivers]
            # Give the drivers a moment online before the first requests come.
            await asyncio.sleep(0.5)
            tasks += [asyncio.create_task(r.run()) for r in self.riders]
            deadline = None if self.o.duration is None else time.monotonic() + self.o.duration
            while not self.stop.is_set():
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), wait)
                self._count()
                if on_tick:
                    on_tick(self.stats)
            self.stop.set()
            # Riders first (their unstarted rides cancelled), then drivers (riders in a car dropped off).
            await asyncio.gather(*tasks[len(self.drivers):], return_exceptions=True)
            await asyncio.gather(*tasks[:len(self.drivers)], return_exceptions=True)
            await asyncio.gather(*self._background, return_exceptions=True)
            self._count()
            if on_tick:
                on_tick(self.stats)
            return self.stats
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            for ch in channels:
                await ch.close()
