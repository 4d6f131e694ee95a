"""`sysdesign bench feed`: the news feed against floors measured in the same run.

What runs (all on 127.0.0.1, started and stopped by the bench): the bare
grpc.aio echo floor, ``<venv>/bin/sysdesign up`` on private ports and a
temporary data dir (with ``SYSDESIGN_FEED_CELEBRITY_THRESHOLD`` set to the
run's threshold), and the open-loop load generator's worker processes. Data
is loaded by this process through the feed's domain layer
(:mod:`servers.feed.generate`) against the stack's own backends (its SQLite
file and its Valkey), the way `sysdesign feed generate` does.

Scenarios:

1. ``home``  GetHomeTimeline, a page of 20 hydrated posts, warm caches:
   ``readers`` users each following 20 of ``authors`` authors (two of them
   celebrities, merged at read time), every author with 10 posts, each
   request from a random reader with that reader's token. Max throughput
   ≥ 0.5 x the echo floor's (called with a payload the size of a typical
   response); p99 at half the echo's max ≤ 3 x the echo's p99 there.
2. ``fanout``  the fan-out worker's insert rate: posts by authors with
   ``fanout_followers`` followers each (below the threshold), timed from the
   first CreatePost until the queue is drained, in home-timeline entries per
   second (each entry: a row in the table port and a ZADD+trim in Redis);
   against a raw pipelined ZADD loop writing as many entries into the same
   Valkey from this process. ≥ 0.5 x.
3. ``cost``  the cost of CreatePost against the author's follower count
   (1, 100, 1k, 5k, 10k = the threshold, 1M): the wall time from sending
   CreatePost until the post is in every follower's home timeline. Below the
   threshold that includes the whole fan-out (measured as: the fan-out
   queue is drained); at and above it nothing is pushed, followers pull the
   post at read time, so the cost is the CreatePost round trip. Target: 1M
   within 1.5 x of 10k. Plotted (log x) to ``feed-cost-<UTC>.png``.

``--quick`` scales everything down (threshold 1,000, counts 1..10k, short
steps) to run in a few minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from clients.bench.loadgen import (
    ECHO_METHOD,
    GrpcUnaryTarget,
    HarnessError,
    LoadGenerator,
    RandomChoice,
    SearchCriteria,
    SearchPlan,
    SearchResult,
    StepResult,
    find_max_rate,
    start_echo_floor,
)
from clients.bench.report import (
    ProgressUI,
    Row,
    RunReport,
    Scenario,
    command_line,
    machine_info,
    print_report,
    write_results,
)
from clients.bench.stack import CpuWindow, Stack

SCENARIOS = ("home", "fanout", "cost")
HOME_METHOD = "/sysdesign.feed.v1.TimelineService/GetHomeTimeline"
CREATE_METHOD = "/sysdesign.feed.v1.PostService/CreatePost"
STREAM = "{q:fanout}"

HOME_THROUGHPUT_MIN = 0.5
HOME_P99_MAX = 3.0
FANOUT_RATE_MIN = 0.5
COST_FLAT_MAX = 1.5


@dataclass
class FeedBenchOptions:
    """Everything `sysdesign bench feed` takes; None means the mode's default.

    quick:          small counts and short steps (threshold 1,000; cost curve 1..10,000).
    scenarios:      a subset of home, fanout, cost.
    out_dir:        where JSON, Markdown and PNG results go.
    workers:        load-generator processes (default 2).
    readers, authors: the home scenario's population (default 200 readers, 50 authors).
    fanout_followers: followers of each fan-out author (default 5,000; quick 800).
    fanout_posts:   posts fanned out in the fanout scenario (default 20; quick 25).
    max_followers:  the largest follower count of the cost curve (default 1,000,000).
    threshold:      the celebrity threshold of the stack (default 10,000; quick 1,000).
    cost_posts:     CreatePost calls per point of the cost curve (default 11; quick 5).
    step_seconds, probe_seconds, half_seconds: open-loop step lengths.
    keep_data:      keep the temporary data dir and the stack's log.
    extra_env:      more variables for the stack.
    """

    quick: bool = False
    scenarios: Sequence[str] = SCENARIOS
    out_dir: Path = Path("bench-results")
    workers: int | None = None
    readers: int | None = None
    authors: int | None = None
    fanout_followers: int | None = None
    fanout_posts: int | None = None
    max_followers: int | None = None
    threshold: int | None = None
    cost_posts: int | None = None
    step_seconds: float | None = None
    probe_seconds: float | None = None
    half_seconds: float | None = None
    concurrency: int = 64
    max_inflight: int = 1024
    p99_limit_ms: float = 100.0
    keep_data: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    argv: list[str] | None = None
    progress: bool = True


@dataclass(frozen=True)
class _Settings:
    quick: bool
    scenarios: tuple[str, ...]
    workers: int
    readers: int
    authors: int
    fanout_followers: int
    fanout_posts: int
    threshold: int
    cost_points: tuple[int, ...]
    cost_posts: int
    step_s: float
    probe_s: float
    half_s: float
    settle_s: float
    max_steps: int
    resolution: float
    concurrency: int
    max_inflight: int
    p99_limit_ms: float
    seed: int


def _settings(o: FeedBenchOptions) -> _Settings:
    unknown = set(o.scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    q = o.quick
    threshold = o.threshold or (1000 if q else 10_000)
    top = o.max_followers or (10 * threshold if q else 1_000_000)
    # The points, plus half the threshold: the most expensive push.
    points = sorted({1, 100, min(1000, threshold), threshold // 2, threshold, top}
                    if not q else {1, 10, 100, threshold // 2, threshold, top})
    s = _Settings(
        quick=q,
        scenarios=tuple(x for x in SCENARIOS if x in o.scenarios),
        workers=o.workers or 2,
        readers=o.readers or (100 if q else 200),
        authors=o.authors or (30 if q else 50),
        fanout_followers=o.fanout_followers or (800 if q else 5000),
        fanout_posts=o.fanout_posts or (25 if q else 20),
        threshold=threshold,
        cost_points=tuple(points),
        cost_posts=o.cost_posts or (5 if q else 11),
        step_s=o.step_seconds or (1.5 if q else 8.0),
        probe_s=o.probe_seconds or (1.0 if q else 3.0),
        half_s=o.half_seconds or (1.5 if q else 8.0),
        settle_s=0.2 if q else 1.0,
        max_steps=4 if q else 8,
        resolution=0.1 if q else 0.05,
        concurrency=o.concurrency,
        max_inflight=o.max_inflight,
        p99_limit_ms=o.p99_limit_ms,
        seed=o.seed if o.seed is not None else random.randrange(1 << 30),
    )
    if s.readers < 1 or s.authors < 22 or s.workers < 1:
        raise ValueError("readers and workers must be >= 1, authors >= 22")
    if s.fanout_followers >= threshold:
        raise ValueError("fanout_followers must stay below the celebrity threshold")
    return s


# --------------------------------------------------------------------------- a target with many users


@dataclass(frozen=True)
class MultiUserTarget:
    """A unary method called with one of ``calls`` (request bytes, bearer token) at random.

    Like :class:`clients.bench.loadgen.GrpcUnaryTarget` (raw bytes in, responses
    not deserialized), but each request carries its own user's token, so a
    timeline benchmark reads many users' timelines, not one.
    """

    name: str
    address: str
    method: str
    calls: tuple[tuple[bytes, str], ...]
    timeout_s: float = 30.0

    async def connect(self, worker: int, seed: int) -> Any:
        return _MultiUserClient(self, worker, seed)


class _MultiUserClient:
    def __init__(self, target: MultiUserTarget, worker: int, seed: int) -> None:
        import grpc

        self._grpc = grpc
        self._channel = grpc.aio.insecure_channel(
            target.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self._call = self._channel.unary_unary(target.method)
        self._calls = [(payload, (("authorization", f"Bearer {tok}"),))
                       for payload, tok in target.calls]
        self._rnd = random.Random(seed * 1_000_003 + worker).random
        self._timeout = target.timeout_s

    async def call(self) -> str | None:
        payload, md = self._calls[int(self._rnd() * len(self._calls))]
        try:
            await self._call(payload, timeout=self._timeout, metadata=md)
        except self._grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return None

    async def close(self) -> None:
        await self._channel.close()


# --------------------------------------------------------------------------- data loading


class _Backend:
    """The feed's domain layer on the stack's own backends, driven from this process."""

    def __init__(self, stack: Stack, threshold: int) -> None:
        self.stack = stack
        self.threshold = threshold
        self.loop = asyncio.new_event_loop()
        self.rt: Any = None
        self.core: Any = None
        self.signer: Any = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def open(self) -> None:
        import os

        from servers.feed.feed import FeedCore
        from servers.feed.settings import FeedSettings
        from servers.platform.auth import TokenSigner
        from servers.platform.config import Config
        from servers.platform.runtime import Runtime
        from servers.storage.redis_conn import redis_url
        from servers.systems import all_tables

        config = Config(data_dir=self.stack.data_dir, redis_url="", metrics_addr="")
        config.redis_url = redis_url(config)
        os.environ["SYSDESIGN_FEED_CELEBRITY_THRESHOLD"] = str(self.threshold)
        self.rt = self.run(Runtime.open(config, tables=all_tables(), start_embedded=False))
        self.core = FeedCore(self.rt, FeedSettings())
        self.signer = TokenSigner(config.secret(), 86_400)

    def close(self) -> None:
        if self.rt is not None:
            self.run(self.rt.close())
        self.loop.close()

    def users(self, prefix: str, n: int, progress: Callable[[int], None]) -> list[tuple[int, str]]:
        from servers.feed.generate import register_users, username

        names = [username(prefix, i) for i in range(n)]
        ids = self.run(register_users(self.core, names, lambda _p, d, _t: progress(d)))
        return list(zip(ids, names, strict=True))

    def token(self, uid: int, name: str) -> str:
        return str(self.signer.mint(uid, name)[0])

    def fanout_idle(self) -> bool:
        async def check() -> bool:
            r = self.rt.redis
            if not await r.exists(STREAM):
                return True
            groups = await r.xinfo_groups(STREAM)
            pending = sum(int(g["pending"]) for g in groups)
            return int(await r.xlen(STREAM)) == 0 and pending == 0

        return bool(self.run(check()))

    def wait_idle(self, timeout_s: float = 600.0, every: float = 0.002) -> float:
        start = time.monotonic()
        while not self.fanout_idle():
            if time.monotonic() - start > timeout_s:
                raise HarnessError("the fan-out queue did not drain in time")
            time.sleep(every)
        return time.monotonic()


def _raw_zadd_rate(be: _Backend, entries: int, keys: int) -> float:
    """The floor: ``entries`` ZADDs to ``keys`` sorted sets, pipelined 1,000 at a time."""

    async def go() -> float:
        r = be.rt.redis
        start = time.perf_counter()
        base = 400_000_000_000_000_000
        for s in range(0, entries, 1000):
            pipe = r.pipeline(transaction=False)
            for i in range(s, min(entries, s + 1000)):
                pid = base + i
                pipe.zadd(f"{{bench:h:{i % keys}}}:tl", {f"{pid:019d}:1": float(pid)})
            await pipe.execute()
        elapsed = time.perf_counter() - start
        for s in range(0, keys, 1000):
            await r.delete(*(f"{{bench:h:{i}}}:tl" for i in range(s, min(keys, s + 1000))))
        return entries / elapsed

    return float(be.run(go()))


# --------------------------------------------------------------------------- the run


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class _Run:
    def __init__(self, s: _Settings, ui: ProgressUI, lg: LoadGenerator, report: RunReport) -> None:
        self.s = s
        self.ui = ui
        self.lg = lg
        self.report = report
        self.plan = SearchPlan(probe_s=s.probe_s, step_s=s.step_s, concurrency=s.concurrency,
                               resolution=s.resolution, max_steps=s.max_steps,
                               settle_s=s.settle_s, confirm_failures=1)
        self.criteria = SearchCriteria(p99_limit_ms=s.p99_limit_ms)

    def search(self, key: str, target: Any, cpu_pid: int | None = None) -> SearchResult:
        """A step search; with ``cpu_pid``, that process's CPU per successful call too."""
        self.lg.setup(target)
        cpu = CpuWindow()
        before = _process_cpu_s(cpu_pid) if cpu_pid else 0.0
        res = find_max_rate(self.lg, self.plan, self.criteria, on_step=self.ui.step,
                            on_result=lambda st: self.ui.log(st.line()))
        usage = cpu.close()
        summary: dict[str, Any] = {**res.summary(), "cpu": usage}
        if cpu_pid:
            calls = res.probe.ok + sum(st.result.ok for st in res.steps)
            if calls:
                summary["server_cpu_us_per_call"] = round(
                    (_process_cpu_s(cpu_pid) - before) / calls * 1e6, 1)
        note = ""
        if usage.get("foreign_cores", 0.0) >= 0.2:
            note = f" [yellow](other processes busy: {usage['foreign_cores']:.1f} cores)[/]"
        self.ui.log(f"  [bold]{target.name}: max {res.max_rps:,.0f}/s[/]" + note)
        self.report.measurements.setdefault("searches", {})[key] = summary
        return res

    def at_rate(self, key: str, target: Any, rate: float) -> StepResult:
        if rate <= 0:
            raise HarnessError(f"{target.name}: no rate to run at")
        self.lg.setup(target)
        time.sleep(self.s.settle_s)
        label = f"{target.name} @ {rate:,.0f}/s"
        cpu = CpuWindow()
        step = self.lg.run_open(rate, self.s.half_s, progress=self.ui.step(label, self.s.half_s))
        usage = cpu.close()
        self.ui.log(f"  {label}: p50 {step.latency.percentile_ms(50):.2f} ms, "
                    f"p99 {step.latency.percentile_ms(99):.2f} ms, "
                    f"achieved {step.achieved_rps:,.0f}/s")
        self.report.measurements.setdefault("fixed_rate_runs", {})[key] = {**step.summary(),
                                                                       "cpu": usage}
        return step


def _home_scenario(s: _Settings, run: _Run, be: _Backend, stack: Stack, echo: Any,
                   ui: ProgressUI, report: RunReport) -> None:
    import grpc
    from sysdesign.feed.v1 import feed_pb2 as pb

    from servers.feed.generate import load_edges

    sc = Scenario("home", f"1. GetHomeTimeline, page of 20, warm ({s.readers} readers)")
    report.scenarios.append(sc)
    try:
        with ui.phase(f"home: {s.readers} readers following 20 of {s.authors} authors"):
            authors = be.users("hauthor", s.authors, ui.count("registering authors", s.authors))
            readers = be.users("hreader", s.readers, ui.count("registering readers", s.readers))
            rnd = random.Random(s.seed)
            celebs = authors[:2]
            edges = [(r[0], a[0]) for r in readers
                     for a in [*celebs, *rnd.sample(authors[2:], 18)]]
            be.run(load_edges(be.core, edges))
            from servers.feed.generate import load_followers

            for uid, _ in celebs:  # past the threshold: their posts are merged at read time
                be.run(load_followers(be.core, uid, s.threshold))
            posts = ui.count("posting 10 posts per author", 10 * s.authors)

            async def post_all() -> None:
                sem = asyncio.Semaphore(32)
                done = 0

                async def one(uid: int, name: str, i: int) -> None:
                    nonlocal done
                    async with sem:
                        await be.core.posts.create(uid, name, f"{name} says #{i}: the quick brown "
                                                              "fox jumps over the lazy dog")
                    done += 1
                    posts(done)

                await asyncio.gather(*(one(u, n, i) for i in range(10) for u, n in authors))

            be.run(post_all())
            be.wait_idle()
        with ui.phase("home: warming every reader's timeline"):
            calls: list[tuple[bytes, str]] = []
            req = pb.GetHomeTimelineRequest(page_size=20).SerializeToString()
            sizes = []
            with grpc.insecure_channel(stack.grpc_addr) as ch:
                call = ch.unary_unary(HOME_METHOD)
                for uid, name in readers:
                    tok = be.token(uid, name)
                    resp = pb.GetHomeTimelineResponse.FromString(
                        call(req, metadata=(("authorization", f"Bearer {tok}"),), timeout=30))
                    if len(resp.posts) != 20:
                        raise HarnessError(f"{name}: {len(resp.posts)} posts on a warm page")
                    sizes.append(resp.ByteSize())
                    calls.append((req, tok))
            payload = round(statistics.mean(sizes))
        rnd = random.Random(s.seed)
        echo_t = GrpcUnaryTarget("grpc echo floor", echo.address, ECHO_METHOD,
                                 RandomChoice(tuple(rnd.randbytes(payload) for _ in range(16))))
        home_t = MultiUserTarget("GetHomeTimeline", stack.grpc_addr, HOME_METHOD, tuple(calls))
        with ui.phase("grpc echo floor: max throughput"):
            e = run.search("echo", echo_t)
        with ui.phase("GetHomeTimeline: max throughput"):
            h = run.search("home", home_t, cpu_pid=stack.pid)
        sc.rows.append(Row("max throughput", h.max_rps, "/s", e.max_rps, "grpc echo", ">=",
                           HOME_THROUGHPUT_MIN))
        with ui.phase("p99 at half the echo's max: echo, then GetHomeTimeline"):
            half = e.max_rps / 2
            ef = run.at_rate("echo@echo_max/2", echo_t, half)
            hf = run.at_rate("home@echo_max/2", home_t, half)
        bad = hf.error_fraction > 0.01
        sc.rows.append(Row(f"p50 latency @ {half:,.0f}/s (½ echo max)",
                           hf.latency.percentile_ms(50), "ms", ef.latency.percentile_ms(50),
                           "grpc echo"))
        sc.rows.append(Row(f"p99 latency @ {half:,.0f}/s (½ echo max)",
                           None if bad else hf.latency.percentile_ms(99), "ms",
                           ef.latency.percentile_ms(99), "grpc echo", "<=", HOME_P99_MAX,
                           note=f"{hf.failed} of {hf.scheduled} failed" if bad else ""))
        searches = report.measurements.get("searches", {})
        per_call = searches.get("home", {}).get("server_cpu_us_per_call")
        if per_call:
            sc.rows.append(Row("server CPU per GetHomeTimeline", per_call / 1000, "ms",
                               note="sysdesign up process, over the whole search"))
        for key in ("echo", "home"):
            foreign = searches.get(key, {}).get("cpu", {}).get("foreign_cores", 0.0)
            if foreign >= 0.2:
                sc.notes.append(f"other processes used {foreign:.1f} of 2 cores during the {key} "
                                "search: compare the two with care")
        sc.notes.append(f"each request: a random reader's token; 20 posts hydrated of ~"
                        f"{10 * 20} pushed entries plus 2 celebrities merged at read time; "
                        f"echo payload {payload} bytes (the mean response); responses not "
                        "deserialized for either")
    except HarnessError as exc:
        sc.error = str(exc)


def _fanout_scenario(s: _Settings, be: _Backend, ui: ProgressUI, report: RunReport) -> None:
    from servers.feed.generate import load_followers

    sc = Scenario("fanout", f"2. Fan-out worker: {s.fanout_posts} posts x "
                            f"{s.fanout_followers:,} followers")
    report.scenarios.append(sc)
    try:
        authors = be.users("fauthor", 2, lambda _d: None)
        with ui.phase(f"fanout: loading {2 * s.fanout_followers:,} followers"):
            for uid, _ in authors:
                be.run(load_followers(be.core, uid, s.fanout_followers,
                                      lambda _p, d, t: None))
        entries = s.fanout_posts * s.fanout_followers
        with ui.phase(f"fanout: {entries:,} home-timeline entries"):
            be.wait_idle()

            async def post_all() -> float:
                t0 = time.monotonic()
                for i in range(s.fanout_posts):
                    uid, name = authors[i % 2]
                    await be.core.posts.create(uid, name, f"fan me out #{i}")
                return t0

            t0 = be.run(post_all())
            t1 = be.wait_idle(every=0.01)
            rate = entries / (t1 - t0)
        with ui.phase("raw pipelined ZADD loop on the same Valkey"):
            raw = _raw_zadd_rate(be, entries, s.fanout_followers)
        sc.rows.append(Row("insert rate (entries/s)", rate, "/s", raw, "raw ZADD loop", ">=",
                           FANOUT_RATE_MIN))
        sc.notes.append("entry = one row in feed_home_timeline (table port) + one ZADD/trim "
                        "script in Redis; timed from the first CreatePost until the queue is "
                        "drained; the floor pipelines 1,000 plain ZADDs per round trip from "
                        "this process")
        sc.details.update({"entries": entries, "seconds": round(t1 - t0, 3)})
    except HarnessError as exc:
        sc.error = str(exc)


def _cost_scenario(s: _Settings, be: _Backend, stack: Stack, ui: ProgressUI, report: RunReport,
                   out_dir: Path) -> Path | None:
    import grpc
    from sysdesign.feed.v1 import feed_pb2 as pb

    from servers.feed.generate import load_followers

    sc = Scenario("cost", "3. CreatePost cost vs follower count "
                          f"(celebrity threshold {s.threshold:,})")
    report.scenarios.append(sc)
    points: list[dict[str, Any]] = []
    try:
        authors = be.users("cauthor", len(s.cost_points), lambda _d: None)
        for (uid, _), n in zip(authors, s.cost_points, strict=True):
            with ui.phase(f"cost: loading {n:,} followers"):
                bar = ui.count(f"{n:,} followers", n)

                def report_load(_phase: str, done: int, _total: int,
                                bar: Callable[[int], None] = bar) -> None:
                    bar(done)

                t = time.monotonic()
                be.run(load_followers(be.core, uid, n, report_load))
                sc.details[f"load_{n}_s"] = round(time.monotonic() - t, 1)
        with ui.phase("cost: CreatePost, then wait until every follower has the post"), \
                grpc.insecure_channel(stack.grpc_addr) as ch:
            call = ch.unary_unary(CREATE_METHOD)
            mds = [(("authorization", f"Bearer {be.token(uid, name)}"),) for uid, name in authors]
            costs: dict[int, list[float]] = {n: [] for n in s.cost_points}
            acks: dict[int, list[float]] = {n: [] for n in s.cost_points}
            # Round robin over the points, so noise from other processes lands on all of them.
            for i in range(s.cost_posts + 1):
                for md, n in zip(mds, s.cost_points, strict=True):
                    be.wait_idle()
                    req = pb.CreatePostRequest(text=f"cost probe {i}").SerializeToString()
                    t0 = time.monotonic()
                    call(req, metadata=md, timeout=120)
                    t_ack = time.monotonic()
                    t_done = be.wait_idle(every=0.001)
                    if i == 0:
                        continue  # warm-up: each author's first post
                    acks[n].append((t_ack - t0) * 1000)
                    costs[n].append((t_done - t0) * 1000)
            for n in s.cost_points:
                points.append({"followers": n, "cost_ms": statistics.median(costs[n]),
                               "ack_ms": statistics.median(acks[n]), "costs_ms": costs[n],
                               "celebrity": n >= s.threshold})
                ui.log(f"  {n:>9,} followers: cost {statistics.median(costs[n]):8.2f} ms "
                       f"(CreatePost {statistics.median(acks[n]):.2f} ms)")
        by = {p["followers"]: p for p in points}
        for p in points:
            n = p["followers"]
            kind = "pull" if p["celebrity"] else "push"
            sc.rows.append(Row(f"cost at {n:,} followers ({kind})", p["cost_ms"], "ms",
                               by[1]["cost_ms"], "at 1 follower",
                               note=f"CreatePost alone {p['ack_ms']:.2f} ms"))
        top = s.cost_points[-1]
        sc.rows.append(Row(f"cost at {top:,} vs {s.threshold:,} followers", by[top]["cost_ms"],
                           "ms", by[s.threshold]["cost_ms"], f"at {s.threshold:,}", "<=",
                           COST_FLAT_MAX))
        below = [p for p in points if not p["celebrity"]]
        if len(below) >= 2:
            sc.rows.append(Row(f"growth below the threshold ({below[-1]['followers']:,} vs 1)",
                               below[-1]["cost_ms"], "ms", below[0]["cost_ms"], "at 1 follower"))
        sc.notes.append("cost = wall time from sending CreatePost until the post is in every "
                        "follower's home timeline: for pushed authors, until the fan-out queue is "
                        "drained; for celebrities (pulled at read time), the CreatePost round "
                        f"trip. Median of {s.cost_posts} posts per point, one at a time, round robin "
                        "over the points.")
        sc.details["points"] = points
        top_load = sc.details.get(f"load_{top}_s")
        if top_load:
            sc.notes.append(f"{top:,} followers bulk-loaded through the domain layer "
                            f"({2 * top:,} table rows) in {top_load:.0f} s")
        return _plot_cost(points, s.threshold, out_dir)
    except HarnessError as exc:
        sc.error = str(exc)
        return None


def _plot_cost(points: list[dict[str, Any]], threshold: int, out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    xs = [p["followers"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(xs, [p["cost_ms"] for p in points], marker="o", label="CreatePost → in every home timeline")
    ax.plot(xs, [p["ack_ms"] for p in points], marker="s", linestyle="--",
            label="CreatePost round trip alone")
    for p in points:
        lo, hi = min(p["costs_ms"]), max(p["costs_ms"])
        ax.vlines(p["followers"], lo, hi, color="C0", alpha=0.3)
    ax.axvline(threshold, color="grey", linestyle=":", label=f"celebrity threshold ({threshold:,})")
    ax.set(xscale="log", yscale="log", xlabel="followers of the author",
           ylabel="ms (median; bars: min-max)",
           title="Cost of a post vs follower count: push below the threshold, pull above")
    from matplotlib.ticker import ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"feed-cost-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    shutil.copyfile(path, out_dir / "feed-cost-latest.png")
    return path


def _phases(s: _Settings) -> int:
    n = 2  # start, stop
    n += 5 if "home" in s.scenarios else 0
    n += 3 if "fanout" in s.scenarios else 0
    n += len(s.cost_points) + 1 if "cost" in s.scenarios else 0
    return n


def _execute(s: _Settings, o: FeedBenchOptions, report: RunReport, console: Console,
             workdir: Path) -> None:
    with contextlib.ExitStack() as ctx:
        ui = ctx.enter_context(ProgressUI(console, _phases(s), enabled=o.progress))
        with ui.phase("starting the echo floor, the stack and the load generator"):
            echo = ctx.enter_context(start_echo_floor())
            lg = ctx.enter_context(LoadGenerator(s.workers, max_inflight=s.max_inflight,
                                                 drain_s=max(10.0, s.step_s), seed=s.seed))
            env = {"SYSDESIGN_FEED_CELEBRITY_THRESHOLD": str(s.threshold), **o.extra_env}
            stack = Stack(workdir / "data", log_path=workdir / "stack.log", extra_env=env)
            stack.start()
            ctx.callback(stack.stop)
            be = _Backend(stack, s.threshold)
            be.open()
            ctx.callback(be.close)
            report.settings["stack"] = {"command": " ".join(stack.command),
                                        "grpc": stack.grpc_addr, "pid": stack.pid,
                                        "env": {k: v for k, v in stack.env().items()
                                                if k.startswith("SYSDESIGN_")}}
        run = _Run(s, ui, lg, report)
        if "home" in s.scenarios:
            _home_scenario(s, run, be, stack, echo, ui, report)
        if "fanout" in s.scenarios:
            _fanout_scenario(s, be, ui, report)
        if "cost" in s.scenarios:
            png = _cost_scenario(s, be, stack, ui, report, Path(o.out_dir))
            if png is not None:
                report.measurements["cost_plot"] = str(png)
        with ui.phase("stopping"):
            be.close()
            be.rt = None
            report.settings["stack"]["exit_code"] = stack.stop()


def run(options: FeedBenchOptions, console: Console | None = None) -> RunReport:
    console = console or Console()
    s = _settings(options)
    report = RunReport(system="feed", command=command_line(options.argv),
                       settings={k: v for k, v in asdict(s).items()}, machine=machine_info())
    report.settings["extra_env"] = dict(options.extra_env)
    report.notes.append("latency is measured from each request's scheduled send time (open loop); "
                        "the floors run on the same machine in the same run")
    workdir = Path(tempfile.mkdtemp(prefix="sysdesign-bench-feed-"))
    cpu = CpuWindow()
    try:
        _execute(s, options, report, console, workdir)
    except HarnessError as exc:
        report.error = str(exc)
    except Exception:
        report.error = traceback.format_exc()
    finally:
        report.machine["cpu_during_run"] = cpu.close()
        report.finished = datetime.now(UTC).isoformat(timespec="seconds")
        if options.keep_data:
            report.notes.append(f"data and stack log kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(options: FeedBenchOptions | None = None) -> int:
    """`sysdesign bench feed`. 0 when it measured (targets met or not), 1 on a harness error."""
    options = options or FeedBenchOptions()
    console = Console()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds the ExitStack: floors, stack and workers stop

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, stop)
    try:
        _settings(options)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return 2
    try:
        report = run(options, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130
    console.print()
    print_report(report, console)
    jpath, mpath = write_results(report, Path(options.out_dir))
    console.print(f"results: {jpath}  {mpath}")
    if "cost_plot" in report.measurements:
        console.print(f"cost curve: {report.measurements['cost_plot']}")
    if report.error:
        console.print(f"[bold red]harness error:[/] {report.error}")
        return 1
    return 1 if any(sc.error for sc in report.scenarios) else 0
