"""`sysdesign bench rides`: location ingest, nearby queries from 10k to 1M drivers, dispatch under contention.

Three scenarios against ``sysdesign up`` on private ports, with its Redis an
embedded Valkey the bench starts itself (``SYSDESIGN_REDIS_URL``), so the
floors and the bulk loads reach the very Redis the server uses:

1. **ingest** — ``--drivers`` drivers (10,000) each keep one public
   ``UpdateLocation`` stream open and ping once a second on a fixed schedule
   (open loop: ping *k* of driver *j* is due at ``t0 + phase_j + k``, sent
   then whatever happened before), from spawned worker processes. Reported:
   pings/s accepted, and the lag of each sampled ping, the server's receive
   time (the ``rts`` the PING script stores) minus the time it was due (the
   ping's own ``time``). Floor: a redis-py pipelined GEOADD loop writing as
   many positions into the same Redis (same cells, a key prefix of its own).
2. **nearby** — drivers placed straight into the keys exactly as the PING
   and PLACE scripts lay them out (``servers/rides/drivers.py``'s key
   functions, pipelined) in one city-sized box, 10k, then 100k, then 1M;
   at each size GetQuote (which runs the candidate search) at a fixed
   open-loop rate, and bare ``DriverIndex.nearby()`` calls from the bench
   process. Target: p99 at each size ≤ 1.5x the p99 at the smallest.
3. **dispatch** — ``--dispatch-drivers`` drivers (300) streaming and
   auto-accepting every offer (WatchOffers → AcceptOffer) in one H3 cell,
   and ``--riders`` riders (1,000) requesting rides there at once: no driver
   holds two rides, every driver is matched, every other ride is cancelled
   with ``CANCEL_REASON_NO_DRIVER_AVAILABLE``; time to match (the accepted
   ride's ``update_time`` - ``create_time``) p50/p99.

Tokens are minted with the stack's token secret (``SYSDESIGN_TOKEN_SECRET``,
set by the bench) for synthetic user ids, as ``sysdesign token`` signs them:
registering 11,000 users through IdentityService would take minutes of
Argon2. Loaded drivers would go stale 30 s after their last ping; the stack
runs with ``SYSDESIGN_RIDES_FRESH_SECONDS=3600`` so a 1M-driver load stays
online while it is measured.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich.console import Console

from clients.bench.loadgen import HarnessError, Histogram
from clients.bench.report import (
    ProgressUI,
    Row,
    RunReport,
    Scenario,
    command_line,
    machine_info,
    print_report,
    to_markdown,
)
from clients.bench.stack import CpuWindow, Stack

SCENARIOS = ("ingest", "nearby", "dispatch")

# A city-sized box (about 12 km by 11 km of San Francisco) for the nearby scenario,
# another for ingest, and one point (New York) for dispatch: no scenario sees another's drivers.
NEARBY_BOX = (37.70, -122.51, 37.81, -122.38)
INGEST_BOX = (47.55, -122.42, 47.70, -122.25)
DISPATCH_AT = (40.7500, -73.9900)

INGEST_BASE = 7_000_000_000_000_000_000
NEARBY_BASE = 7_100_000_000_000_000_000
DISPATCH_DRIVER_BASE = 7_200_000_000_000_000_000
RIDER_BASE = 7_300_000_000_000_000_000
FRESH_S = 3600


@dataclass
class RidesBenchOptions:
    quick: bool = False
    scenarios: tuple[str, ...] = SCENARIOS
    drivers: int | None = None            # ingest: streaming drivers (10,000; quick 200)
    duration: float | None = None         # ingest: seconds of pings (20; quick 4)
    workers: int = 2                      # ingest: client processes
    drivers_max: int | None = None        # nearby: largest size (1,000,000; quick 10,000)
    quote_rate: float | None = None       # nearby: GetQuote calls/s (100; quick 50)
    quote_seconds: float | None = None    # nearby: seconds per size (10; quick 2)
    nearby_calls: int | None = None       # nearby: bare DriverIndex.nearby() calls per size (500; quick 50)
    riders: int | None = None             # dispatch (1,000; quick 40)
    dispatch_drivers: int | None = None   # dispatch (300; quick 12)
    out_dir: Path = Path("bench-results")
    keep_data: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    seed: int = 1

    def resolved(self) -> dict[str, Any]:
        q = self.quick
        r = {
            "drivers": self.drivers or (200 if q else 10_000),
            "duration_s": self.duration or (4.0 if q else 20.0),
            "workers": self.workers,
            "drivers_max": self.drivers_max or (10_000 if q else 1_000_000),
            "quote_rate": self.quote_rate or (50.0 if q else 100.0),
            "quote_seconds": self.quote_seconds or (2.0 if q else 10.0),
            "nearby_calls": self.nearby_calls or (50 if q else 500),
            "riders": self.riders or (40 if q else 1000),
            "dispatch_drivers": self.dispatch_drivers or (12 if q else 300),
        }
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenario(s) {', '.join(bad)}: choose from {', '.join(SCENARIOS)}")
        if r["drivers_max"] < 100:
            raise ValueError("--drivers-max must be at least 100")
        if r["riders"] <= r["dispatch_drivers"]:
            raise ValueError("--riders must be more than --dispatch-drivers (some must find no driver)")
        return r


def sizes(drivers_max: int) -> list[int]:
    """The nearby sizes: a hundredth, a tenth and all of ``drivers_max`` (10k, 100k, 1M)."""
    return [max(1, drivers_max // 100), max(1, drivers_max // 10), drivers_max]


def mint_tokens(secret: bytes, base: int, n: int, prefix: str) -> list[tuple[int, str]]:
    from servers.platform.auth import TokenSigner

    signer = TokenSigner(secret, 6 * 3600)
    return [(base + i, signer.mint(base + i, f"{prefix}{i}")[0]) for i in range(n)]


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _ts(ms: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def _hist_row(figure: str, h: Histogram, q: float) -> Row:
    return Row(figure, round(h.percentile_ms(q), 3) if h.count else None, "ms")


# --------------------------------------------------------------------------- ingest


def _ingest_worker(addr: str, drivers: list[tuple[int, str, float, float]], t0: float,
                   duration: float) -> dict[str, Any]:
    """One client process: every driver's stream, pinging once a second from ``t0``."""
    return asyncio.run(_ingest_async(addr, drivers, t0, duration))


async def _ingest_async(addr: str, drivers: list[tuple[int, str, float, float]], t0: float,
                        duration: float) -> dict[str, Any]:
    import grpc
    from sysdesign.rides.v1 import rides_pb2 as pb
    from sysdesign.rides.v1 import rides_pb2_grpc as pbg

    per_channel = 100
    channels = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(math.ceil(len(drivers) / per_channel))]
    send_lag = Histogram()
    sent = [0]
    rng = random.Random(len(drivers))

    async def pings(i: int, lat: float, lng: float) -> AsyncIterator[Any]:
        phase = rng.random()
        step = 3.0 / (111_320 * math.cos(math.radians(lat)))  # 3 m east a second
        k = 0
        while phase + k < duration:
            due = t0 + phase + k
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            send_lag.record(max(0.0, time.time() - due))
            sent[0] += 1
            yield pb.UpdateLocationRequest(position=pb.LatLng(lat=lat, lng=lng + k * step),
                                           heading_degrees=90.0, speed_mps=3.0, time=_ts(int(due * 1000)))
            k += 1

    failed_at: list[float] = []

    async def one(i: int, token: str, lat: float, lng: float) -> Any:
        stub = pbg.DriverServiceStub(channels[i // per_channel])
        try:
            return await stub.UpdateLocation(pings(i, lat, lng), metadata=_md(token), timeout=duration + 120)
        except grpc.aio.AioRpcError:
            failed_at.append(round(time.time() - t0, 2))
            raise

    async def opened(i: int, token: str, lat: float, lng: float) -> Any:
        # Drivers connect over a few seconds, not in one instant: 100 streams every 50 ms.
        await asyncio.sleep(i // 100 * 0.05)
        return await one(i, token, lat, lng)

    results = await asyncio.gather(*(opened(i, tok, lat, lng) for i, (_, tok, lat, lng) in enumerate(drivers)),
                                   return_exceptions=True)
    accepted = refused = errors = 0
    last_error = ""
    for r in results:
        if isinstance(r, BaseException):
            errors += 1
            last_error = str(r)[:300]
        else:
            accepted += r.accepted
            refused += r.refused
    for ch in channels:
        await ch.close()
    return {"sent": sent[0], "accepted": accepted, "refused": refused, "errors": errors,
            "last_error": last_error, "send_lag": send_lag.to_dict(),
            "failed_at_s": sorted(failed_at)[:: max(1, len(failed_at) // 20)]}


def _positions(box: tuple[float, float, float, float], n: int, seed: int) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    s, w, north, e = box
    return [(rng.uniform(s, north), rng.uniform(w, e)) for _ in range(n)]


def settle_redis(url: str, timeout_s: float = 120.0) -> float:
    """Rewrites the AOF now and waits until no rewrite or RDB save runs (nor is about to);
    returns the seconds it took. Without this, the growth of a bulk load sets off a rewrite
    (a fork of the whole dataset) at some later moment, in the middle of a measurement."""
    import redis

    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    try:
        if int(client.info("persistence").get("aof_enabled", 0) or 0):
            try:
                client.bgrewriteaof()
            except redis.ResponseError:
                pass  # one is running already: it is waited for below
        quiet = 0
        while time.perf_counter() - start < timeout_s:
            info = client.info("persistence")
            busy = any(int(info.get(k, 0) or 0) for k in (
                "aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress"))
            quiet = 0 if busy else quiet + 1
            if quiet >= 3:  # quiet three looks in a row (a rewrite may start just after a load)
                break
            time.sleep(0.5)
    finally:
        client.close()
    return time.perf_counter() - start


def geoadd_floor(url: str, positions: list[tuple[float, float]], cells: list[str], batch: int = 1000) -> float:
    """Positions/s of a redis-py pipelined GEOADD loop writing ``positions`` (one GEOADD each, into
    the cell's GEO key under a prefix of its own)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        start = time.perf_counter()
        for lo in range(0, len(positions), batch):
            pipe = client.pipeline(transaction=False)
            for j in range(lo, min(len(positions), lo + batch)):
                lat, lng = positions[j % len(positions)]
                pipe.geoadd(f"{{bench:floor:{cells[j]}}}:geo", (lng, lat, f"d{j}"))
            pipe.execute()
        elapsed = time.perf_counter() - start
        keys = list(client.scan_iter(match="{bench:floor:*", count=1000))
        for lo in range(0, len(keys), 500):
            client.delete(*keys[lo:lo + 500])
    finally:
        client.close()
    return len(positions) / elapsed


def _ingest(o: RidesBenchOptions, r: dict[str, Any], url: str, stack: Stack, secret: bytes,
            ui: ProgressUI) -> Scenario:
    import redis

    from servers.rides.drivers import state_key
    from servers.rides.geo import RidesSettings, cell_of

    sc = Scenario("ingest", f"location ingest: {r['drivers']:,} drivers streaming, 1 ping/s each")
    n, duration, workers = r["drivers"], r["duration_s"], max(1, min(r["workers"], r["drivers"]))
    settings = RidesSettings(fresh_s=FRESH_S)
    with ui.phase(f"ingest: minting {n:,} tokens"):
        toks = mint_tokens(secret, INGEST_BASE, n, "bdrv")
        pos = _positions(INGEST_BOX, n, o.seed)
    drivers = [(uid, tok, lat, lng) for (uid, tok), (lat, lng) in zip(toks, pos, strict=True)]
    client = redis.Redis.from_url(url)
    sample = random.Random(o.seed).sample([d[0] for d in drivers], min(500, n))
    lags = Histogram()
    seen: set[tuple[int, bytes]] = set()
    cpu = CpuWindow()
    # Workers need a while to spawn and open their streams; the schedule starts after that.
    t0 = time.time() + 5.0 + n / 2000
    with ui.phase(f"ingest: {n:,} streams for {duration:g} s"), ProcessPoolExecutor(
            workers, mp_context=get_context("spawn")) as pool:
        futs = [pool.submit(_ingest_worker, stack.grpc_addr, drivers[w::workers], t0, duration)
                for w in range(workers)]
        step = ui.step("ingest", duration)
        while not all(f.done() for f in futs):
            pipe = client.pipeline(transaction=False)
            for d in sample:
                pipe.hmget(state_key(d), "ts", "rts")
            for d, (ts, rts) in zip(sample, pipe.execute(), strict=True):
                if ts is not None and rts is not None and (d, ts) not in seen:
                    seen.add((d, ts))
                    lags.record(max(0, int(rts) - int(ts)) / 1000)
            step(min(1.0, max(0.0, (time.time() - t0) / duration)))
            time.sleep(0.2)
        outs = [f.result() for f in futs]
    window = cpu.close()
    pipe = client.pipeline(transaction=False)
    for drv in drivers:
        pipe.hget(state_key(drv[0]), "rts")
    last_rts = max((int(x) for x in pipe.execute() if x is not None), default=0)
    client.close()
    accepted = sum(x["accepted"] for x in outs)
    sent = sum(x["sent"] for x in outs)
    errors = sum(x["errors"] for x in outs)
    refused = sum(x["refused"] for x in outs)
    send_lag = Histogram()
    for x in outs:
        send_lag.merge(Histogram.from_dict(x["send_lag"]))
    span = max(duration, last_rts / 1000 - t0) if last_rts else duration
    achieved = accepted / span if accepted else None
    with ui.phase(f"ingest floor: pipelined GEOADD of {sent:,} positions"):
        cells = [cell_of(settings, lat, lng) for lat, lng in pos]
        floor_pos = [pos[j % n] for j in range(max(sent, 1))]
        floor_cells = [cells[j % n] for j in range(max(sent, 1))]
        floor = geoadd_floor(url, floor_pos, floor_cells)
    sc.rows += [
        Row("pings accepted per second", None if achieved is None else round(achieved, 1), "/s",
            floor=round(floor, 1), floor_name="pipelined GEOADD loop", target_op=">=", target=0.5),
        Row("pings offered per second", round(sent / duration, 1), "/s",
            note="the schedule: one ping a second per driver"),
        Row("achieved / offered", round(accepted / sent, 4) if sent else None),
        _hist_row("lag p50 (server receive - due)", lags, 50),
        _hist_row("lag p99 (server receive - due)", lags, 99),
        _hist_row("client send lag p99", send_lag, 99),
        Row("pings refused", float(refused)),
        Row("streams failed", float(errors)),
    ]
    sc.notes.append(f"{sent:,} pings sent over {duration:g} s by {workers} client processes; {accepted:,} "
                    f"accepted in {span:.1f} s; lag sampled on {len(sample)} drivers ({lags.count:,} pings)")
    sc.notes.append("the floor writes with no per-driver check, state or freshness: one GEOADD per "
                    "position, 1,000 to a pipeline, as fast as Redis takes them; the system is offered "
                    "at most one ping a second per driver")
    if errors:
        sc.notes.append("a stream failed: " + next(x["last_error"] for x in outs if x["errors"]))
    failed_at = sorted(t for x in outs for t in x["failed_at_s"])
    if failed_at:
        sc.notes.append(f"failed streams ended {failed_at[0]:.1f} to {failed_at[-1]:.1f} s after the first "
                        "ping was due")
    sc.details = {"failed_at_s": failed_at,
                  "sent": sent, "accepted": accepted, "refused": refused, "errors": errors,
                  "span_s": round(span, 2), "floor_positions_per_s": round(floor, 1),
                  "lag": lags.summary(), "send_lag": send_lag.summary(), "cpu": window}
    return sc


# --------------------------------------------------------------------------- nearby


def load_drivers(url: str, first: int, count: int, seed: int, batch: int = 10_000) -> None:
    """Drivers ``first .. first+count`` of the nearby box, written as PING + PLACE leave them."""
    import redis

    from servers.rides.drivers import avail_key, geo_key, seen_key, state_key
    from servers.rides.geo import RidesSettings, cell_of

    settings = RidesSettings(fresh_s=FRESH_S)
    rng = random.Random(seed * 1_000_003 + first)
    s, w, n, e = NEARBY_BOX
    client = redis.Redis.from_url(url)
    try:
        for lo in range(first, first + count, batch):
            now = int(time.time() * 1000)
            pipe = client.pipeline(transaction=False)
            by_cell: dict[str, list[Any]] = {}
            for i in range(lo, min(first + count, lo + batch)):
                lat, lng = rng.uniform(s, n), rng.uniform(w, e)
                cell = cell_of(settings, lat, lng)
                d = NEARBY_BASE + i
                pipe.hset(state_key(d), mapping={"lat": repr(lat), "lng": repr(lng), "hd": "0", "sp": "0",
                                                 "ts": now, "rts": now, "cell": cell, "st": "available"})
                by_cell.setdefault(cell, []).extend((lng, lat, str(d)))
            for cell, vals in by_cell.items():
                pipe.geoadd(geo_key(cell), vals)
                pipe.zadd(seen_key(cell), {str(m): now for m in vals[2::3]})
                pipe.geoadd(avail_key(cell), vals)
            pipe.execute()
    finally:
        client.close()


async def _quotes_open_loop(addr: str, tokens: list[str], rate: float, seconds: float, seed: int
                            ) -> tuple[Histogram, int, int, str]:
    import grpc
    from sysdesign.rides.v1 import rides_pb2 as pb
    from sysdesign.rides.v1 import rides_pb2_grpc as pbg

    rng = random.Random(seed)
    s, w, n, e = NEARBY_BOX
    hist = Histogram()
    errors = [0]
    last_error = [""]
    with_eta = [0]
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.RiderServiceStub(ch)
        total = max(1, int(rate * seconds))
        t0 = time.perf_counter() + 0.2

        async def one(i: int) -> None:
            lat, lng = rng.uniform(s + 0.01, n - 0.01), rng.uniform(w + 0.01, e - 0.01)
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                q = await stub.GetQuote(pb.GetQuoteRequest(pickup=pb.LatLng(lat=lat, lng=lng),
                                                           dropoff=pb.LatLng(lat=lat + 0.01, lng=lng)),
                                        metadata=_md(tokens[i % len(tokens)]), timeout=30)
                hist.record(time.perf_counter() - due)
                with_eta[0] += q.HasField("pickup_eta")
            except grpc.aio.AioRpcError as exc:
                errors[0] += 1
                last_error[0] = f"{exc.code().name}: {exc.details()}"

        await asyncio.gather(*(one(i) for i in range(total)))
    return hist, errors[0], with_eta[0], last_error[0]


async def _bare_nearby(url: str, calls: int, seed: int) -> Histogram:
    from servers.rides.drivers import DriverIndex
    from servers.rides.geo import RidesSettings
    from servers.storage import redis_conn

    redis = redis_conn.connect(url, cluster=False)
    index = DriverIndex(redis, RidesSettings(fresh_s=FRESH_S))
    rng = random.Random(seed)
    s, w, n, e = NEARBY_BOX
    hist = Histogram()
    try:
        for i in range(calls + 10):  # the first ten load the scripts and open connections: not recorded
            lat, lng = rng.uniform(s + 0.01, n - 0.01), rng.uniform(w + 0.01, e - 0.01)
            start = time.perf_counter()
            await index.nearby(lat, lng, int(time.time() * 1000), count=10, available=True)
            if i >= 10:
                hist.record(time.perf_counter() - start)
    finally:
        await redis.aclose()
    return hist


def _nearby(o: RidesBenchOptions, r: dict[str, Any], url: str, stack: Stack, secret: bytes,
            ui: ProgressUI) -> Scenario:
    sc = Scenario("nearby", "nearby query: GetQuote p99 from "
                            + " to ".join(f"{x:,}" for x in (sizes(r["drivers_max"])[0], r["drivers_max"]))
                            + " online drivers")
    tokens = [t for _, t in mint_tokens(secret, RIDER_BASE + 900_000, 20, "bq")]
    loaded = 0
    per_size: list[dict[str, Any]] = []
    # A second of quotes first, not recorded: connections, scripts and caches are warm for every size.
    asyncio.run(_quotes_open_loop(stack.grpc_addr, tokens, r["quote_rate"], 1.0, o.seed))
    for size in sizes(r["drivers_max"]):
        with ui.phase(f"nearby: loading drivers to {size:,}"):
            start = time.perf_counter()
            load_drivers(url, loaded, size - loaded, o.seed)
            load_s = time.perf_counter() - start
            loaded = size
            # The bulk load grew the AOF: rewrite it now, so no rewrite lands in the measurement.
            settle_s = settle_redis(url)
        with ui.phase(f"nearby: {size:,} drivers, GetQuote at {r['quote_rate']:g}/s"):
            hist, errors, with_eta, last = asyncio.run(_quotes_open_loop(
                stack.grpc_addr, tokens, r["quote_rate"], r["quote_seconds"], o.seed + size))
            bare = asyncio.run(_bare_nearby(url, r["nearby_calls"], o.seed + size))
        per_size.append({"drivers": size, "load_s": round(load_s, 2), "settle_s": round(settle_s, 2),
                         "getquote": hist.summary(),
                         "getquote_errors": errors, "getquote_last_error": last,
                         "quotes_with_eta": with_eta, "nearby": bare.summary(),
                         "_q": hist, "_n": bare})
    base = per_size[0]
    for p in per_size:
        label = f"{p['drivers']:,} drivers"
        q99, n99 = p["_q"].percentile_ms(99), p["_n"].percentile_ms(99)
        sc.rows.append(Row(f"GetQuote p50, {label}", round(p["_q"].percentile_ms(50), 3) if p["_q"].count else None,
                           "ms"))
        sc.rows.append(Row(f"GetQuote p99, {label}", round(q99, 3) if p["_q"].count else None, "ms",
                           floor=round(base["_q"].percentile_ms(99), 3) or None,
                           floor_name=f"p99 at {base['drivers']:,}", target_op="<=", target=1.5))
        sc.rows.append(Row(f"DriverIndex.nearby() p50, {label}",
                           round(p["_n"].percentile_ms(50), 3) if p["_n"].count else None, "ms"))
        sc.rows.append(Row(f"DriverIndex.nearby() p99, {label}", round(n99, 3) if p["_n"].count else None,
                           "ms", floor=round(base["_n"].percentile_ms(99), 3) or None,
                           floor_name=f"p99 at {base['drivers']:,}"))
        if p["getquote_errors"]:
            sc.notes.append(f"{label}: {p['getquote_errors']} GetQuote errors (last: {p['getquote_last_error']})")
    sc.notes.append(f"GetQuote open loop at {r['quote_rate']:g}/s for {r['quote_seconds']:g} s per size, "
                    "latency from the scheduled time; pickups uniform in a 12 km x 11 km box; bare nearby(): "
                    f"{r['nearby_calls']} sequential calls from the bench process (count 10, available only); "
                    "after each size's bulk load the AOF is rewritten before measuring, so no rewrite lands in "
                    "the measurement (" + ", ".join(f"{p['settle_s']:.1f}" for p in per_size) + " s)")
    sc.details = {"sizes": [{k: v for k, v in p.items() if not k.startswith("_")} for p in per_size],
                  "box": NEARBY_BOX}
    return sc


# --------------------------------------------------------------------------- dispatch


async def _dispatch_async(addr: str, drivers: list[tuple[int, str]], riders: list[tuple[int, str]],
                          seed: int, within_s: float) -> dict[str, Any]:
    import grpc
    from sysdesign.rides.v1 import rides_pb2 as pb
    from sysdesign.rides.v1 import rides_pb2_grpc as pbg

    rng = random.Random(seed)
    lat0, lng0 = DISPATCH_AT
    chans = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(max(1, math.ceil((len(drivers) + len(riders)) / 100)))]
    accepted: dict[int, list[str]] = {uid: [] for uid, _ in drivers}
    accept_errors: list[str] = []
    stops: list[asyncio.Queue[Any]] = []
    calls: list[Any] = []
    watchers: list[asyncio.Task[Any]] = []

    async def queue_iter(q: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        while (item := await q.get()) is not None:
            yield item

    async def watch(uid: int, tok: str, stub: Any) -> None:
        async for ev in stub.WatchOffers(pb.WatchOffersRequest(), metadata=_md(tok)):
            if ev.HasField("offer"):
                try:
                    resp = await stub.AcceptOffer(pb.AcceptOfferRequest(offer_id=ev.offer.offer_id),
                                                  metadata=_md(tok))
                    accepted[uid].append(resp.ride.ride_id)
                except grpc.aio.AioRpcError as exc:
                    accept_errors.append(f"{exc.code().name}: {exc.details()}")

    for i, (uid, tok) in enumerate(drivers):
        stub = pbg.DriverServiceStub(chans[i % len(chans)])
        q: asyncio.Queue[Any] = asyncio.Queue()
        await q.put(pb.UpdateLocationRequest(
            position=pb.LatLng(lat=lat0 + rng.uniform(-0.002, 0.002), lng=lng0 + rng.uniform(-0.002, 0.002)),
            time=_ts(int(time.time() * 1000))))
        stops.append(q)
        calls.append(stub.UpdateLocation(queue_iter(q), metadata=_md(tok)))
        watchers.append(asyncio.create_task(watch(uid, tok, stub)))
    await asyncio.sleep(1.5)
    rstubs = [pbg.RiderServiceStub(chans[i % len(chans)]) for i in range(len(chans))]
    pick = pb.LatLng(lat=lat0, lng=lng0)
    drop = pb.LatLng(lat=lat0 + 0.02, lng=lng0)
    sem = asyncio.Semaphore(64)

    async def quote(i: int, tok: str) -> str:
        async with sem:
            q = await rstubs[i % len(rstubs)].GetQuote(pb.GetQuoteRequest(pickup=pick, dropoff=drop),
                                                       metadata=_md(tok), timeout=60)
            return str(q.quote_id)

    try:
        quotes = await asyncio.gather(*(quote(i, t) for i, (_, t) in enumerate(riders)))
    except grpc.aio.AioRpcError as exc:
        raise HarnessError(f"GetQuote for the riders: {exc.code().name}: {exc.details()}") from None
    sent_at = time.time()
    failed_after: list[float] = []

    async def request(i: int, tok: str, qid: str) -> Any:
        try:
            return await rstubs[i % len(rstubs)].RequestRide(pb.RequestRideRequest(quote_id=qid),
                                                             metadata=_md(tok), timeout=60)
        except grpc.aio.AioRpcError:
            failed_after.append(round(time.time() - sent_at, 2))
            raise

    reqs = await asyncio.gather(*(request(i, t, qid) for i, ((_, t), qid) in enumerate(zip(riders, quotes,
                                                                                          strict=True))),
                                return_exceptions=True)
    request_s = time.time() - sent_at
    ride_of: dict[int, str] = {}
    request_errors: list[str] = []
    for i, res in enumerate(reqs):
        if isinstance(res, BaseException):
            request_errors.append(str(res)[:200])
        else:
            ride_of[i] = res.ride.ride_id
    final: dict[int, Any] = {}
    poll_errors: list[str] = []
    deadline = time.monotonic() + within_s
    done_states = {pb.RIDE_STATE_ACCEPTED, pb.RIDE_STATE_CANCELLED}
    while len(final) < len(ride_of) and time.monotonic() < deadline:
        async def get(i: int) -> None:
            async with sem:
                try:
                    ride = (await rstubs[i % len(rstubs)].GetRide(
                        pb.GetRideRequest(ride_id=ride_of[i]), metadata=_md(riders[i][1]), timeout=30)).ride
                except grpc.aio.AioRpcError as exc:  # a busy server: asked again next round
                    poll_errors.append(f"{exc.code().name}: {exc.details()}")
                    return
            if ride.state in done_states:
                final[i] = ride

        await asyncio.gather(*(get(i) for i in ride_of if i not in final))
        # Gently: the rides' own timestamps give the time to match, so looking more often
        # would only add load to the server under test.
        await asyncio.sleep(2.0)
    await asyncio.sleep(1.0)  # the last AcceptOffer answers reach their drivers
    for q in stops:
        await q.put(None)
    for t in watchers:
        t.cancel()
    await asyncio.gather(*calls, *watchers, return_exceptions=True)
    for ch in chans:
        await ch.close()
    match = Histogram()
    matched = [r for r in final.values() if r.state == pb.RIDE_STATE_ACCEPTED]
    for ride in matched:
        match.record(max(0, ride.update_time.ToMilliseconds() - ride.create_time.ToMilliseconds()) / 1000)
    no_driver = sum(1 for r in final.values() if r.state == pb.RIDE_STATE_CANCELLED
                    and r.cancel_reason == pb.CANCEL_REASON_NO_DRIVER_AVAILABLE)
    by_driver: dict[str, int] = {}
    for ride in matched:
        by_driver[ride.driver_id] = by_driver.get(ride.driver_id, 0) + 1
    doubles = sum(n - 1 for n in by_driver.values() if n > 1)
    doubles_driver_side = sum(len(set(v)) - 1 for v in accepted.values() if len(set(v)) > 1)
    return {"requested": len(ride_of), "request_errors": len(request_errors),
            "request_error": request_errors[0] if request_errors else "",
            "request_failed_after_s": sorted(failed_after)[:: max(1, len(failed_after) // 20)],
            "request_s": round(request_s, 3), "settled": len(final), "matched": len(matched),
            "no_driver": no_driver, "other_cancelled": len(final) - len(matched) - no_driver,
            "unsettled": len(ride_of) - len(final), "double_assignments": doubles,
            "drivers_with_two_rides": doubles_driver_side,
            "drivers_matched": len(by_driver), "accept_errors": len(accept_errors),
            "accept_error": accept_errors[0] if accept_errors else "",
            "poll_errors": len(poll_errors), "poll_error": poll_errors[0] if poll_errors else "",
            "match_time": match.to_dict()}


def _dispatch(o: RidesBenchOptions, r: dict[str, Any], stack: Stack, secret: bytes, ui: ProgressUI) -> Scenario:
    nd, nr = r["dispatch_drivers"], r["riders"]
    sc = Scenario("dispatch", f"dispatch under contention: {nr:,} riders at once, {nd:,} drivers in one cell")
    drivers = mint_tokens(secret, DISPATCH_DRIVER_BASE, nd, "bdd")
    riders = mint_tokens(secret, RIDER_BASE, nr, "brd")
    with ui.phase(f"dispatch: {nr:,} requests, {nd:,} auto-accepting drivers"):
        res = asyncio.run(_dispatch_async(stack.grpc_addr, drivers, riders, o.seed, within_s=120 + nr / 20))
    match = Histogram.from_dict(res.pop("match_time"))
    sc.rows += [
        Row("double assignments", float(res["double_assignments"] + res["drivers_with_two_rides"]),
            target_op="<=", target=0, target_on="value",
            note="matched rides sharing a driver, plus drivers who accepted two rides"),
        Row("rides matched", float(res["matched"]), floor=float(nd), floor_name="drivers",
            target_op=">=", target=1.0),
        Row("told no driver is available", float(res["no_driver"]), floor=float(nr - nd),
            floor_name="riders - drivers", target_op=">=", target=1.0),
        Row("cancelled for another reason or unsettled", float(res["other_cancelled"] + res["unsettled"]
                                                              + res["request_errors"]),
            target_op="<=", target=0, target_on="value"),
        _hist_row("time to match p50", match, 50),
        _hist_row("time to match p99", match, 99),
    ]
    sc.notes.append(f"{nr:,} RequestRide calls sent together took {res['request_s']:.2f} s to answer; time to "
                    "match is the accepted ride's update_time - create_time (server clock)")
    if res["request_failed_after_s"]:
        fa = res["request_failed_after_s"]
        sc.notes.append(f"{res['request_errors']} RequestRide calls failed {fa[0]:.1f} to {fa[-1]:.1f} s after "
                        "they were sent")
    for k in ("request_error", "accept_error", "poll_error"):
        if res[k]:
            sc.notes.append(f"{k.replace('_', ' ')}: {res[k]}")
    sc.details = {**res, "match_time": match.summary(), "at": DISPATCH_AT}
    return sc


# --------------------------------------------------------------------------- run


def run(o: RidesBenchOptions, console: Console) -> RunReport:
    from servers.storage.redis_conn import EmbeddedValkey

    r = o.resolved()
    report = RunReport("rides", command_line(), {**r, "quick": o.quick, "scenarios": ",".join(o.scenarios),
                                                   "fresh_s": FRESH_S},
                       machine=machine_info())
    root = Path(tempfile.mkdtemp(prefix="sysdesign-bench-rides-"))
    secret = secrets.token_urlsafe(48).encode()
    valkey = EmbeddedValkey(root / "valkey")
    stack: Stack | None = None
    cpu = CpuWindow()
    ui = ProgressUI(console, 2 + 2 * len(o.scenarios) + (3 if "nearby" in o.scenarios else 0))
    try:
        with ui:
            with ui.phase("Valkey and sysdesign up"):
                url = valkey.start()
                env = {"SYSDESIGN_REDIS_URL": url, "SYSDESIGN_TOKEN_SECRET": secret.decode(),
                       "SYSDESIGN_ACCESS_LOG": "0", "SYSDESIGN_RIDES_FRESH_SECONDS": str(FRESH_S),
                       **o.extra_env}
                stack = Stack(root / "data", extra_env=env).start()
            for name in o.scenarios:
                try:
                    if name == "ingest":
                        sc = _ingest(o, r, url, stack, secret, ui)
                    elif name == "nearby":
                        sc = _nearby(o, r, url, stack, secret, ui)
                    else:
                        sc = _dispatch(o, r, stack, secret, ui)
                except Exception as exc:  # the scenario is reported as not measured; the others still run
                    sc = Scenario(name, name, error=f"{type(exc).__name__}: {exc}")
                report.scenarios.append(sc)
                report.measurements[name] = sc.details
                rss = stack.rss()
                report.measurements.setdefault("rss_after", {})[name] = rss.to_dict()
    except HarnessError as exc:
        report.error = str(exc)
    finally:
        if stack is not None:
            stack.stop()
        valkey.stop()
        report.measurements["cpu"] = cpu.close()
        if o.keep_data:
            console.print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report.finished = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return report


def plot(report: RunReport, path: Path) -> Path | None:
    """Ingest against its floor, nearby p99 against online drivers, dispatch outcome."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    ing = report.measurements.get("ingest") or {}
    if ing:
        span = ing.get("span_s") or 1
        vals = [ing["accepted"] / span, ing["floor_positions_per_s"]]
        ax1.bar(["UpdateLocation\n(system)", "pipelined GEOADD\n(floor)"], vals, color=["tab:green", "tab:gray"])
        for i, v in enumerate(vals):
            ax1.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
        ax1.set(yscale="log", ylabel="positions/s", title="location ingest")
    near = (report.measurements.get("nearby") or {}).get("sizes") or []
    if near:
        xs = [p["drivers"] for p in near]
        ax2.plot(xs, [p["getquote"]["p99_ms"] for p in near], marker="o", label="GetQuote p99")
        ax2.plot(xs, [p["getquote"]["p50_ms"] for p in near], marker="o", label="GetQuote p50")
        ax2.plot(xs, [p["nearby"]["p99_ms"] for p in near], marker="s", label="nearby() p99")
        ax2.plot(xs, [p["nearby"]["p50_ms"] for p in near], marker="s", label="nearby() p50")
        ax2.set(xscale="log", xlabel="online drivers", ylabel="ms", title="nearby query latency")
        ax2.legend(fontsize="small")
    dis = report.measurements.get("dispatch") or {}
    if dis:
        labels = ["matched", "no driver", "failed or other", "double"]
        vals = [dis["matched"], dis["no_driver"],
                dis["other_cancelled"] + dis["unsettled"] + dis.get("request_errors", 0),
                dis["double_assignments"]]
        ax3.bar(labels, vals, color=["tab:green", "tab:blue", "tab:red", "tab:red"])
        for i, v in enumerate(vals):
            ax3.text(i, v, str(v), ha="center", va="bottom")
        mt = dis.get("match_time") or {}
        ax3.set(ylabel="rides", title=f"dispatch: match p50 {mt.get('p50_ms', 0):.0f} ms, "
                                      f"p99 {mt.get('p99_ms', 0):.0f} ms")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: RunReport, out: Path) -> tuple[Path, Path, Path | None]:
    """``rides.json``, ``rides.md`` and ``rides.png`` in ``out`` (the names docs/bench/ keeps)."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "rides.json", out / "rides.md"
    jpath.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    md = to_markdown(report)
    png = plot(report, out / "rides.png")
    if png is not None:
        md += "\n![ingest against its floor, nearby latency by online drivers, dispatch outcome](rides.png)\n"
    mpath.write_text(md)
    return jpath, mpath, png


def main(options: RidesBenchOptions | None = None) -> int:
    """Exit code: 0 when it measured (targets met or not), 1 on a harness error, 130 on Ctrl-C."""
    o = options or RidesBenchOptions()
    console = Console()
    try:
        report = run(o, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130
    console.print()
    print_report(report, console)
    jpath, mpath, png = write(report, Path(o.out_dir))
    console.print(f"results: {jpath}  {mpath}  {png or '(no plot)'}")
    failed = [s.key for s in report.scenarios if s.error]
    if report.error or failed:
        console.print(f"[bold red]harness error:[/] {report.error or ', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--drivers", type=int)
    p.add_argument("--drivers-max", type=int)
    p.add_argument("--riders", type=int)
    p.add_argument("--dispatch-drivers", type=int)
    p.add_argument("--out", default="bench-results")
    a = p.parse_args()
    raise SystemExit(main(RidesBenchOptions(
        quick=a.quick, scenarios=tuple(x for x in a.scenarios.split(",") if x), drivers=a.drivers,
        drivers_max=a.drivers_max, riders=a.riders, dispatch_drivers=a.dispatch_drivers,
        out_dir=Path(a.out))))
