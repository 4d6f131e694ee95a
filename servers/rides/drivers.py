"""Where drivers are and what each holds: Redis, with every state change in one Lua script.

Keys (each driver and each cell its own hash tag, so everything runs on Redis Cluster)::

    {rides:d:<driver>}:st       hash: st (available | offered | assigned | offline), ride, offer,
                                odl (the offer's deadline, ms), lat, lng, hd, sp, ts (device ms),
                                rts (server ms of the last ping), cell
    {rides:c:<cell>}:geo        GEO set of the online drivers whose last ping fell in the H3 cell
    {rides:c:<cell>}:seen       sorted set driver -> server ms of their last ping (freshness)
    {rides:c:<cell>}:avail      GEO set of those who were available at their last ping: a hint
                                for the candidate search (a driver is taken out when offered a
                                ride, put back by their next ping once free); the scripts on the
                                driver's own key decide

No key holds a whole city: a nearby query asks the cells of the H3 disk around
the pickup, one script per cell, and drops (and removes) drivers silent for the
freshness window as it goes.

Every change that someone may be waiting for is also signalled on
``{rides:signals}`` (servers/rides/signals.py) so waiters wake at once
instead of polling.

A driver moves available -> offered -> assigned -> available only through
the scripts below, each atomic on the driver's own key, so two dispatchers can
never hand one driver two offers or two rides. An offer is a lease: past its
deadline (plus a short grace) it no longer holds the driver, even if the
dispatcher that made it died before it could say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import h3
from redis.exceptions import NoScriptError

from servers.rides.geo import RidesSettings, cell_of, cells_around
from servers.rides.signals import Signals
from servers.storage.redis_conn import key, queue_evalsha

# An offer whose deadline passed this long ago no longer holds its driver.
LEASE_GRACE_MS = 2000


def state_key(driver_id: int) -> str:
    return key(f"rides:d:{driver_id}", "st")


def offers_channel(driver_id: int) -> str:
    return key(f"rides:d:{driver_id}", "offers")


def geo_key(cell: str) -> str:
    return key(f"rides:c:{cell}", "geo")


def seen_key(cell: str) -> str:
    return key(f"rides:c:{cell}", "seen")


def avail_key(cell: str) -> str:
    return key(f"rides:c:{cell}", "avail")


# Shared by the scripts: an offer past its lease is no offer.
_LAPSED = f"""
local function lapsed(st, odl, now)
  return st == 'offered' and (tonumber(odl) or 0) + {LEASE_GRACE_MS} < now
end
"""

# KEYS[1] state. ARGV lat lng heading speed ts now max_mps cell.
# -> {'OK', old_cell, state} or {'BACKWARDS'|'TOO_FAST', detail}
_PING = _LAPSED + """
local f = redis.call('HMGET', KEYS[1], 'ts', 'lat', 'lng', 'st', 'cell', 'odl')
local lat, lng, ts, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5]), tonumber(ARGV[6])
local st = f[4] or 'offline'
if f[1] then
  local pts = tonumber(f[1])
  -- The very ping already stored (a pipeline resent after a lost reply): accepted once.
  if ts == pts and ARGV[1] == f[2] and ARGV[2] == f[3] then return {'OK', f[5] or '', st} end
  if ts <= pts then return {'BACKWARDS', tostring(pts)} end
  local plat, plng = math.rad(tonumber(f[2])), math.rad(tonumber(f[3]))
  local rlat, rlng = math.rad(lat), math.rad(lng)
  local a = math.sin((rlat - plat) / 2) ^ 2 + math.cos(plat) * math.cos(rlat) * math.sin((rlng - plng) / 2) ^ 2
  local d = 2 * 6371008.8 * math.asin(math.min(1, math.sqrt(a)))
  local dt = (ts - pts) / 1000
  -- 50 m of GPS jitter is allowed whatever the interval.
  if d > 50 and d / dt > tonumber(ARGV[7]) then return {'TOO_FAST', tostring(math.floor(d / dt))} end
end
if st == 'offline' or lapsed(st, f[6], now) then
  st = 'available'
  redis.call('HDEL', KEYS[1], 'offer', 'odl', 'ride')
end
redis.call('HSET', KEYS[1], 'lat', ARGV[1], 'lng', ARGV[2], 'hd', ARGV[3], 'sp', ARGV[4], 'ts', ARGV[5],
           'rts', ARGV[6], 'cell', ARGV[8], 'st', st)
redis.call('EXPIRE', KEYS[1], 86400)
return {'OK', f[5] or '', st}
"""

# KEYS[1] geo, KEYS[2] seen, KEYS[3] avail. ARGV lng lat driver now state.
_PLACE = """
redis.call('GEOADD', KEYS[1], ARGV[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
if ARGV[5] == 'available' then
  redis.call('GEOADD', KEYS[3], ARGV[1], ARGV[2], ARGV[3])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], 86400) end
return 1
"""

# KEYS[1] geo, KEYS[2] seen, KEYS[3] avail. ARGV driver.
_UNPLACE = """
for i = 1, 3 do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""

# KEYS[1] the set searched (geo or avail), KEYS[2] seen, KEYS[3] geo, KEYS[4] avail.
# ARGV lng lat radius_m count cutoff_ms cell_area_m2.
# -> flat {driver, dist_m, lng, lat, ...} nearest first, fresh only; stale ones are removed.
_NEARBY = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5], 'LIMIT', 0, 1000)
for _, d in ipairs(stale) do
  for i = 2, 4 do redis.call('ZREM', KEYS[i], d) end
end
local function search(radius)
  return redis.call('GEOSEARCH', KEYS[1], 'FROMLONLAT', ARGV[1], ARGV[2], 'BYRADIUS', radius, 'm',
                    'ASC', 'COUNT', ARGV[4], 'WITHDIST', 'WITHCOORD')
end
-- GEOSEARCH looks at every member in the area before it sorts, so in a dense cell a
-- circle that should hold about 4 x count members is searched first; only when it
-- holds fewer than count is the whole radius searched. Either way the answer is the
-- count nearest within the radius, and its cost stays flat however many are online.
local radius, count, n = tonumber(ARGV[3]), tonumber(ARGV[4]), redis.call('ZCARD', KEYS[1])
local hits
if n > 4 * count then
  local need = math.max(30, math.sqrt(4 * count * tonumber(ARGV[6]) / (math.pi * n)))
  if need < radius then
    hits = search(need)
    if #hits < count then hits = nil end
  end
end
if not hits then hits = search(radius) end
local out = {}
for _, h in ipairs(hits) do
  out[#out + 1] = h[1]
  out[#out + 1] = h[2]
  out[#out + 1] = h[3][1]
  out[#out + 1] = h[3][2]
end
return out
"""

# KEYS[1] state. ARGV offer ride deadline_ms now fresh_ms.
# -> {1, cell} offered, {0, cell} not available (so the caller can drop the hint).
_OFFER = _LAPSED + """
local f = redis.call('HMGET', KEYS[1], 'st', 'rts', 'odl', 'cell')
local now = tonumber(ARGV[4])
local st = f[1]
local cell = f[4] or ''
if lapsed(st, f[3], now) then st = 'available' end
if st ~= 'available' then return {0, cell} end
if not f[2] or tonumber(f[2]) < now - tonumber(ARGV[5]) then return {0, cell} end
redis.call('HSET', KEYS[1], 'st', 'offered', 'offer', ARGV[1], 'ride', ARGV[2], 'odl', ARGV[3])
return {1, cell}
"""

# A freed driver's {cell, lng, lat}, so the caller can put them back among the candidates.
_FREE = """
local function free(key)
  redis.call('HSET', key, 'st', 'available')
  redis.call('HDEL', key, 'offer', 'odl', 'ride')
  local p = redis.call('HMGET', key, 'cell', 'lng', 'lat')
  return {p[1] or '', p[2] or '', p[3] or ''}
end
"""

# KEYS[1] state. ARGV offer now. -> {'OK', ride} | {'EXPIRED', ride, cell, lng, lat} | {'GONE', ''}
_ACCEPT = _LAPSED + _FREE + """
local f = redis.call('HMGET', KEYS[1], 'st', 'offer', 'ride', 'odl')
if f[2] ~= ARGV[1] then return {'GONE', ''} end
if f[1] == 'assigned' then return {'OK', f[3]} end
if f[1] ~= 'offered' then return {'GONE', ''} end
if tonumber(f[4]) < tonumber(ARGV[2]) then
  local p = free(KEYS[1])
  return {'EXPIRED', f[3], p[1], p[2], p[3]}
end
redis.call('HSET', KEYS[1], 'st', 'assigned')
return {'OK', f[3]}
"""

# KEYS[1] state. ARGV offer. Frees a driver still holding the offer (declined or lapsed).
# -> {'RELEASED', ride, cell, lng, lat} | {'ACCEPTED', ride} | {'GONE', ''}
_RELEASE = _FREE + """
local f = redis.call('HMGET', KEYS[1], 'st', 'offer', 'ride')
if f[2] ~= ARGV[1] then return {'GONE', ''} end
if f[1] == 'assigned' then return {'ACCEPTED', f[3]} end
if f[1] == 'offered' then
  local p = free(KEYS[1])
  return {'RELEASED', f[3], p[1], p[2], p[3]}
end
return {'GONE', ''}
"""

# KEYS[1] state. ARGV ride. The ride ended: a driver holding it (offered or assigned) is free.
# -> {1, cell, lng, lat} | {0}
_FINISH = _FREE + """
local f = redis.call('HMGET', KEYS[1], 'st', 'ride')
if f[2] ~= ARGV[1] then return {0} end
if f[1] == 'offered' or f[1] == 'assigned' then
  local p = free(KEYS[1])
  return {1, p[1], p[2], p[3]}
end
return {0}
"""

# KEYS[1] state. The stream closed: an available driver goes offline (one holding a ride does not).
# -> the cell to leave, or ''.
_OFFLINE = _LAPSED + """
local f = redis.call('HMGET', KEYS[1], 'st', 'cell', 'odl')
local st = f[1]
if lapsed(st, f[3], tonumber(ARGV[1])) then st = 'available' end
if st == 'available' then
  redis.call('HSET', KEYS[1], 'st', 'offline')
  redis.call('HDEL', KEYS[1], 'offer', 'odl', 'ride')
  return f[2] or ''
end
return ''
"""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class Nearby:
    driver_id: int
    distance_m: float
    lat: float
    lng: float


@dataclass(frozen=True)
class DriverView:
    driver_id: int
    state: str
    lat: float
    lng: float
    heading: float
    speed: float
    ts_ms: int
    seen_ms: int
    ride_id: int
    offer_id: int
    offer_deadline_ms: int


@dataclass(frozen=True)
class PingArgs:
    driver_id: int
    lat: float
    lng: float
    heading: float
    speed: float
    ts_ms: int
    now_ms: int


class PingBatcher:
    """Group commit for pings: every ping that arrives while a batch is on its way to
    Redis goes out in the next one, so under load a ping costs a fraction of a round
    trip and at rest it goes out at once. Up to ``flights`` batches travel at a time
    (a driver's stream waits for its ping, so one driver never has two in flight)."""

    MAX_BATCH = 1000

    def __init__(self, index: DriverIndex, flights: int = 4) -> None:
        self.index = index
        self._pending: list[tuple[PingArgs, asyncio.Future[str]]] = []
        self._flights = asyncio.Semaphore(flights)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flying: set[asyncio.Task[None]] = set()

    async def ping(self, p: PingArgs) -> str:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rides-pings")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((p, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._flights.acquire()
                batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
                t = asyncio.create_task(self._flush(batch))
                self._flying.add(t)
                t.add_done_callback(self._flying.discard)

    async def _flush(self, batch: list[tuple[PingArgs, asyncio.Future[str]]]) -> None:
        try:
            results = await self.index.ping_many([p for p, _ in batch])
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), r in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, PingRefused):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)
        finally:
            self._flights.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None


class PingRefused(Exception):
    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


class DriverIndex:
    def __init__(self, redis: Any, settings: RidesSettings, signals: Signals | None = None) -> None:
        self.redis = redis
        self.s = settings
        self.signals = signals
        self._cell_area_m2 = round(h3.average_hexagon_area(settings.shard_res, "m^2"))
        self._ping = redis.register_script(_PING)
        self._place = redis.register_script(_PLACE)
        self._unplace = redis.register_script(_UNPLACE)
        self._nearby = redis.register_script(_NEARBY)
        self._offer = redis.register_script(_OFFER)
        self._accept = redis.register_script(_ACCEPT)
        self._release = redis.register_script(_RELEASE)
        self._finish = redis.register_script(_FINISH)
        self._offline = redis.register_script(_OFFLINE)

    async def ping(self, driver_id: int, lat: float, lng: float, heading: float, speed: float,
                   ts_ms: int, now_ms: int) -> str:
        """Records a ping; returns the driver's state. Raises PingRefused."""
        cell = cell_of(self.s, lat, lng)
        out = await self._ping(keys=[state_key(driver_id)], args=[
            repr(lat), repr(lng), repr(heading), repr(speed), ts_ms, now_ms,
            self.s.max_speed_kmh / 3.6, cell])
        verdict = _s(out[0])
        if verdict == "BACKWARDS":
            raise PingRefused("time", f"must be later than the previous ping ({_s(out[1])} ms)")
        if verdict == "TOO_FAST":
            raise PingRefused("position", f"is {_s(out[1])} m/s from the previous ping, faster than "
                                          f"{self.s.max_speed_kmh:.0f} km/h")
        old = _s(out[1])
        state = _s(out[2])
        await self._place(keys=[geo_key(cell), seen_key(cell), avail_key(cell)],
                          args=[repr(lng), repr(lat), driver_id, now_ms, state])
        if old and old != cell:
            await self._unplace(keys=[geo_key(old), seen_key(old), avail_key(old)], args=[driver_id])
        return state

    async def ping_many(self, pings: list[PingArgs]) -> list[str | PingRefused]:
        """``ping`` for many drivers in two round trips: every PING script in one
        pipeline, then every PLACE (and UNPLACE) in another. Each driver's own
        order is the caller's to keep (one ping in flight per driver)."""
        cells = [cell_of(self.s, p.lat, p.lng) for p in pings]
        outs = await self._pipelined(self._ping, [
            ([state_key(p.driver_id)], [repr(p.lat), repr(p.lng), repr(p.heading), repr(p.speed), p.ts_ms,
                                        p.now_ms, self.s.max_speed_kmh / 3.6, cell])
            for p, cell in zip(pings, cells, strict=True)])
        results: list[str | PingRefused] = []
        places: list[tuple[list[str], list[Any]]] = []
        unplaces: list[tuple[list[str], list[Any]]] = []
        for p, cell, out in zip(pings, cells, outs, strict=True):
            verdict = _s(out[0])
            if verdict == "BACKWARDS":
                results.append(PingRefused("time", f"must be later than the previous ping ({_s(out[1])} ms)"))
                continue
            if verdict == "TOO_FAST":
                results.append(PingRefused("position", f"is {_s(out[1])} m/s from the previous ping, faster "
                                                       f"than {self.s.max_speed_kmh:.0f} km/h"))
                continue
            old, state = _s(out[1]), _s(out[2])
            places.append(([geo_key(cell), seen_key(cell), avail_key(cell)],
                           [repr(p.lng), repr(p.lat), p.driver_id, p.now_ms, state]))
            if old and old != cell:
                unplaces.append(([geo_key(old), seen_key(old), avail_key(old)], [p.driver_id]))
            results.append(state)
        if places:
            await self._pipelined(self._place, places)
        if unplaces:
            await self._pipelined(self._unplace, unplaces)
        return results

    async def go_offline(self, driver_id: int, now_ms: int) -> None:
        cell = _s(await self._offline(keys=[state_key(driver_id)], args=[now_ms]))
        if cell:
            await self._unplace(keys=[geo_key(cell), seen_key(cell), avail_key(cell)], args=[driver_id])

    async def nearby(self, lat: float, lng: float, now_ms: int, *, count: int = 20,
                     radius_m: int | None = None, available: bool = False) -> list[Nearby]:
        """Fresh online drivers near a point, nearest first: the ``count`` nearest within
        ``radius_m`` (search_radius_m by default), searched in widening circles so a dense
        city costs no more than a quiet one. With ``available``, only those who were
        available at their last ping (a hint: the OFFER script decides)."""
        cutoff = now_ms - int(self.s.fresh_s * 1000)
        steps = [r for r in self.s.search_steps() if radius_m is None or r < radius_m]
        steps = [*steps, radius_m] if radius_m is not None else steps
        found: list[Nearby] = []
        for radius in steps:
            cells = cells_around(self.s, lat, lng, radius)
            results = await self._pipelined(self._nearby, [
                ([avail_key(c) if available else geo_key(c), seen_key(c), geo_key(c), avail_key(c)],
                 [repr(lng), repr(lat), radius, count, cutoff, self._cell_area_m2]) for c in cells])
            found = []
            for flat in results:
                for i in range(0, len(flat), 4):
                    found.append(Nearby(int(_s(flat[i])), float(_s(flat[i + 1])),
                                        float(_s(flat[i + 3])), float(_s(flat[i + 2]))))
            if len(found) >= count:
                break
        found.sort(key=lambda n: n.distance_m)
        return found[:count]

    async def views(self, driver_ids: list[int]) -> list[DriverView | None]:
        if not driver_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in driver_ids:
                pipe.hgetall(state_key(d))
            rows = await pipe.execute()
        return [self._view(d, r) for d, r in zip(driver_ids, rows, strict=True)]

    async def view(self, driver_id: int) -> DriverView | None:
        return self._view(driver_id, await self.redis.hgetall(state_key(driver_id)))

    def _view(self, driver_id: int, raw: dict[Any, Any]) -> DriverView | None:
        if not raw:
            return None
        r = {_s(k): _s(v) for k, v in raw.items()}

        def num(name: str) -> float:
            try:
                v = float(r.get(name) or 0)
            except ValueError:
                return 0.0
            return v if math.isfinite(v) else 0.0

        st = r.get("st", "offline")
        if st == "offered" and num("odl") + LEASE_GRACE_MS < _now_ms():
            st = "available"
        return DriverView(driver_id, st, num("lat"), num("lng"), num("hd"), num("sp"), int(num("ts")),
                          int(num("rts")), int(num("ride")), int(num("offer")), int(num("odl")))

    async def _pipelined(self, script: Any, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One script run for each (keys, args), in one pipeline (one round trip)."""
        if len(calls) == 1:
            return [await script(keys=calls[0][0], args=calls[0][1])]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    queue_evalsha(pipe, script.sha, len(keys), *keys, *args)
                got = await pipe.execute(raise_on_error=False)
            missing = []
            for i, r in zip(todo, got, strict=True):
                results[i] = r
                if isinstance(r, NoScriptError) and attempt == 0:
                    missing.append(i)
            if not missing:
                break
            # A restarted or new node has not seen the script: load it and run again only the
            # calls that raised NOSCRIPT (they never ran; the others did and must not run twice).
            await self.redis.script_load(script.script)
            todo = missing
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def _signal(self, *messages: str) -> None:
        if self.signals is not None:
            await self.signals.publish(*messages)

    async def offer(self, driver_id: int, offer_id: int, ride_id: int, deadline_ms: int, now_ms: int) -> bool:
        out = await self._offer(keys=[state_key(driver_id)], args=[
            offer_id, ride_id, deadline_ms, now_ms, int(self.s.fresh_s * 1000)])
        cell = _s(out[1])
        made = bool(int(out[0]))
        if cell:
            # Offered or busy, they are not a candidate now: their next ping puts them back once free.
            await self.redis.zrem(avail_key(cell), str(driver_id))
        if made:
            await self._signal(f"d:{driver_id}")
        return made

    async def _candidate_again(self, driver_id: int, where: list[Any], *signals: str) -> None:
        """A driver just freed is a candidate again at once, not only at their next ping."""
        cell, lng, lat = (_s(x) for x in where)
        if cell and lng and lat:
            await self.redis.geoadd(avail_key(cell), (float(lng), float(lat), str(driver_id)))
        await self._signal(*signals, f"d:{driver_id}", *([f"f:{cell}"] if cell else []))

    async def accept(self, driver_id: int, offer_id: int, now_ms: int) -> tuple[str, int]:
        out = await self._accept(keys=[state_key(driver_id)], args=[offer_id, now_ms])
        verdict = _s(out[0])
        if verdict == "EXPIRED":
            await self._candidate_again(driver_id, out[2:5], f"o:{offer_id}")
        elif verdict == "OK":
            await self._signal(f"o:{offer_id}", f"d:{driver_id}")
        return verdict, int(_s(out[1]) or 0)

    async def release(self, driver_id: int, offer_id: int) -> tuple[str, int]:
        out = await self._release(keys=[state_key(driver_id)], args=[offer_id])
        if _s(out[0]) == "RELEASED":
            await self._candidate_again(driver_id, out[2:5], f"o:{offer_id}")
        return _s(out[0]), int(_s(out[1]) or 0)

    async def finish(self, driver_id: int, ride_id: int) -> bool:
        out = await self._finish(keys=[state_key(driver_id)], args=[ride_id])
        if int(out[0]):
            await self._candidate_again(driver_id, out[1:4])
        return bool(int(out[0]))


def _now_ms() -> int:
    return int(time.time() * 1000)
