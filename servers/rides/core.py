"""Ride matching: quotes, requests, the ride state machine, dispatch and surge.

The life of a ride::

    GetQuote ──signed quote (price locked)──> RequestRide ──ride row + log row 0──> dispatch job
                                                                                     │
      dispatcher worker: candidates from the H3 disk around the pickup, ranked by ETA;
      OFFER script (driver available -> offered, a lease) ─ log "offer:<id>" ─ wait
          │ driver AcceptOffer: ACCEPT script (offered -> assigned) ─ log "accept:<id>"
          │ decline / deadline: RELEASE script (offered -> available) ─ log "lapse:<id>", next driver
          └ nobody left: log "cancel:nodriver"
      driver UpdateTrip: arriving -> in_progress -> completed (FINISH script: driver available)

The driver's state lives in Redis and changes only in Lua scripts atomic on
that driver (servers/rides/drivers.py): that is what makes a double
assignment impossible. The ride's state lives in the table port as a log
whose rows are claimed IF NOT EXISTS (servers/rides/tables.py): that is what
makes every transition idempotent and lets racing writers agree. A dispatch
runs as a job of a Redis Streams consumer group: when its process dies, the
job is claimed by another dispatcher after ``dispatch_claim_ms``, which reads
the ride's log and carries on from there (an open offer is waited out, then
released).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from servers.platform.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from servers.platform.runtime import Runtime
from servers.rides import geo
from servers.rides.drivers import DriverIndex, PingArgs, PingBatcher, PingRefused, seen_key
from servers.rides.geo import FareParts, RidesSettings
from servers.rides.signals import Signals
from servers.rides.tables import (
    RIDE_LOG,
    RIDE_OFFERS,
    RIDE_QUOTES,
    RIDES,
    RIDES_BY_DRIVER,
    RIDES_BY_RIDER,
)
from servers.storage.queue import JobQueue
from servers.storage.redis_conn import key
from servers.storage.table import Row

log = structlog.get_logger("sysdesign.rides")

# RideState / CancelReason numbers of sysdesign.rides.v1.
REQUESTED, OFFERED, ACCEPTED, ARRIVING, IN_PROGRESS, COMPLETED, CANCELLED = 1, 2, 3, 4, 5, 6, 7
ENDED = {COMPLETED, CANCELLED}
BY_RIDER, NO_DRIVER = 1, 2

DISPATCH_STREAM = key("q:rides:dispatch")
DISPATCH_GROUP = "dispatch"
SURGE_CELLS = key("rides:surge", "cells")
SURGE_LOCK = key("rides:surge", "lock")
# How long a wait lasts before looking again without a signal (signals are best effort).
FREE_RECHECK_S = 1.0
OFFER_RECHECK_S = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


def dispatch_queue(redis: Any) -> JobQueue:
    s = RidesSettings()
    return JobQueue(redis, DISPATCH_STREAM, DISPATCH_GROUP, max_attempts=20, claim_idle_ms=s.dispatch_claim_ms)


def version_key(ride_id: int) -> str:
    return key(f"rides:r:{ride_id}", "v")


def active_key(rider_id: int) -> str:
    return key(f"rides:u:{rider_id}", "active")


def demand_key(cell: str) -> str:
    return key(f"rides:s:{cell}", "req")


def surge_key(cell: str) -> str:
    return key(f"rides:s:{cell}", "m")


def open_rides_key(cell: str) -> str:
    """GEO set of the rides not ended yet whose pickup lies in the cell (for the live map)."""
    return key(f"rides:c:{cell}", "open")


def summary_key(ride_id: int) -> str:
    """A ride's state, driver and dropoff, for the live map."""
    return key(f"rides:r:{ride_id}", "sum")


# KEYS[1] the rider's active-ride key. ARGV ride. Deletes it only if it still names the ride.
_CLEAR_ACTIVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# -- quotes ---------------------------------------------------------------------------------

def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@dataclass(frozen=True)
class Quote:
    nonce: str
    rider_id: int
    pickup: tuple[float, float]
    dropoff: tuple[float, float]
    fare: FareParts
    currency: str
    distance_m: int
    duration_s: int
    cell: str
    expire_ms: int

    def claims(self) -> dict[str, Any]:
        return {"n": self.nonce, "r": self.rider_id, "p": list(self.pickup), "d": list(self.dropoff),
                "f": [self.fare.base, self.fare.distance, self.fare.time, self.fare.surge_milli],
                "c": self.currency, "dm": self.distance_m, "ds": self.duration_s, "cell": self.cell,
                "exp": self.expire_ms}


class QuoteSigner:
    """Quote ids are the quote itself, signed (HMAC-SHA256 under a key derived
    from the process's secret), so any replica can check one without a lookup."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, b"sysdesign.rides.v1 quote", hashlib.sha256).digest()

    def sign(self, q: Quote) -> str:
        body = _b64(json.dumps(q.claims(), separators=(",", ":")).encode())
        return f"{body}.{_b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())}"

    def verify(self, token: str, rider_id: int, at_ms: int) -> Quote:
        bad = InvalidArgument([("quote_id", "is not a quote this service issued")])
        body, _, sig = token.partition(".")
        try:
            ok = hmac.compare_digest(_unb64(sig), hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise bad
        try:
            c = json.loads(_unb64(body))
            q = Quote(str(c["n"]), int(c["r"]), (float(c["p"][0]), float(c["p"][1])),
                      (float(c["d"][0]), float(c["d"][1])), FareParts(*(int(x) for x in c["f"])),
                      str(c["c"]), int(c["dm"]), int(c["ds"]), str(c["cell"]), int(c["exp"]))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise bad from exc
        # Someone else's quote is, to this caller, not a quote at all.
        if q.rider_id != rider_id:
            raise bad
        if q.expire_ms < at_ms:
            raise InvalidArgument([("quote_id", "has expired: ask for a new quote")])
        return q


# -- rides ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RideView:
    header: Row
    now: Row

    @property
    def ride_id(self) -> int:
        return int(self.header["ride_id"])

    @property
    def state(self) -> int:
        return int(self.now["state"])

    @property
    def rider_id(self) -> int:
        return int(self.header["rider_id"])

    @property
    def driver_id(self) -> int:
        return int(self.now["driver_id"] or 0)

    @property
    def pickup(self) -> tuple[float, float]:
        return float(self.header["pickup_lat"]), float(self.header["pickup_lng"])


class BadTransition(Exception):
    def __init__(self, now: Row) -> None:
        super().__init__(f"ride is in state {now['state']}")
        self.now = now


@dataclass(frozen=True)
class Candidate:
    driver_id: int
    eta_s: float
    distance_m: float


class RidesCore:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.s = RidesSettings()
        self.tables = rt.tables
        self.redis = rt.redis
        self.signals = Signals(rt.redis)
        self.index = DriverIndex(rt.redis, self.s, self.signals)
        self.pings = PingBatcher(self.index)
        self.quotes = QuoteSigner(rt.config.secret())
        self.queue = dispatch_queue(rt.redis)
        self._clear_active = rt.redis.register_script(_CLEAR_ACTIVE)
        # Set when shutdown starts: the watch streams end, telling clients to reconnect.
        self.closing = asyncio.Event()
        # Drivers this process is making an offer to at this instant.
        self._offering: set[int] = set()

    @classmethod
    def for_runtime(cls, rt: Runtime) -> RidesCore:
        def make() -> RidesCore:
            core = cls(rt)
            rt.closers.append(core.signals.close)
            rt.closers.append(core.pings.close)
            return core
        return rt.singleton("rides_core", make)

    # -- quotes and requests ---------------------------------------------------------------

    async def surge_of(self, cell: str) -> int:
        raw = await self.redis.get(surge_key(cell))
        return max(1000, int(raw)) if raw else 1000

    async def get_quote(self, rider_id: int, pickup: tuple[float, float], dropoff: tuple[float, float]
                        ) -> tuple[Quote, str, float | None]:
        at = now_ms()
        hour = datetime.now().hour
        road = geo.road_m(self.s, *pickup, *dropoff)
        secs = geo.trip_seconds(self.s, road, hour)
        cell = geo.cell_of(self.s, *pickup)
        surge = await self.surge_of(cell)
        q = Quote(secrets.token_urlsafe(12), rider_id, pickup, dropoff, geo.fare(self.s, road, secs, surge),
                  self.s.currency, round(road), round(secs), cell, at + self.s.quote_ttl_s * 1000)
        cands = await self.candidates(pickup, exclude=set(), at=at, count=10)
        eta = cands[0].eta_s if cands else None
        return q, self.quotes.sign(q), eta

    async def request_ride(self, rider_id: int, quote_id: str) -> RideView:
        at = now_ms()
        q = self.quotes.verify(quote_id, rider_id, at)
        ride_id = self.rt.snowflake.next_id()
        # The rider's one-ride lock first: a retry of a booking that went through finds it
        # held, and only then is the quote's record read (one read fewer on the hot path).
        if not await self.redis.set(active_key(rider_id), str(ride_id), nx=True, ex=86_400):
            held = await self.redis.get(active_key(rider_id))
            used = await self.tables.get(RIDE_QUOTES, {"quote_nonce": q.nonce})
            if used is not None:
                return await self._finish_booking(q, int(used["ride_id"]), at)
            held_id = int(held) if held else 0
            if held_id:
                view = await self.ride(held_id)
                if view is None or view.state in ENDED:  # a lock its ride did not clear
                    await self._clear_active(keys=[active_key(rider_id)], args=[held_id])
                    return await self.request_ride(rider_id, quote_id)
            raise FailedPrecondition("you already have a ride that has not ended", reason="RIDE_IN_PROGRESS",
                                     subject=f"rides/{held_id}")
        if not await self.tables.put(RIDE_QUOTES, {"quote_nonce": q.nonce, "ride_id": ride_id,
                                                   "rider_id": rider_id}, if_not_exists=True):
            await self._clear_active(keys=[active_key(rider_id)], args=[ride_id])
            used = await self.tables.get(RIDE_QUOTES, {"quote_nonce": q.nonce})
            assert used is not None
            return await self._finish_booking(q, int(used["ride_id"]), at)
        return await self._finish_booking(q, ride_id, at, fresh=True)

    async def _finish_booking(self, q: Quote, ride_id: int, at: int, *, fresh: bool = False) -> RideView:
        """Writes what a booking leaves (header, log row 0, index, job); each step is
        idempotent, so a retry after a crash completes a half-made booking. ``fresh``:
        the quote was claimed just now, so there is nothing to read back first."""
        if not fresh:
            view = await self.ride(ride_id)
            if view is not None:
                return view
        header = {
            "ride_id": ride_id, "rider_id": q.rider_id, "quote_nonce": q.nonce,
            "pickup_lat": q.pickup[0], "pickup_lng": q.pickup[1],
            "dropoff_lat": q.dropoff[0], "dropoff_lng": q.dropoff[1],
            "currency": q.currency, "total_minor": q.fare.total, "base_minor": q.fare.base,
            "distance_minor": q.fare.distance, "time_minor": q.fare.time, "surge_milli": q.fare.surge_milli,
            "distance_m": q.distance_m, "duration_s": q.duration_s, "pickup_cell": q.cell, "create_ms": at,
        }
        first = {"ride_id": ride_id, "seq": 0, "op": "request", "state": REQUESTED, "at_ms": at,
                 "driver_id": 0, "offer_id": 0, "offer_driver": 0, "offer_deadline_ms": 0, "asked": "",
                 "offers": 0, "cancel_reason": 0, "fee_minor": 0, "accept_ms": 0}
        # The three rows are independent (a reader needs header and log row 0, and a retry
        # writes whichever is missing); the job goes out only once both exist.
        _, _, claimed = await asyncio.gather(
            self.tables.put(RIDES, header),
            self.tables.put(RIDES_BY_RIDER, {"rider_id": q.rider_id, "ride_id": ride_id}),
            self.tables.put(RIDE_LOG, first, if_not_exists=True))
        await asyncio.gather(self.queue.enqueue({"ride_id": ride_id}), self._count_demand(q.cell, ride_id, at),
                             self._show_on_map(q, ride_id))
        if claimed:
            log.info("ride_requested", ride_id=ride_id, rider_id=q.rider_id, cell=q.cell)
            return RideView(header, first)
        view = await self.ride(ride_id)
        assert view is not None
        return view

    async def _show_on_map(self, q: Quote, ride_id: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(summary_key(ride_id), mapping={
                "st": REQUESTED, "drv": 0, "dlat": repr(q.dropoff[0]), "dlng": repr(q.dropoff[1])})
            pipe.expire(summary_key(ride_id), 86_400)
            pipe.geoadd(open_rides_key(q.cell), (q.pickup[1], q.pickup[0], str(ride_id)))
            await pipe.execute()

    # -- reading ---------------------------------------------------------------------------

    async def _log(self, ride_id: int) -> list[Row]:
        page = await self.tables.slice(RIDE_LOG, {"ride_id": ride_id}, limit=1000)
        return page.rows

    async def ride(self, ride_id: int) -> RideView | None:
        header = await self.tables.get(RIDES, {"ride_id": ride_id})
        if header is None:
            return None
        page = await self.tables.slice(RIDE_LOG, {"ride_id": ride_id}, limit=1, reverse=True)
        if not page.rows:
            return None
        return RideView(header, page.rows[0])

    async def ride_for(self, caller: int, ride_id: int) -> RideView:
        """A ride the caller rides or drives; NOT_FOUND for anything else."""
        view = await self.ride(ride_id)
        if view is None or caller not in (view.rider_id, view.driver_id):
            raise NotFound(f"no ride {ride_id}", reason="RIDE_NOT_FOUND")
        return view

    async def list_rides(self, rider_id: int, page_size: int, page_token: str) -> tuple[list[RideView], str]:
        page = await self.tables.slice(RIDES_BY_RIDER, {"rider_id": rider_id}, limit=page_size or 20,
                                       page_token=page_token)
        views = await asyncio.gather(*(self.ride(int(r["ride_id"])) for r in page.rows))
        return [v for v in views if v is not None], page.next_page_token

    async def version(self, ride_id: int) -> int:
        raw = await self.redis.get(version_key(ride_id))
        return int(raw) if raw else 0

    # -- transitions -----------------------------------------------------------------------

    async def transition(self, ride_id: int, op: str, allowed: set[int], state: int,
                         change: Callable[[Row], dict[str, Any]] | None = None) -> tuple[Row, bool]:
        """Appends the next log row, if the ride is in one of ``allowed``: returns (the
        ride now, whether this call moved it). An op already in the log is answered
        with the ride now; a state outside ``allowed`` raises BadTransition."""
        for _ in range(20):
            rows = await self._log(ride_id)
            if not rows:
                raise NotFound(f"no ride {ride_id}", reason="RIDE_NOT_FOUND")
            cur = rows[-1]
            if any(r["op"] == op for r in rows):
                return cur, False
            if int(cur["state"]) not in allowed:
                raise BadTransition(cur)
            new = {**cur, **(change(cur) if change else {}), "seq": int(cur["seq"]) + 1, "op": op,
                   "state": state, "at_ms": now_ms()}
            if await self.tables.put(RIDE_LOG, new, if_not_exists=True):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.incr(version_key(ride_id))
                    pipe.expire(version_key(ride_id), 86_400)
                    pipe.hset(summary_key(ride_id), mapping={"st": state, "drv": int(new["driver_id"] or 0)})
                    await pipe.execute()
                await self.signals.publish(f"r:{ride_id}")
                if state in ENDED:
                    header = await self.tables.get(RIDES, {"ride_id": ride_id})
                    if header is not None:
                        await self._clear_active(keys=[active_key(int(header["rider_id"]))], args=[ride_id])
                        await self.redis.zrem(open_rides_key(str(header["pickup_cell"])), str(ride_id))
                return new, True
        raise Unavailable("the ride is changing too fast; try again")

    async def cancel(self, caller: int, ride_id: int) -> RideView:
        view = await self.ride_for(caller, ride_id)
        if caller != view.rider_id:
            # A driver cannot cancel the rider's ride (they decline offers instead).
            raise NotFound(f"no ride {ride_id}", reason="RIDE_NOT_FOUND")
        at = now_ms()

        def fee(cur: Row) -> dict[str, Any]:
            accepted = int(cur["accept_ms"] or 0)
            late = int(cur["state"]) in (ACCEPTED, ARRIVING) and at - accepted > self.s.cancel_grace_s * 1000
            return {"cancel_reason": BY_RIDER, "fee_minor": self.s.cancel_fee_minor if late else 0,
                    "offer_id": 0, "offer_driver": 0}

        try:
            now, _ = await self.transition(ride_id, "cancel:rider", {REQUESTED, OFFERED, ACCEPTED, ARRIVING},
                                           CANCELLED, fee)
        except BadTransition as exc:
            if int(exc.now["state"]) == CANCELLED:
                return RideView(view.header, exc.now)
            raise FailedPrecondition("the trip has started or ended: it can no longer be cancelled",
                                     reason="RIDE_STARTED", subject=f"rides/{ride_id}") from exc
        # Free whoever held the ride: the accepted driver, or one with an open offer
        # (who may even have accepted it a moment ago).
        for d in {int(view.now["driver_id"] or 0), int(view.now["offer_driver"] or 0)} - {0}:
            await self.index.finish(d, ride_id)
        log.info("ride_cancelled", ride_id=ride_id, by="rider", fee_minor=now["fee_minor"])
        return RideView(view.header, now)

    # -- drivers ---------------------------------------------------------------------------

    async def ping(self, driver_id: int, lat: float, lng: float, heading: float, speed: float,
                   ts_ms: int) -> None:
        at = now_ms()
        if ts_ms > at + 10_000:
            raise PingRefused("time", "is more than 10 s in the future")
        await self.pings.ping(PingArgs(driver_id, lat, lng, heading, speed, ts_ms, at))

    async def offer_for(self, driver_id: int, offer_id: int) -> Row:
        row = await self.tables.get(RIDE_OFFERS, {"offer_id": offer_id})
        if row is None or int(row["driver_id"]) != driver_id:
            raise NotFound(f"no offer {offer_id}", reason="OFFER_NOT_FOUND")
        return row

    async def accept(self, driver_id: int, offer_id: int) -> RideView:
        offer = await self.offer_for(driver_id, offer_id)
        ride_id = int(offer["ride_id"])
        verdict, _ = await self.index.accept(driver_id, offer_id, now_ms())
        if verdict != "OK":
            # Maybe this driver accepted already and this is a retry.
            view = await self.ride(ride_id)
            if view is not None and view.driver_id == driver_id and any(
                    r["op"] == f"accept:{offer_id}" for r in await self._log(ride_id)):
                return view
            raise FailedPrecondition("the offer lapsed or was withdrawn", reason="OFFER_EXPIRED",
                                     subject=f"offers/{offer_id}")
        at = now_ms()
        try:
            # From REQUESTED too: the script just proved the offer was made and held,
            # even if the dispatcher has not logged it yet.
            now, _ = await self.transition(
                ride_id, f"accept:{offer_id}", {REQUESTED, OFFERED}, ACCEPTED,
                lambda cur: {"driver_id": driver_id, "offer_id": offer_id, "offer_driver": driver_id,
                             "accept_ms": at, "offers": max(1, int(cur["offers"] or 0))})
        except BadTransition as exc:
            await self.index.finish(driver_id, ride_id)
            raise FailedPrecondition("the ride was cancelled", reason="OFFER_EXPIRED",
                                     subject=f"offers/{offer_id}") from exc
        await self.tables.put(RIDES_BY_DRIVER, {"driver_id": driver_id, "ride_id": ride_id})
        view = await self.ride(ride_id)
        assert view is not None
        log.info("offer_accepted", ride_id=ride_id, driver_id=driver_id, offer_id=offer_id)
        return RideView(view.header, now)

    async def decline(self, driver_id: int, offer_id: int) -> None:
        await self.offer_for(driver_id, offer_id)
        await self.index.release(driver_id, offer_id)

    async def update_trip(self, driver_id: int, ride_id: int, state: int) -> RideView:
        view = await self.ride(ride_id)
        if view is None or view.driver_id != driver_id:
            raise NotFound(f"no ride {ride_id}", reason="RIDE_NOT_FOUND")
        allowed = {ARRIVING: {ACCEPTED}, IN_PROGRESS: {ACCEPTED, ARRIVING}, COMPLETED: {IN_PROGRESS}}[state]
        op = {ARRIVING: "arrive", IN_PROGRESS: "start", COMPLETED: "complete"}[state]
        try:
            now, _ = await self.transition(ride_id, op, allowed, state)
        except BadTransition as exc:
            # A step already taken (or passed: start without arriving) answers the ride as it is.
            if state <= int(exc.now["state"]) < CANCELLED:
                return RideView(view.header, exc.now)
            raise FailedPrecondition(f"the ride cannot move from state {exc.now['state']} to {state}",
                                     reason="BAD_TRANSITION", subject=f"rides/{ride_id}") from exc
        if state == COMPLETED:
            await self.index.finish(driver_id, ride_id)
        return RideView(view.header, now)

    # -- dispatch --------------------------------------------------------------------------

    async def candidates(self, pickup: tuple[float, float], *, exclude: set[int], at: int,
                         count: int = 20) -> list[Candidate]:
        """Available, fresh drivers near the pickup, ranked by ETA."""
        near = [n for n in await self.index.nearby(*pickup, at, count=count + len(exclude), available=True)
                if n.driver_id not in exclude]
        views = await self.index.views([n.driver_id for n in near])
        hour = datetime.now().hour
        out = []
        for n, v in zip(near, views, strict=True):
            if v is None or v.state != "available":
                continue
            eta = geo.pickup_eta_s(self.s, driver=(v.lat, v.lng), heading=v.heading, moving_mps=v.speed,
                                   pickup=pickup, hour=hour)
            out.append(Candidate(n.driver_id, eta, n.distance_m))
        out.sort(key=lambda c: (c.eta_s, c.driver_id))
        return out

    def _search_cells(self, pickup: tuple[float, float]) -> frozenset[str]:
        return frozenset(geo.cells_around(self.s, *pickup, self.s.search_radius_m))

    async def dispatch(self, ride_id: int) -> None:
        """Finds the ride a driver, from wherever its log says it is (the dispatcher's job)."""
        waited_since = 0.0
        while True:
            view = await self.ride(ride_id)
            if view is None:
                log.warning("dispatch_unknown_ride", ride_id=ride_id)
                return
            cur = view.now
            state = int(cur["state"])
            if state != REQUESTED and state != OFFERED:
                return
            if state == OFFERED:
                await self._await_offer(view)
                continue
            asked = {int(x) for x in str(cur["asked"] or "").split(",") if x}
            if int(cur["offers"] or 0) >= self.s.max_offers:
                await self._no_driver(ride_id)
                return
            offered = None
            # Registered before the search, so a driver freed during it still wakes this ride.
            with self.signals.on_free(self._search_cells(view.pickup)) as freed:
                at = now_ms()
                for cand in await self.candidates(view.pickup, exclude=asked | self._offering, at=at):
                    offer_id = self.rt.snowflake.next_id()
                    deadline = at + int(self.s.offer_timeout_s * 1000)
                    # Other rides of this process skip a driver being offered one right now.
                    self._offering.add(cand.driver_id)
                    try:
                        # The offer's row first: a driver told of an offer can always read it (an
                        # offer that is not made leaves a row no driver's state points to).
                        await self.tables.put(RIDE_OFFERS, {"offer_id": offer_id, "ride_id": ride_id,
                                                            "driver_id": cand.driver_id, "deadline_ms": deadline,
                                                            "eta_s": int(cand.eta_s)})
                        got = await self.index.offer(cand.driver_id, offer_id, ride_id, deadline, at)
                    finally:
                        self._offering.discard(cand.driver_id)
                    if got:
                        offered = (cand, offer_id, deadline)
                        break
                if offered is None:
                    loop = asyncio.get_running_loop()
                    waited_since = waited_since or loop.time()
                    left = self.s.no_driver_wait_s - (loop.time() - waited_since)
                    if left <= 0:
                        await self._no_driver(ride_id)
                        return
                    # Woken by a driver coming free nearby; looks again anyway after a second
                    # (a driver who just came online sends no signal).
                    await freed.wait(min(left, FREE_RECHECK_S))
                    continue
            waited_since = 0.0
            cand, offer_id, deadline = offered
            def made(cur: Row, c: Candidate = cand, o: int = offer_id, d: int = deadline) -> dict[str, Any]:
                return {"offer_id": o, "offer_driver": c.driver_id, "offer_deadline_ms": d,
                        "asked": ",".join(x for x in (str(cur["asked"] or ""), str(c.driver_id)) if x),
                        "offers": int(cur["offers"] or 0) + 1}

            try:
                await self.transition(ride_id, f"offer:{offer_id}", {REQUESTED}, OFFERED, made)
            except BadTransition:
                # The ride moved on (cancelled, or accepted through another offer).
                await self.index.release(cand.driver_id, offer_id)
                continue
            log.info("offer_made", ride_id=ride_id, driver_id=cand.driver_id, offer_id=offer_id,
                     eta_s=round(cand.eta_s, 1))

    async def _await_offer(self, view: RideView) -> None:
        """Waits out the open offer: accepted, declined or lapsed, then logs which."""
        cur = view.now
        driver, offer_id, deadline = int(cur["offer_driver"]), int(cur["offer_id"]), int(cur["offer_deadline_ms"])
        with self.signals.on("o", offer_id) as settled:
            while (left := deadline + 250 - now_ms()) > 0:
                v = await self.index.view(driver)
                if v is None or v.offer_id != offer_id or v.state != "offered":
                    break
                # Woken when the driver accepts or declines; looks again every second anyway.
                await settled.wait(min(left / 1000, OFFER_RECHECK_S))
        verdict, _ = await self.index.release(driver, offer_id)
        if verdict == "ACCEPTED":
            # The driver's AcceptOffer logs it; log it here too in case that call died half-way.
            at = now_ms()
            try:
                await self.transition(view.ride_id, f"accept:{offer_id}", {REQUESTED, OFFERED}, ACCEPTED,
                                      lambda c: {"driver_id": driver, "accept_ms": at})
                await self.tables.put(RIDES_BY_DRIVER, {"driver_id": driver, "ride_id": view.ride_id})
            except BadTransition:
                pass
            return
        try:
            await self.transition(view.ride_id, f"lapse:{offer_id}", {OFFERED}, REQUESTED,
                                  lambda c: {"offer_id": 0, "offer_driver": 0, "offer_deadline_ms": 0})
        except BadTransition:
            pass

    async def _no_driver(self, ride_id: int) -> None:
        try:
            await self.transition(ride_id, "cancel:nodriver", {REQUESTED}, CANCELLED,
                                  lambda c: {"cancel_reason": NO_DRIVER})
            log.info("ride_unmatched", ride_id=ride_id)
        except BadTransition:
            pass

    # -- surge -----------------------------------------------------------------------------

    async def _count_demand(self, cell: str, ride_id: int, at: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(demand_key(cell), {str(ride_id): at})
            pipe.expire(demand_key(cell), self.s.surge_window_s * 2)
            await pipe.execute()
        await self.redis.zadd(SURGE_CELLS, {cell: at})

    async def sweep_surge(self) -> int:
        """Recomputes the surge of every cell with recent demand (one replica per period)."""
        if not await self.redis.set(SURGE_LOCK, "1", nx=True, px=max(100, int(self.s.surge_every_s * 900))):
            return 0
        at = now_ms()
        window = self.s.surge_window_s * 1000
        await self.redis.zremrangebyscore(SURGE_CELLS, "-inf", at - window)
        cells = [c.decode() if isinstance(c, bytes) else str(c)
                 for c in await self.redis.zrangebyscore(SURGE_CELLS, at - window, "+inf")]
        for cell in cells:
            await self.redis.zremrangebyscore(demand_key(cell), "-inf", at - window)
            demand = int(await self.redis.zcard(demand_key(cell)))
            supply = await self.supply(cell, at)
            prev = await self.surge_of(cell)
            m = geo.surge_from(demand, supply, prev, self.s.surge_cap_milli)
            await self.redis.set(surge_key(cell), str(m), ex=self.s.surge_window_s)
        return len(cells)

    async def supply(self, cell: str, at: int) -> int:
        ids = [int(x) for x in await self.redis.zrangebyscore(seen_key(cell), at - int(self.s.fresh_s * 1000),
                                                              "+inf")]
        views = await self.index.views(ids)
        return sum(1 for v in views if v is not None and v.state == "available")

