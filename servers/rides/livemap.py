"""The live map: frames of drivers, open rides and surge in a box, and the page that draws them.

A frame is read from the same Redis keys dispatch uses: the H3 cells that
cover the box, each cell's fresh drivers (``:seen`` + ``:geo``) and open rides
(``:open``), the drivers' states and the active surge cells. It is anonymised
for any signed-in viewer: a driver appears under a keyed pseudonym (stable,
not their user id), a ride's pickup and dropoff are rounded to three decimals
(about 100 m), no rider is named.

The edge serves the page at ``/rides/map`` (one HTML file, a canvas, no
external tiles or scripts) and its feed at ``/rides/map/frames``: one JSON
frame per line, streamed, for a bearer token sent in the Authorization
header (the page keeps the token in the URL fragment, which never reaches a
server log).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h3

from servers.platform.errors import InvalidArgument
from servers.rides import core as c
from servers.rides.drivers import geo_key, seen_key

MAX_SPAN_DEG = 0.5
MAX_CELLS = 4000
# What one cell contributes to a frame at most (the map is a picture, not a census).
MAX_PER_CELL = 500

_CELL_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return {} end
local pos = redis.call('GEOPOS', KEYS[1], unpack(ids))
local out = {}
for i, id in ipairs(ids) do
  if pos[i] then
    out[#out + 1] = id
    out[#out + 1] = pos[i][1]
    out[#out + 1] = pos[i][2]
  end
end
return out
"""

_DRIVER_STATES = {"available": 1, "offered": 2, "assigned": 3}
PAGE = Path(__file__).with_name("map.html")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class Box:
    south: float
    west: float
    north: float
    east: float

    @classmethod
    def checked(cls, south: float, west: float, north: float, east: float, prefix: str = "") -> Box:
        bad = []
        sw, ne = f"{prefix}south_west", f"{prefix}north_east"
        if not (-90 <= south <= 90 and -180 <= west <= 180):
            bad.append((sw, "must be WGS 84 degrees"))
        if not (-90 <= north <= 90 and -180 <= east <= 180):
            bad.append((ne, "must be WGS 84 degrees"))
        if not bad and (north <= south or east <= west):
            bad.append((ne, "must lie north-east of south_west"))
        if not bad and (north - south > MAX_SPAN_DEG or east - west > MAX_SPAN_DEG):
            bad.append((ne, f"the box may span at most {MAX_SPAN_DEG} degrees each way"))
        if bad:
            raise InvalidArgument(bad)
        return cls(south, west, north, east)

    def contains(self, lat: float, lng: float) -> bool:
        return self.south <= lat <= self.north and self.west <= lng <= self.east


class LiveMap:
    def __init__(self, core: c.RidesCore, secret: bytes) -> None:
        self.core = core
        self._key = hmac.new(secret, b"sysdesign.rides.v1 map pseudonyms", hashlib.sha256).digest()
        self._cell = core.redis.register_script(_CELL_LUA)

    def pseudonym(self, driver_id: int) -> str:
        return hmac.new(self._key, str(driver_id).encode(), hashlib.sha256).hexdigest()[:12]

    def cells(self, box: Box) -> list[str]:
        poly = h3.LatLngPoly([(box.south, box.west), (box.south, box.east), (box.north, box.east),
                              (box.north, box.west)])
        inner = set(h3.h3shape_to_cells(poly, self.core.s.shard_res))
        # Cells straddling the edge have their centre outside the box: take the ring round it too.
        edge = {n for cell in inner for n in h3.grid_disk(cell, 1)} if inner else set()
        if not inner:
            edge = set(h3.grid_disk(h3.latlng_to_cell((box.south + box.north) / 2, (box.west + box.east) / 2,
                                                      self.core.s.shard_res), 1))
        out = sorted(inner | edge)
        if len(out) > MAX_CELLS:
            raise InvalidArgument([("north_east", "the box covers too many cells at this resolution")])
        return out

    async def frame(self, box: Box) -> dict[str, Any]:
        core = self.core
        at = c.now_ms()
        cutoff = at - int(core.s.fresh_s * 1000)
        cells = self.cells(box)
        redis = core.redis
        per_cell = await asyncio.gather(*(
            self._cell(keys=[geo_key(cell), seen_key(cell)], args=[cutoff, MAX_PER_CELL]) for cell in cells))
        points: list[tuple[int, float, float]] = []
        for flat in per_cell:
            for i in range(0, len(flat), 3):
                lng, lat = float(_s(flat[i + 1])), float(_s(flat[i + 2]))
                if box.contains(lat, lng):
                    points.append((int(_s(flat[i])), lat, lng))
        views = await core.index.views([p[0] for p in points])
        drivers = []
        for (did, lat, lng), v in zip(points, views, strict=True):
            if v is None or v.state not in _DRIVER_STATES:
                continue
            drivers.append({"key": self.pseudonym(did), "lat": lat, "lng": lng, "state": _DRIVER_STATES[v.state],
                            "heading": v.heading})
        ride_lists = await asyncio.gather(*(
            redis.geosearch(c.open_rides_key(cell), longitude=(box.west + box.east) / 2,
                            latitude=(box.south + box.north) / 2, width=_width_m(box), height=_height_m(box),
                            unit="m", withcoord=True, count=MAX_PER_CELL)
            for cell in cells))
        pickups: list[tuple[int, float, float]] = []
        for hits in ride_lists:
            for member, (lng, lat) in hits:
                pickups.append((int(_s(member)), float(lat), float(lng)))
        sums = await asyncio.gather(*(redis.hgetall(c.summary_key(rid)) for rid, _, _ in pickups))
        rides = []
        for (rid, lat, lng), raw in zip(pickups, sums, strict=True):
            sm = {_s(k): _s(v) for k, v in (raw or {}).items()}
            if not sm or int(sm.get("st", "0")) in c.ENDED:
                continue
            drv = int(sm.get("drv") or 0)
            rides.append({"id": str(rid), "state": int(sm["st"]), "pickup": [round(lat, 3), round(lng, 3)],
                          "dropoff": [round(float(sm.get("dlat") or lat), 3), round(float(sm.get("dlng") or lng), 3)],
                          "driver": self.pseudonym(drv) if drv else ""})
        active = {_s(x) for x in await redis.zrangebyscore(c.SURGE_CELLS, at - core.s.surge_window_s * 1000,
                                                            "+inf")}
        shown = [cell for cell in cells if cell in active]
        values = await asyncio.gather(*(core.surge_of(cell) for cell in shown))
        surge = [{"cell": cell, "milli": m, "boundary": [list(p) for p in h3.cell_to_boundary(cell)]}
                 for cell, m in zip(shown, values, strict=True) if m > 1000]
        return {"time_ms": at, "drivers": drivers, "rides": rides, "surge": surge}


def _width_m(box: Box) -> float:
    mid = math.radians((box.south + box.north) / 2)
    return max(1.0, (box.east - box.west) * 111_320 * math.cos(mid))


def _height_m(box: Box) -> float:
    return max(1.0, (box.north - box.south) * 110_574)


def live_map(rt: Any) -> LiveMap:
    return rt.singleton("rides_livemap", lambda: LiveMap(c.RidesCore.for_runtime(rt), rt.config.secret()))


def edge_routes(app: Any, rt: Any) -> None:
    """The `System.edge_routes` hook: the page and its feed."""
    from aiohttp import web

    from servers.platform.auth import bearer_from_metadata
    from servers.platform.errors import ServiceError

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=PAGE.read_text(), content_type="text/html",
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                                "style-src 'unsafe-inline'"})

    async def frames(request: web.Request) -> web.StreamResponse:
        token = bearer_from_metadata(tuple((k.lower(), v) for k, v in request.headers.items()))
        try:
            if not token:
                raise web.HTTPUnauthorized(text="send Authorization: Bearer <token>\n")
            rt.signer.verify(token)
        except ServiceError as exc:
            raise web.HTTPUnauthorized(text=f"{exc.message}\n") from exc
        q = request.query
        try:
            box = Box.checked(float(q["south"]), float(q["west"]), float(q["north"]), float(q["east"]))
            interval = min(10.0, max(0.25, float(q.get("interval", "1"))))
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text="south, west, north and east are degrees\n") from exc
        except InvalidArgument as exc:
            raise web.HTTPBadRequest(text=f"{exc.message}\n") from exc
        lm = live_map(rt)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        await resp.prepare(request)
        core = lm.core
        while not core.closing.is_set():
            started = time.monotonic()
            await resp.write((json.dumps(await lm.frame(box), separators=(",", ":")) + "\n").encode())
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        return resp

    app.router.add_get("/rides/map", page)
    app.router.add_get("/rides/map/frames", frames)
