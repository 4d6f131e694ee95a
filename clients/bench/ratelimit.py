"""`sysdesign bench ratelimit`: how exactly each algorithm holds a limit under a flood.

What runs (all on 127.0.0.1, started and stopped by the bench):

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
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rich.console import Console

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
from clients.bench.stack import Stack, sysdesign_command

ALGORITHMS = ("fixed_window", "sliding_window", "token_bucket")
DOMAIN = "bench"


@dataclass
class RateLimitBenchOptions:
    quick: bool = False
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
    out_dir: Path = Path("bench-results")
    keep_data: bool = False
    argv: list[str] | None = None

    def resolved(self) -> tuple[int, float, int]:
        clients = self.clients or (200 if self.quick else 1000)
        duration = self.duration or (10.0 if self.quick else 60.0)
        workers = self.workers or 4
        if clients < 2 or duration < 3 or workers < 1 or self.limit < 1:
            raise ValueError("need at least 2 clients, 3 s, 1 worker and a limit of 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("the offered rate must be positive")
        return clients, duration, workers

    @property
    def offered(self) -> float:
        return self.rate if self.rate is not None else 10.0 * self.limit


def config_yaml(limit: int) -> str:
    lines = [f"domain: {DOMAIN}", "descriptors:"]
    for algo in ALGORITHMS:
        lines += [f"  - key: {algo}",
                  f"    rate_limit: {{unit: second, requests_per_unit: {limit}, algorithm: {algo}}}"]
    return "\n".join(lines) + "\n"


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


# --------------------------------------------------------------------------- run


def _failure_mode_answers(replicas: list[Stack]) -> int:
    from clients.bench.stack import metric_value

    return int(sum(metric_value(r.metrics(), "ratelimit_service_failure_mode_total", {})
                   for r in replicas))


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def run(options: RateLimitBenchOptions, console: Console) -> RunReport:
    from servers.storage.redis_conn import EmbeddedValkey

    clients, duration, workers = options.resolved()
    report = RunReport(system="ratelimit", command=command_line(options.argv),
                       settings={"clients": clients, "duration_s": duration, "limit_per_s": options.limit,
                                 "offered_per_s": options.offered, "load": "open loop",
                                 "workers": workers, "replicas": 2, "local_cache": options.local_cache,
                                 "failure_mode": options.failure_mode,
                                 "redis_timeout_ms": options.redis_timeout_ms},
                       machine=machine_info())
    root = Path(tempfile.mkdtemp(prefix="sysdesign-bench-ratelimit-"))
    cfg = root / "config"
    cfg.mkdir()
    (cfg / "bench.yaml").write_text(config_yaml(options.limit))
    valkey = EmbeddedValkey(root / "valkey")
    replicas: list[Stack] = []
    try:
        with ProgressUI(console, total_phases=1 + len(ALGORITHMS)) as ui:
            with ui.phase("Valkey and two rate limit replicas"):
                url = valkey.start()
                env = {"SYSDESIGN_REDIS_URL": url, "SYSDESIGN_RATELIMIT_CONFIG_DIR": str(cfg),
                       "SYSDESIGN_ACCESS_LOG": "0",
                       "SYSDESIGN_RATELIMIT_FAILURE_MODE": options.failure_mode,
                       "SYSDESIGN_RATELIMIT_REDIS_TIMEOUT_MS": str(options.redis_timeout_ms)}
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
    except Exception as exc:
        report.error = repr(exc)
        for r in replicas:
            tail = r.log_tail(3000)
            if tail:
                report.notes.append(tail)
    finally:
        for r in replicas:
            r.stop()
        valkey.stop()
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
    return 0


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.bench.ratelimit")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--clients", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--rate", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--no-local-cache", action="store_true")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--failure-mode", choices=["allow", "deny"], default="deny")
    p.add_argument("--redis-timeout-ms", type=int, default=5000)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return main(RateLimitBenchOptions(quick=args.quick, clients=args.clients, duration=args.duration,
                                      limit=args.limit, rate=args.rate, workers=args.workers,
                                      out_dir=args.out,
                                      local_cache=not args.no_local_cache, keep_data=args.keep_data,
                                      failure_mode=args.failure_mode,
                                      redis_timeout_ms=args.redis_timeout_ms,
                                      argv=["python", "-m", "clients.bench.ratelimit",
                                            *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(cli())
