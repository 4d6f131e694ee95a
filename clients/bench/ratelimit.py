"""`sysdesign bench ratelimit`: how exactly each algorithm holds a limit, and how fast ShouldRateLimit is.

Two scenarios (``--scenarios accuracy,throughput``, both by default), each
with the processes it needs, all on 127.0.0.1, started and stopped by the
bench.

**accuracy**: how exactly each algorithm holds a limit under a flood.

- one Valkey (the embedded server's binary) that both replicas share;
- two replicas of the rate limit service, ``sysdesign serve --services
  ratelimit``, reading one config: domain ``bench`` with a descriptor per
  algorithm (``fixed_window``, ``sliding_window``, ``token_bucket``), each
  ``--limit`` requests per second (default 100);
- ``--clients`` concurrent clients (default 1,000), spread over ``--workers``
  spawned processes, client ``i`` on replica ``i % 2``. The load is open-loop:
  together the clients offer ``--rate`` calls/s (default ten times the limit),
  each on its own fixed schedule, a call sent on time whether or not the
  previous answer is back. (A closed loop of 1,000 clients would hold 1,000
  calls queued in two replicas: every answer would be a second late, and
  counting admissions by when they arrive would smear the windows.)

For each algorithm in turn the clients flood its descriptor for
``--duration`` seconds (default 60). Every admitted answer's wall-clock time
is recorded (replicas and Redis share the machine's clock, and the scripts
decide on Redis's TIME, a few milliseconds before the answer arrives). The figures, over the whole seconds of the run
after the first (a token bucket starts full, so its first second holds the
burst as well):

- **admitted per 1-s window**: the mean, and the worst window, against the
  limit. Target for the sliding window and the token bucket: the mean within
  1 % of the limit.
- **most admitted in any 1-s span** (a sliding span at 1 ms resolution, not
  aligned to the windows) during the flood.
- **the boundary burst**: after each flood, a fresh descriptor gets two
  bursts of ``limit`` concurrent calls, at 0.90 s into a second and at 0.02 s
  into the next. A fixed window admits both (twice the limit within 0.12 s);
  the sliding window counts the first burst against the second; the token
  bucket admits the first and what refilled in between.
- calls/s answered and the p99 latency of a call (from when it was due), for
  scale.

**throughput**: ShouldRateLimit calls/s of sysdesign's service and of
envoyproxy/ratelimit itself, against the gRPC echo floor, in one run.

- one Valkey that both services count in (each under its own key prefix);
- the floor: the bare grpc.aio echo server (:mod:`clients.bench.floors`);
- one replica of ``sysdesign serve --services ratelimit``;
- envoyproxy/ratelimit, built from the Go module proxy
  (:mod:`clients.envoy_ratelimit`), with its defaults (a Redis pool of 10, no
  pipelining window) and Prometheus metrics;
- one config for both: domain ``bench_throughput``, ``tier: free`` then
  ``user``, a fixed window (envoyproxy/ratelimit's only algorithm) of
  1,000,000 per minute; the requests carry ``tier=free`` and one of
  ``--users`` users (default 1,000), so every call is admitted and every
  call is decided in Redis (no over-limit cache helps either service);
- the load: the open-loop generator of :mod:`clients.bench.loadgen`, the
  same settings for all three targets; the request bytes are sent to the
  echo as they are.

For each target in turn, a step search finds its maximum sustained rate
(:func:`clients.bench.loadgen.find_max_rate`: achieved ≥ 95 % of offered,
≤ 1 % errors, p99 ≤ ``--p99-limit-ms``); then all three run one open-loop
step at a common rate, half the lower of the two services' maxima, for their
p50/p99 and the CPU the server used. Reported: the maxima, their ratios to
the echo and sysdesign's to envoyproxy/ratelimit's (the aim: at least 1x), the
latencies at the common rate, and the Redis round trips per call (EVALSHA
calls for sysdesign, INCRBY+EXPIRE pipelines for envoyproxy/ratelimit, from
Valkey's command statistics). Without Go the envoyproxy/ratelimit half is
left out with a note saying why; under ``CI=true`` that is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
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
    SearchStep,
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
from clients.bench.stack import CpuWindow, Stack, cpu_seconds, sysdesign_command

SCENARIOS = ("accuracy", "throughput")
ALGORITHMS = ("fixed_window", "sliding_window", "token_bucket")
DOMAIN = "bench"
THROUGHPUT_DOMAIN = "bench_throughput"
SHOULD_RATE_LIMIT = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
# The aim: as many calls/s as envoyproxy/ratelimit, or more.
VS_ENVOY_MIN = 1.0


@dataclass
class RateLimitBenchOptions:
    """Everything `sysdesign bench ratelimit` takes; None means the mode's default.

    quick: accuracy 200 clients, 10 s per algorithm; throughput 1-s steps, at most 4 rates per
    search (about 30 s with the processes' start).
    scenarios: a subset of accuracy, throughput.
    Accuracy: clients, duration, limit, workers, local_cache, failure_mode, redis_timeout_ms.
    Throughput: load_workers (load-generator processes, default 2), step_seconds (default 10;
    quick 1), probe_seconds (3; quick 0.5), fixed_rate_seconds (the common-rate runs, 10;
    quick 1), users (distinct users in the requests), p99_limit_ms (a step over it has not
    sustained its rate), envoy_env (extra variables for envoyproxy/ratelimit, e.g.
    {"REDIS_PIPELINE_WINDOW": "150us"}), seed (payload order).
    """

    quick: bool = False
    scenarios: Sequence[str] = SCENARIOS
    clients: int | None = None
    duration: float | None = None
    limit: int = 100
    # Calls/s the clients offer together (None: ten times the limit).
    rate: float | None = None
    workers: int | None = None
    # The replicas' over-limit cache (SYSDESIGN_RATELIMIT_LOCAL_CACHE_ENTRIES);
    # off, every call goes to Redis.
    local_cache: bool = True
    # What the replicas answer when Redis does not answer within the timeout.
    # The bench measures the algorithms, so by default a slow Redis refuses
    # (deny) and waits long (5 s); with a deployment's defaults (allow, 250 ms)
    # an overloaded machine admits what Redis did not decide in time, and the
    # report counts those answers.
    failure_mode: str = "deny"
    redis_timeout_ms: int = 5000
    load_workers: int | None = None
    step_seconds: float | None = None
    probe_seconds: float | None = None
    fixed_rate_seconds: float | None = None
    users: int = 1000
    p99_limit_ms: float = 100.0
    envoy_env: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    out_dir: Path = Path("bench-results")
    keep_data: bool = False
    progress: bool = True
    argv: list[str] | None = None

    def resolved(self) -> tuple[int, float, int]:
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown or not self.scenarios:
            raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
        clients = self.clients or (200 if self.quick else 1000)
        duration = self.duration or (10.0 if self.quick else 60.0)
        workers = self.workers or 4
        if clients < 2 or duration < 3 or workers < 1 or self.limit < 1:
            raise ValueError("need at least 2 clients, 3 s, 1 worker and a limit of 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("the offered rate must be positive")
        self.throughput()
        return clients, duration, workers

    @property
    def offered(self) -> float:
        return self.rate if self.rate is not None else 10.0 * self.limit

    def throughput(self) -> ThroughputSettings:
        q = self.quick
        t = ThroughputSettings(
            load_workers=self.load_workers or 2,
            step_s=self.step_seconds or (1.0 if q else 10.0),
            probe_s=self.probe_seconds or (0.5 if q else 3.0),
            fixed_s=self.fixed_rate_seconds or (1.0 if q else 10.0),
            settle_s=0.2 if q else 1.0,
            max_steps=4 if q else 8,
            resolution=0.1 if q else 0.05,
            confirm_failures=0 if q else 1,
            users=self.users,
            p99_limit_ms=self.p99_limit_ms,
            seed=self.seed if self.seed is not None else random.randrange(1 << 30),
        )
        if t.load_workers < 1 or t.users < 1 or t.step_s <= 0 or t.probe_s <= 0 or t.fixed_s <= 0:
            raise ValueError("need at least 1 load worker, 1 user and positive step lengths")
        return t

    def scenario_list(self) -> list[str]:
        return [x for x in SCENARIOS if x in self.scenarios]


@dataclass(frozen=True)
class ThroughputSettings:
    load_workers: int
    step_s: float
    probe_s: float
    fixed_s: float
    settle_s: float
    max_steps: int
    resolution: float
    confirm_failures: int
    users: int
    p99_limit_ms: float
    seed: int


def config_yaml(limit: int) -> str:
    lines = [f"domain: {DOMAIN}", "descriptors:"]
    for algo in ALGORITHMS:
        lines += [f"  - key: {algo}",
                  f"    rate_limit: {{unit: second, requests_per_unit: {limit}, algorithm: {algo}}}"]
    return "\n".join(lines) + "\n"


THROUGHPUT_LIMIT = 1_000_000


def throughput_config_yaml() -> str:
    """envoyproxy/ratelimit's format, nothing of sysdesign's: both services read it."""
    return (f"domain: {THROUGHPUT_DOMAIN}\n"
            "descriptors:\n"
            "  - key: tier\n"
            "    value: free\n"
            "    descriptors:\n"
            "      - key: user\n"
            f"        rate_limit: {{unit: minute, requests_per_unit: {THROUGHPUT_LIMIT}}}\n")


def throughput_requests(users: int) -> tuple[bytes, ...]:
    """One serialized RateLimitRequest per user: ``tier=free``, ``user=u<i>``, as Envoy sends it."""
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
    from envoy.service.ratelimit.v3 import rls_pb2 as pb

    entry = common.RateLimitDescriptor.Entry
    return tuple(pb.RateLimitRequest(domain=THROUGHPUT_DOMAIN, descriptors=[common.RateLimitDescriptor(
        entries=[entry(key="tier", value="free"), entry(key="user", value=f"u{i}")])]).SerializeToString()
        for i in range(users))


# --------------------------------------------------------------------------- analysis


@dataclass
class Accuracy:
    windows: list[int]          # admitted per whole second counted
    mean: float
    worst: int                  # the window furthest from the limit
    max_span: int               # most admitted in any 1-s span
    first_window: int           # the first whole second (not counted)

    def to_dict(self) -> dict[str, Any]:
        return {"windows": self.windows, "mean": self.mean, "worst": self.worst,
                "max_span": self.max_span, "first_window": self.first_window}


def analyse(admitted: list[float], start: float, end: float, limit: int) -> Accuracy:
    """Counts per whole wall-clock second in [start, end), the first whole second left out."""
    times = sorted(admitted)
    first = int(start) + 1          # the first whole second inside the run
    last = int(end)                 # exclusive: the partial last second is left out
    per: dict[int, int] = {s: 0 for s in range(first, last)}
    for t in times:
        s = int(t)
        if s in per:
            per[s] += 1
    counted = [per[s] for s in range(first + 1, last)]
    mean = sum(counted) / len(counted) if counted else 0.0
    worst = max(counted, key=lambda c: abs(c - limit)) if counted else 0
    steady = [t for t in times if first + 1 <= t < last]
    return Accuracy(counted, mean, worst, max_span(steady), first)


def max_span(times: list[float], span: float = 1.0) -> int:
    """The most timestamps in any half-open interval [t, t + span) (``times`` sorted)."""
    best = 0
    for i, t in enumerate(times):
        j = bisect_right(times, t + span - 1e-3, lo=i)
        best = max(best, j - i)
    return best


# --------------------------------------------------------------------------- load


@dataclass
class WorkerResult:
    admitted: list[float] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


async def _flood(addrs: list[str], first_client: int, clients: int, period: float, all_clients: int,
                 algo: str, start_at: float, end_at: float) -> WorkerResult:
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
    from envoy.service.ratelimit.v3 import rls_pb2 as pb
    from envoy.service.ratelimit.v3 import rls_pb2_grpc as pbg

    out = WorkerResult()
    channels = [grpc.aio.insecure_channel(a) for a in addrs]
    stubs = [pbg.RateLimitServiceStub(c) for c in channels]
    request = pb.RateLimitRequest(domain=DOMAIN, descriptors=[common.RateLimitDescriptor(
        entries=[common.RateLimitDescriptor.Entry(key=algo, value="flood")])])
    ok = pb.RateLimitResponse.OK
    calls: set[asyncio.Task[None]] = set()

    async def call(stub: Any, due: float) -> None:
        try:
            r = await stub.ShouldRateLimit(request, timeout=10)
        except grpc.aio.AioRpcError:
            out.errors += 1
            return
        now = time.time()
        out.latencies_ms.append((now - due) * 1000)
        if now >= end_at:
            return
        if r.overall_code == ok:
            out.admitted.append(now)
        else:
            out.refused += 1

    async def client(i: int) -> None:
        # client i of all_clients: one call every `period` s, the clients' schedules evenly interleaved
        stub = stubs[i % 2]
        due = start_at + period * i / all_clients
        while due < end_at:
            await asyncio.sleep(max(0.0, due - time.time()))
            t = asyncio.create_task(call(stub, due))
            calls.add(t)
            t.add_done_callback(calls.discard)
            due += period

    for ch in channels:
        await ch.channel_ready()
    await asyncio.gather(*(client(first_client + k) for k in range(clients)))
    if calls:
        await asyncio.wait(calls, timeout=15)
    for ch in channels:
        await ch.close()
    return out


def _worker(conn: Connection, addrs: list[str], first_client: int, clients: int, period: float,
            all_clients: int, algo: str, start_at: float, end_at: float) -> None:
    try:
        res = asyncio.run(_flood(addrs, first_client, clients, period, all_clients, algo,
                                 start_at, end_at))
        conn.send(("ok", res.admitted, res.refused, res.errors, res.latencies_ms))
    except BaseException as exc:  # the parent reports it
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def flood(addrs: list[str], clients: int, workers: int, algo: str, duration: float, rate: float,
          progress: Any = None) -> tuple[WorkerResult, float, float]:
    """``clients`` offering ``rate`` calls/s together to ``algo`` for ``duration`` s.

    Returns what they saw and the span.
    """
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0  # the workers' imports and connections first
    end_at = start_at + duration
    procs, pipes = [], []
    per = [clients // workers + (1 if k < clients % workers else 0) for k in range(workers)]
    first = 0
    for k in range(workers):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(child, addrs, first, per[k], clients / rate, clients, algo,
                                              start_at, end_at), daemon=True)
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
        first += per[k]
    while time.time() < end_at:
        if progress is not None:
            progress(max(0.0, min(1.0, (time.time() - start_at) / duration)))
        time.sleep(0.25)
    total = WorkerResult()
    for parent, p in zip(pipes, procs, strict=True):
        if not parent.poll(60):
            p.kill()
            raise RuntimeError("a load worker did not finish")
        msg = parent.recv()
        if msg[0] != "ok":
            raise RuntimeError(f"a load worker failed: {msg[1]}")
        _, admitted, refused, errors, lat = msg
        total.admitted += admitted
        total.refused += refused
        total.errors += errors
        total.latencies_ms += lat
        p.join(10)
    return total, start_at, end_at


async def _boundary_burst(addr: str, algo: str, limit: int) -> tuple[int, int]:
    """Admitted of ``limit`` calls at x.90 s and of ``limit`` more at (x+1).02 s, on a fresh descriptor."""
    import grpc
    from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common
    from envoy.service.ratelimit.v3 import rls_pb2 as pb
    from envoy.service.ratelimit.v3 import rls_pb2_grpc as pbg

    request = pb.RateLimitRequest(domain=DOMAIN, descriptors=[common.RateLimitDescriptor(
        entries=[common.RateLimitDescriptor.Entry(key=algo, value=f"burst-{time.time_ns()}")])])
    async with grpc.aio.insecure_channel(addr) as ch:
        await ch.channel_ready()
        stub = pbg.RateLimitServiceStub(ch)

        async def burst(at: float) -> int:
            await asyncio.sleep(max(0.0, at - time.time()))
            rs = await asyncio.gather(*(stub.ShouldRateLimit(request, timeout=10) for _ in range(limit)))
            return sum(r.overall_code == pb.RateLimitResponse.OK for r in rs)

        second = math.floor(time.time()) + 1
        return await burst(second + 0.90), await burst(second + 1.02)


# --------------------------------------------------------------------------- accuracy


def _failure_mode_answers(replicas: list[Stack]) -> int:
    from clients.bench.stack import metric_value

    return int(sum(metric_value(r.metrics(), "ratelimit_service_failure_mode_total", {})
                   for r in replicas))


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def _ratelimit_env(config_dir: Path, redis_url: str, **extra: str) -> dict[str, str]:
    return {"SYSDESIGN_REDIS_URL": redis_url, "SYSDESIGN_RATELIMIT_CONFIG_DIR": str(config_dir),
            "SYSDESIGN_ACCESS_LOG": "0", **extra}


def _accuracy(options: RateLimitBenchOptions, ui: ProgressUI, report: RunReport, root: Path) -> None:
    from servers.storage.redis_conn import EmbeddedValkey

    clients, duration, workers = options.resolved()
    report.settings.update({"clients": clients, "duration_s": duration, "limit_per_s": options.limit,
                            "offered_per_s": options.offered, "load": "open loop",
                            "workers": workers, "replicas": 2, "local_cache": options.local_cache,
                            "failure_mode": options.failure_mode,
                            "redis_timeout_ms": options.redis_timeout_ms})
    cfg = root / "config"
    cfg.mkdir()
    (cfg / "bench.yaml").write_text(config_yaml(options.limit))
    valkey = EmbeddedValkey(root / "valkey")
    replicas: list[Stack] = []
    try:
        with ui.phase("Valkey and two rate limit replicas"):
            url = valkey.start()
            env = _ratelimit_env(cfg, url, SYSDESIGN_RATELIMIT_FAILURE_MODE=options.failure_mode,
                                 SYSDESIGN_RATELIMIT_REDIS_TIMEOUT_MS=str(options.redis_timeout_ms))
            if not options.local_cache:
                env["SYSDESIGN_RATELIMIT_LOCAL_CACHE_ENTRIES"] = "0"
            for i in range(2):
                replicas.append(Stack(root / f"replica{i}", extra_env=env,
                                      command=[*sysdesign_command(), "serve", "--services",
                                               "ratelimit"]).start())
        addrs = [r.grpc_addr for r in replicas]
        series: dict[str, Accuracy] = {}
        for algo in ALGORITHMS:
            before = _failure_mode_answers(replicas)
            with ui.phase(f"{algo}: {clients} clients for {duration:g} s"):
                seen, start, end = flood(addrs, clients, workers, algo, duration, options.offered,
                                         ui.step(algo, duration))
            by_failure_mode = _failure_mode_answers(replicas) - before
            burst = asyncio.run(_boundary_burst(addrs[0], algo, options.limit))
            acc = analyse(seen.admitted, start, end, options.limit)
            series[algo] = acc
            answered = len(seen.admitted) + seen.refused
            s = Scenario(algo, f"{algo.replace('_', ' ')}: {options.limit}/s, "
                               f"{clients} clients over 2 replicas")
            target: dict[str, Any] = {}
            if algo != "fixed_window":
                target = {"target_op": "<=", "target": 1.0, "target_on": "value"}
            s.rows += [
                Row("admitted per 1-s window, mean", round(acc.mean, 2), "/s", floor=options.limit,
                    floor_name="the limit"),
                Row("mean off the limit by", round(abs(acc.mean - options.limit) / options.limit * 100, 3),
                    "%", **target),
                Row("worst 1-s window", acc.worst, "/s", floor=options.limit, floor_name="the limit"),
                Row("most admitted in any 1-s span", acc.max_span, "", floor=options.limit,
                    floor_name="the limit"),
                Row("boundary burst: admitted within 0.12 s", sum(burst), "", floor=options.limit,
                    floor_name="the limit",
                    note=f"{options.limit} calls at x.90 s, {options.limit} at (x+1).02 s: "
                         f"{burst[0]} + {burst[1]} admitted"),
                Row("calls answered", round(answered / duration), "/s"),
                Row(f"answered by the failure mode ({options.failure_mode})", by_failure_mode, "",
                    note="Redis did not answer in time: not the algorithm's decision"),
                Row("call p99", None if (p := _p99(seen.latencies_ms)) is None else round(p, 1), "ms"),
            ]
            if seen.errors:
                s.notes.append(f"{seen.errors} calls failed (not counted)")
            s.details = {"accuracy": acc.to_dict(), "refused": seen.refused, "errors": seen.errors,
                         "boundary_burst": list(burst)}
            report.scenarios.append(s)
        report.measurements["series"] = {a: acc.windows for a, acc in series.items()}
        report.measurements["plot"] = str(_plot(series, options.limit, root / "ratelimit.png"))
    except Exception:
        for r in replicas:
            tail = r.log_tail(3000)
            if tail:
                report.notes.append(tail)
        raise
    finally:
        for r in replicas:
            r.stop()
        valkey.stop()


# --------------------------------------------------------------------------- throughput


def _redis_calls(url: str) -> dict[str, int]:
    """Valkey's calls per command so far (INFO commandstats)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _calls_of(res: SearchResult, warmup: dict[str, int]) -> int:
    steps = [res.probe, *(s.result for s in res.steps)]
    return sum(warmup.values()) + sum(st.ok + st.failed for st in steps)


class _Throughput:
    """The step searches and the common-rate runs, with what each cost the server and Redis."""

    def __init__(self, t: ThroughputSettings, ui: ProgressUI, lg: LoadGenerator, report: RunReport,
                 redis_url: str) -> None:
        self.t = t
        self.ui = ui
        self.lg = lg
        self.report = report
        self.redis_url = redis_url
        self.plan = SearchPlan(probe_s=t.probe_s, step_s=t.step_s, resolution=t.resolution,
                               max_steps=t.max_steps, settle_s=t.settle_s,
                               confirm_failures=t.confirm_failures)
        self.criteria = SearchCriteria(p99_limit_ms=t.p99_limit_ms)
        self.searches: dict[str, SearchResult] = {}
        self.round_trips: dict[str, float] = {}
        self.fixed: dict[str, StepResult] = {}
        self.fixed_cpu: dict[str, float] = {}

    def search(self, key: str, target: GrpcUnaryTarget, pid: int,
               redis_commands: tuple[str, ...] = ()) -> SearchResult:
        before = _redis_calls(self.redis_url)
        warmup = self.lg.setup(target)
        cpu, server0 = CpuWindow(), cpu_seconds(pid)

        def each(st: SearchStep) -> None:
            self.ui.log(st.line())

        res = find_max_rate(self.lg, self.plan, self.criteria, on_step=self.ui.step, on_result=each)
        usage = cpu.close()
        server_cores = (cpu_seconds(pid) - server0) / max(1e-6, usage["seconds"])
        after = _redis_calls(self.redis_url)
        calls = _calls_of(res, warmup)
        if redis_commands and calls:
            made = sum(after.get(c, 0) - before.get(c, 0) for c in redis_commands)
            self.round_trips[key] = made / calls
        self.ui.log(f"  [bold]{target.name}: max {res.max_rps:,.0f}/s[/] "
                    f"(closed-loop probe {res.probe.achieved_rps:,.0f}/s)")
        self.searches[key] = res
        self.report.measurements.setdefault("searches", {})[key] = {
            **res.summary(), "cpu": usage, "server_cores": round(server_cores, 2),
            "calls": calls, "redis_round_trips_per_call": self.round_trips.get(key)}
        return res

    def at_rate(self, key: str, target: GrpcUnaryTarget, pid: int, rate: float) -> StepResult:
        self.lg.setup(target)
        time.sleep(self.t.settle_s)
        label = f"{target.name} @ {rate:,.0f}/s"
        cpu, server0 = CpuWindow(), cpu_seconds(pid)
        step = self.lg.run_open(rate, self.t.fixed_s, progress=self.ui.step(label, self.t.fixed_s))
        usage = cpu.close()
        cores = (cpu_seconds(pid) - server0) / max(1e-6, usage["seconds"])
        lat = step.latency
        self.ui.log(f"  {label}: p50 {lat.percentile_ms(50):.2f} ms, p99 {lat.percentile_ms(99):.2f} ms, "
                    f"achieved {step.achieved_rps:,.0f}/s, server {cores:.2f} cores"
                    + (f", [red]{step.failed} failed[/]" if step.failed else ""))
        self.fixed[key] = step
        self.fixed_cpu[key] = cores
        self.report.measurements.setdefault("fixed_rate_runs", {})[key] = {
            **step.summary(), "cpu": usage, "server_cores": round(cores, 2)}
        return step


def _envoy_unavailable() -> str:
    from clients import envoy_ratelimit

    return envoy_ratelimit.missing_tools()


def _throughput(options: RateLimitBenchOptions, ui: ProgressUI, report: RunReport, root: Path) -> None:
    from servers.storage.redis_conn import EmbeddedValkey

    t = options.throughput()
    report.settings["throughput"] = {**asdict(t), "envoy_env": dict(options.envoy_env)}
    sc = Scenario("throughput", "ShouldRateLimit throughput: sysdesign and envoyproxy/ratelimit "
                                "against the gRPC echo floor, one Valkey")
    report.scenarios.append(sc)
    why = _envoy_unavailable()
    if why:
        if os.environ.get("CI") == "true":
            sc.error = f"CI=true: the envoyproxy/ratelimit half may not be skipped: {why}"
            return
        sc.notes.append(f"envoyproxy/ratelimit skipped: {why}")
    cfg = root / "throughput-config"
    cfg.mkdir()
    (cfg / "bench.yaml").write_text(throughput_config_yaml())
    with contextlib.ExitStack() as es:
        with ui.phase("Valkey, the echo floor, sysdesign, envoyproxy/ratelimit and the load generator"):
            valkey = EmbeddedValkey(root / "throughput-valkey")
            url = valkey.start()
            es.callback(valkey.stop)
            echo = es.enter_context(start_echo_floor())
            ours = Stack(root / "throughput-sysdesign", extra_env=_ratelimit_env(
                cfg, url, SYSDESIGN_RATELIMIT_KEY_PREFIX="sysdesign:"),
                command=[*sysdesign_command(), "serve", "--services", "ratelimit"])
            es.callback(ours.stop)
            ours.start()
            envoy = None
            if not why:
                from clients.envoy_ratelimit import EnvoyRateLimit

                envoy = EnvoyRateLimit(root / "throughput-envoy", cfg, url, key_prefix="envoy:",
                                       extra_env=options.envoy_env)
                es.callback(envoy.stop)
                envoy.start()
            lg = es.enter_context(LoadGenerator(t.load_workers, drain_s=max(10.0, t.step_s),
                                                seed=t.seed))
        report.measurements["throughput_processes"] = {
            "grpc_echo": {"address": echo.address, "pid": echo.pid, "method": ECHO_METHOD},
            "sysdesign": {"address": ours.grpc_addr, "pid": ours.pid,
                          "command": " ".join(ours.command)},
            **({"envoyproxy/ratelimit": {"address": envoy.grpc_addr, "pid": envoy.pid,
                                         "version": _envoy_version()}} if envoy is not None else {}),
        }
        requests = RandomChoice(throughput_requests(t.users))
        echo_t = GrpcUnaryTarget("grpc echo floor", echo.address, ECHO_METHOD, requests)
        ours_t = GrpcUnaryTarget("sysdesign ratelimit", ours.grpc_addr, SHOULD_RATE_LIMIT, requests)
        run = _Throughput(t, ui, lg, report, url)
        try:
            with ui.phase("grpc echo floor: max throughput"):
                fl = run.search("echo", echo_t, echo.pid)
            with ui.phase("sysdesign ratelimit: max throughput"):
                mine = run.search("sysdesign", ours_t, ours.pid, ("evalsha", "eval"))
            theirs = None
            if envoy is not None:
                envoy_t = GrpcUnaryTarget("envoyproxy/ratelimit", envoy.grpc_addr, SHOULD_RATE_LIMIT,
                                          requests)
                with ui.phase("envoyproxy/ratelimit: max throughput"):
                    theirs = run.search("envoy", envoy_t, envoy.pid, ("incrby",))
            maxima = [x.max_rps for x in (mine, theirs) if x is not None]
            rate = min(maxima) / 2
            if rate <= 0:
                raise HarnessError("a service sustained no rate at all")
            with ui.phase(f"p50/p99 at {rate:,.0f}/s (half the lower maximum): echo, sysdesign"
                          + (", envoyproxy/ratelimit" if envoy is not None else "")):
                e = run.at_rate("echo", echo_t, echo.pid, rate)
                m = run.at_rate("sysdesign", ours_t, ours.pid, rate)
                th = run.at_rate("envoy", envoy_t, envoy.pid, rate) if envoy is not None else None
        except HarnessError as exc:
            sc.error = str(exc)
            return
        finally:
            if not ours.proc or ours.proc.poll() is not None:
                report.notes.append(ours.log_tail(3000))
            if envoy is not None and not envoy.running():
                report.notes.append(envoy.logs(3000))
    sc.rows += _throughput_rows(run, fl, mine, theirs, rate, e, m, th)
    sc.notes += [
        f"every call: one descriptor (tier=free, user=one of {t.users:,}) under a fixed window of "
        f"{THROUGHPUT_LIMIT:,}/minute, so every call is admitted and decided in Redis; both services "
        "read the same YAML and count in the same Valkey (separate key prefixes)",
        f"load: {t.load_workers} spawned Python load-generator processes, open loop, latency from "
        "each request's scheduled time; the echo floor gets the same request bytes back",
        "envoyproxy/ratelimit runs with its own defaults (REDIS_POOL_SIZE 10, no "
        "REDIS_PIPELINE_WINDOW), Prometheus metrics on and the local over-limit cache off "
        "(no call is over its limit); sysdesign with its defaults, access log off",
        "round trips per call: Valkey's EVALSHA calls (sysdesign) and INCRBY calls (envoyproxy/"
        "ratelimit: one INCRBY+EXPIRE pipeline per call here) over the calls of the search",
        "all of it shares the machine: the load generator takes CPU from the servers, the same "
        "for every target",
    ]
    sc.details = {"common_rate": round(rate, 1), "server_cores_at_common_rate":
                  {k: round(v, 2) for k, v in run.fixed_cpu.items()},
                  "redis_round_trips_per_call": {k: round(v, 3) for k, v in run.round_trips.items()}}


def _envoy_version() -> str:
    from clients import envoy_ratelimit

    return envoy_ratelimit.TOOL.version


def _throughput_rows(run: _Throughput, fl: SearchResult, mine: SearchResult, theirs: SearchResult | None,
                     rate: float, e: StepResult, m: StepResult, th: StepResult | None) -> list[Row]:
    env_max = theirs.max_rps if theirs is not None else None
    rows = [
        Row("max calls/s, sysdesign", round(mine.max_rps), "/s", fl.max_rps, "grpc echo"),
        Row("max calls/s, envoyproxy/ratelimit", None if env_max is None else round(env_max), "/s",
            fl.max_rps, "grpc echo"),
        Row("max calls/s, sysdesign vs envoyproxy/ratelimit", round(mine.max_rps), "/s", env_max,
            "envoyproxy/ratelimit", ">=" if env_max is not None else None, VS_ENVOY_MIN),
        Row(f"p99 @ {rate:,.0f}/s, sysdesign", _ms(m, 99), "ms", _ms(th, 99), "envoyproxy/ratelimit",
            note=_lost(m)),
        Row(f"p99 @ {rate:,.0f}/s, envoyproxy/ratelimit", _ms(th, 99), "ms", _ms(e, 99), "grpc echo",
            note=_lost(th)),
        Row(f"p50 @ {rate:,.0f}/s, sysdesign", _ms(m, 50), "ms", _ms(th, 50), "envoyproxy/ratelimit"),
        Row(f"p50 @ {rate:,.0f}/s, envoyproxy/ratelimit", _ms(th, 50), "ms", _ms(e, 50), "grpc echo"),
        Row(f"server CPU @ {rate:,.0f}/s, sysdesign", round(run.fixed_cpu["sysdesign"], 2), "cores",
            _round(run.fixed_cpu.get("envoy")), "envoyproxy/ratelimit"),
        Row("Redis round trips per call, sysdesign", _round(run.round_trips.get("sysdesign"), 3), "",
            _round(run.round_trips.get("envoy"), 3), "envoyproxy/ratelimit"),
    ]
    return rows


def _ms(step: StepResult | None, q: float) -> float | None:
    if step is None or step.error_fraction > 0.01:
        return None  # no honest percentile when requests were lost
    return round(step.latency.percentile_ms(q), 2)


def _lost(step: StepResult | None) -> str:
    if step is None or step.error_fraction <= 0.01:
        return ""
    return f"{step.failed} of {step.scheduled} requests failed or timed out"


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


# --------------------------------------------------------------------------- run


def run(options: RateLimitBenchOptions, console: Console) -> RunReport:
    options.resolved()
    report = RunReport(system="ratelimit", command=command_line(options.argv),
                       settings={"scenarios": ",".join(options.scenario_list()), "quick": options.quick},
                       machine=machine_info())
    root = Path(tempfile.mkdtemp(prefix="sysdesign-bench-ratelimit-"))
    parts = options.scenario_list()
    phases = (1 + len(ALGORITHMS) if "accuracy" in parts else 0) + (5 if "throughput" in parts else 0)
    cpu = CpuWindow()
    try:
        with ProgressUI(console, total_phases=phases, enabled=options.progress) as ui:
            if "accuracy" in parts:
                _accuracy(options, ui, report, root)
            if "throughput" in parts:
                _throughput(options, ui, report, root)
    except HarnessError as exc:
        report.error = str(exc)
    except Exception:
        report.error = traceback.format_exc()
    finally:
        usage = cpu.close()
        report.machine["cpu_during_run"] = usage
        if usage["foreign_cores"] >= 0.2:
            report.notes.append(
                f"other processes kept {usage['foreign_cores']:.1f} of {usage['cores']:.0f} cores "
                "busy on average during this run: the targets were measured back to back to share "
                "that noise, but re-run on a quiet machine before trusting small differences")
        report.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        plot = root / "ratelimit.png"
        if plot.exists():
            options.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, options.out_dir / "ratelimit.png")
            report.measurements["plot"] = str(options.out_dir / "ratelimit.png")
        if options.keep_data:
            report.notes.append(f"data and replica logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return report


def _plot(series: dict[str, Accuracy], limit: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for algo, acc in series.items():
        ax.plot(range(1, len(acc.windows) + 1), acc.windows, marker=".", label=algo.replace("_", " "))
    ax.axhline(limit, color="black", linewidth=0.8, linestyle="--", label=f"limit {limit}/s")
    ax.set_xlabel("second of the run")
    ax.set_ylabel("admitted in the second")
    ax.set_title("Admitted per 1-s window, two replicas sharing one Redis")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(options: RateLimitBenchOptions | None = None) -> int:
    """`sysdesign bench ratelimit`. Exit code: 0 when it measured (targets met or not), 1 on a
    harness or scenario error, 2 on bad options, 130 on Ctrl-C."""
    options = options or RateLimitBenchOptions()
    console = Console()
    try:
        options.resolved()
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
    if report.error:
        console.print(f"[bold red]harness error:[/] {report.error}")
        return 1
    return 1 if any(sc.error for sc in report.scenarios) else 0


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE pairs (``--envoy-env``)."""
    out: dict[str, str] = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"KEY=VALUE wanted, got {kv!r}")
        out[k] = v
    return out


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.bench.ratelimit")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--clients", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--rate", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--no-local-cache", action="store_true")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--failure-mode", choices=["allow", "deny"], default="deny")
    p.add_argument("--redis-timeout-ms", type=int, default=5000)
    p.add_argument("--load-workers", type=int)
    p.add_argument("--step-seconds", type=float)
    p.add_argument("--probe-seconds", type=float)
    p.add_argument("--fixed-rate-seconds", type=float)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--p99-limit-ms", type=float, default=100.0)
    p.add_argument("--envoy-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    try:
        envoy_env = parse_env(args.envoy_env)
    except ValueError as exc:
        p.error(str(exc))
    return main(RateLimitBenchOptions(
        quick=args.quick, scenarios=tuple(x.strip() for x in args.scenarios.split(",") if x.strip()),
        clients=args.clients, duration=args.duration, limit=args.limit, rate=args.rate, workers=args.workers,
        out_dir=args.out, local_cache=not args.no_local_cache, keep_data=args.keep_data,
        failure_mode=args.failure_mode, redis_timeout_ms=args.redis_timeout_ms,
        load_workers=args.load_workers, step_seconds=args.step_seconds,
        probe_seconds=args.probe_seconds, fixed_rate_seconds=args.fixed_rate_seconds,
        users=args.users, p99_limit_ms=args.p99_limit_ms, envoy_env=envoy_env, seed=args.seed,
        progress=not args.no_progress, argv=["python", "-m", "clients.bench.ratelimit", *raw]))


if __name__ == "__main__":
    sys.exit(cli())
