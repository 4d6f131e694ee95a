"""Open-loop load generation for gRPC unary calls and HTTP GETs, and the floors.

How a step is driven (wrk2-style, no coordinated omission):

- request ``i`` of a step is due at ``t0 + i / rate``; the requests are dealt
  round-robin to ``W`` worker processes (worker ``k`` sends ``i ≡ k mod W``),
  so together they follow one global schedule;
- a worker wakes up, starts every request that is due, sleeps until the next
  one is due: it never waits for a response before sending the next request;
- the in-flight requests of a worker are capped (``max_inflight``) to bound
  memory; a request over the cap waits in the worker, and since its latency
  is measured from its *scheduled* time that wait counts, as does any delay
  of the worker's own event loop (reported separately as ``send_lag``);
- ``latency`` is completion minus scheduled time; ``service`` is completion
  minus the moment the request really left (what a closed-loop tool would
  report); the difference is queueing in the client;
- ``achieved_rps`` is successful responses divided by the time from ``t0`` to
  the last completion (at least the step duration); requests still running
  ``drain_s`` after the last send are cancelled and counted as ``timed_out``.

Workers are spawned processes (``multiprocessing`` spawn context): a Python
client is slow, so one event loop per core drives a share of the rate with
many requests in flight. Each worker records log-linear histograms
(:class:`Histogram`); the parent merges them.

The maximum sustainable rate of a target is found by :func:`find_max_rate`:
a short closed-loop probe at fixed concurrency estimates the capacity ``X``,
then open-loop steps start at ``0.8 X`` and grow by ``growth`` until a step
fails (achieved < 95 % of offered, > 1 % errors, or p99 over a limit), then
bisect between the last passing and the first failing rate down to
``resolution``. A failing step is re-run once (``confirm_failures``) and
fails only if the re-run fails too, so one stall caused by another process
on a shared machine does not define the maximum. The maximum is the
achieved throughput of the best passing step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar, cast

from clients.bench.floors import ECHO_METHOD

__all__ = [
    "ECHO_METHOD",
    "GrpcUnaryTarget",
    "HarnessError",
    "Histogram",
    "HttpGetTarget",
    "LoadGenerator",
    "RandomChoice",
    "SearchCriteria",
    "SearchPlan",
    "SearchResult",
    "ServerProcess",
    "StepResult",
    "find_max_rate",
    "start_echo_floor",
    "start_http_floor",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class HarnessError(RuntimeError):
    """The harness could not measure (a process died, a target answered only errors…)."""


# --------------------------------------------------------------------------- histogram


class Histogram:
    """Latencies in integer microseconds, HDR-style log-linear buckets.

    Exact below 256 µs, then 128 sub-buckets per power of two: every recorded
    value is reported within 0.8 %. Mergeable and small (a few hundred
    buckets), so workers ship histograms, not raw samples.
    """

    __slots__ = ("count", "counts", "max_us", "min_us", "total_us")

    SUB_BITS = 7
    EXACT = 1 << (SUB_BITS + 1)  # 256

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.min_us = 0
        self.max_us = 0
        self.total_us = 0

    @classmethod
    def _key(cls, us: int) -> int:
        if us < cls.EXACT:
            return us
        shift = us.bit_length() - (cls.SUB_BITS + 1)
        return (shift << cls.SUB_BITS) + (us >> shift)

    @classmethod
    def _bounds(cls, key: int) -> tuple[int, int]:
        """The smallest and largest value of a bucket."""
        if key < cls.EXACT:
            return key, key
        shift = (key >> cls.SUB_BITS) - 1
        mantissa = key - (shift << cls.SUB_BITS)
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    def record(self, seconds: float) -> None:
        us = max(0, round(seconds * 1e6))
        key = self._key(us)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.count == 0 or us < self.min_us:
            self.min_us = us
        if us > self.max_us:
            self.max_us = us
        self.count += 1
        self.total_us += us

    def merge(self, other: Histogram) -> Histogram:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        if other.count:
            self.min_us = other.min_us if self.count == 0 else min(self.min_us, other.min_us)
            self.max_us = max(self.max_us, other.max_us)
        self.count += other.count
        self.total_us += other.total_us
        return self

    def percentile_us(self, q: float) -> float:
        """Nearest-rank percentile (``q`` in 0..100), in microseconds; 0 when empty."""
        if self.count == 0:
            return 0.0
        if q >= 100:
            return float(self.max_us)
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                lo, hi = self._bounds(key)
                mid = (lo + hi) / 2.0
                return float(min(max(mid, self.min_us), self.max_us))
        return float(self.max_us)

    def percentile_ms(self, q: float) -> float:
        return self.percentile_us(q) / 1000.0

    @property
    def mean_ms(self) -> float:
        return self.total_us / self.count / 1000.0 if self.count else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "min_us": self.min_us,
            "max_us": self.max_us,
            "total_us": self.total_us,
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        h.count = int(data["count"])
        h.min_us = int(data["min_us"])
        h.max_us = int(data["max_us"])
        h.total_us = int(data["total_us"])
        h.counts = {int(k): int(v) for k, v in data["counts"].items()}
        return h

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "mean_ms": round(self.mean_ms, 3),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "p999_ms": round(self.percentile_ms(99.9), 3),
            "max_ms": round(self.max_us / 1000.0, 3),
        }


# --------------------------------------------------------------------------- payloads, targets


class PayloadSource(Protocol[T_co]):
    """Picklable description of the requests; ``bind`` gives one worker its generator."""

    def bind(self, worker: int, seed: int) -> Callable[[], T_co]: ...


@dataclass(frozen=True)
class RandomChoice(Generic[T]):
    """Each request is one of ``items``, uniformly at random (seeded per worker)."""

    items: tuple[T, ...]

    def bind(self, worker: int, seed: int) -> Callable[[], T]:
        if not self.items:
            raise HarnessError("RandomChoice needs at least one item")
        items = self.items
        rnd = random.Random(seed * 1_000_003 + worker).random
        n = len(items)
        return lambda: items[int(rnd() * n)]


class Client(Protocol):
    async def call(self) -> str | None:
        """Send one request; None on success, else a short error label."""

    async def close(self) -> None: ...


class Target(Protocol):
    @property
    def name(self) -> str: ...

    async def connect(self, worker: int, seed: int) -> Client: ...


@dataclass(frozen=True)
class GrpcUnaryTarget:
    """A unary method called with raw (pre-serialized) request bytes.

    Responses are not deserialized, for the floor and the system alike: the
    comparison is between servers, not protobuf parsers.
    """

    name: str
    address: str
    method: str
    payloads: PayloadSource[bytes]
    metadata: tuple[tuple[str, str], ...] = ()
    channels: int = 1
    timeout_s: float = 30.0

    async def connect(self, worker: int, seed: int) -> Client:
        return _GrpcClient(self, worker, seed)


class _GrpcClient:
    def __init__(self, target: GrpcUnaryTarget, worker: int, seed: int) -> None:
        import grpc

        self._grpc = grpc
        self._next = target.payloads.bind(worker, seed)
        self._channels = [
            # A local subchannel pool: each channel gets its own HTTP/2 connection.
            grpc.aio.insecure_channel(
                target.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(max(1, target.channels))
        ]
        self._calls = [ch.unary_unary(target.method) for ch in self._channels]
        self._rr = 0
        self._metadata = target.metadata or None
        self._timeout = target.timeout_s

    async def call(self) -> str | None:
        payload = self._next()
        self._rr = (self._rr + 1) % len(self._calls)
        try:
            await self._calls[self._rr](payload, timeout=self._timeout, metadata=self._metadata)
        except self._grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return None

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


@dataclass(frozen=True)
class HttpGetTarget:
    """GET ``base_url + path`` over HTTP/1.1 keep-alive (aiohttp), redirects not followed."""

    name: str
    base_url: str
    paths: PayloadSource[str]
    expect_status: tuple[int, ...] = (200,)
    connections: int = 64
    timeout_s: float = 30.0

    async def connect(self, worker: int, seed: int) -> Client:
        return _HttpClient(self, worker, seed)


class _HttpClient:
    def __init__(self, target: HttpGetTarget, worker: int, seed: int) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._next = target.paths.bind(worker, seed)
        self._base = target.base_url.rstrip("/")
        self._expect = frozenset(target.expect_status)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=target.connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=target.timeout_s),
            auto_decompress=False,
        )

    async def call(self) -> str | None:
        url = self._base + self._next()
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                await resp.read()
                if resp.status not in self._expect:
                    return f"HTTP_{resp.status}"
        except (self._aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__
        return None

    async def close(self) -> None:
        await self._session.close()


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class _OpenSpec:
    t0_wall: float
    rate: float
    total: int
    max_inflight: int
    drain_s: float


@dataclass(frozen=True)
class _ClosedSpec:
    t0_wall: float
    concurrency: int
    duration_s: float


@dataclass
class StepResult:
    """One step of load, merged over the workers."""

    target: str
    mode: str  # "open" or "closed"
    offered_rps: float  # open loop: the schedule's rate; closed loop: 0
    concurrency: int  # closed loop: callers; open loop: the in-flight cap over all workers
    duration_s: float
    scheduled: int  # open loop: requests due; closed loop: requests sent
    ok: int
    errors: dict[str, int]
    timed_out: int
    elapsed_s: float  # t0 to the last completion
    latency: Histogram  # open loop: from the scheduled time; closed loop: from the send
    service: Histogram  # from the moment the request left
    send_lag: Histogram  # how late the worker fired requests (open loop)

    @property
    def achieved_rps(self) -> float:
        span = max(self.duration_s, self.elapsed_s)
        return self.ok / span if span > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values()) + self.timed_out

    @property
    def error_fraction(self) -> float:
        total = self.ok + self.failed
        return self.failed / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "mode": self.mode,
            "offered_rps": round(self.offered_rps, 1),
            "achieved_rps": round(self.achieved_rps, 1),
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "scheduled": self.scheduled,
            "ok": self.ok,
            "errors": dict(self.errors),
            "timed_out": self.timed_out,
            "latency": self.latency.summary(),
            "service": self.service.summary(),
            "send_lag": self.send_lag.summary(),
        }


async def _open_loop(client: Client, spec: _OpenSpec, index: int, nworkers: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    now = loop.time
    t0 = now() + (spec.t0_wall - time.time())
    rate = spec.rate
    sem = asyncio.Semaphore(spec.max_inflight)
    latency, service, lag = Histogram(), Histogram(), Histogram()
    errors: Counter[str] = Counter()
    state = {"ok": 0, "last": t0}
    pending: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        async with sem:
            sent = now()
            try:
                err = await client.call()
            except Exception as exc:  # a client bug must not kill the step
                err = type(exc).__name__
            done = now()
        if done > state["last"]:
            state["last"] = done
        if err is None:
            state["ok"] += 1
            latency.record(done - due)
            service.record(done - sent)
        else:
            errors[err] += 1

    i = index
    total = spec.total
    while i < total:
        delay = t0 + i / rate - now()
        if delay > 0:
            await asyncio.sleep(delay)
        t = now()
        while i < total:
            due = t0 + i / rate
            if due > t:
                break
            lag.record(t - due)
            task = loop.create_task(one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += nworkers
    timed_out = 0
    if pending:
        _, not_done = await asyncio.wait(set(pending), timeout=spec.drain_s)
        timed_out = len(not_done)
        for task in not_done:
            task.cancel()
        if not_done:
            await asyncio.gather(*not_done, return_exceptions=True)
    return {
        "ok": state["ok"],
        "errors": dict(errors),
        "timed_out": timed_out,
        "scheduled": len(range(index, total, nworkers)),
        "elapsed_s": state["last"] - t0,
        "latency": latency.to_dict(),
        "service": service.to_dict(),
        "send_lag": lag.to_dict(),
    }


async def _closed_loop(client: Client, spec: _ClosedSpec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    now = loop.time
    t0 = now() + (spec.t0_wall - time.time())
    end = t0 + spec.duration_s
    latency = Histogram()
    errors: Counter[str] = Counter()
    state = {"ok": 0, "sent": 0, "last": t0}

    async def caller() -> None:
        delay = t0 - now()
        if delay > 0:
            await asyncio.sleep(delay)
        while now() < end:
            sent = now()
            state["sent"] += 1
            try:
                err = await client.call()
            except Exception as exc:
                err = type(exc).__name__
            done = now()
            state["last"] = max(state["last"], done)
            if err is None:
                state["ok"] += 1
                latency.record(done - sent)
            else:
                errors[err] += 1

    if spec.concurrency > 0:
        await asyncio.gather(*(caller() for _ in range(spec.concurrency)))
    return {
        "ok": state["ok"],
        "errors": dict(errors),
        "timed_out": 0,
        "scheduled": state["sent"],
        "elapsed_s": state["last"] - t0,
        "latency": latency.to_dict(),
        "service": latency.to_dict(),
        "send_lag": Histogram().to_dict(),
    }


async def _warmup(client: Client, calls: int, concurrency: int) -> dict[str, int]:
    errors: Counter[str] = Counter()
    remaining = [calls]

    async def caller() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            err = await client.call()
            errors["ok" if err is None else err] += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return dict(errors)


async def _worker_async(conn: Connection, index: int, nworkers: int) -> None:
    loop = asyncio.get_running_loop()
    client: Client | None = None
    while True:
        try:
            cmd, arg = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):
            break
        try:
            if cmd == "setup":
                if client is not None:
                    await client.close()
                    client = None
                target, seed, warmup_calls = arg
                client = await target.connect(index, seed)
                reply: Any = await _warmup(client, warmup_calls, 8)
            elif cmd == "open":
                assert client is not None, "setup first"
                reply = await _open_loop(client, arg, index, nworkers)
            elif cmd == "closed":
                assert client is not None, "setup first"
                spec: _ClosedSpec = arg
                share = spec.concurrency // nworkers + int(index < spec.concurrency % nworkers)
                reply = await _closed_loop(
                    client, _ClosedSpec(spec.t0_wall, share, spec.duration_s)
                )
            elif cmd == "exit":
                conn.send(("ok", None))
                break
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", reply))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()


def _worker_main(conn: Connection, index: int, nworkers: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    asyncio.run(_worker_async(conn, index, nworkers))


ProgressFn = Callable[[float], None]


class LoadGenerator:
    """``workers`` spawned processes that drive one target together.

    Use as a context manager; call :meth:`setup` with a target, then any
    number of :meth:`run_open` / :meth:`run_closed` steps.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        max_inflight: int = 1024,
        drain_s: float = 10.0,
        warmup_calls: int = 64,
        seed: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.max_inflight = max_inflight
        self.drain_s = drain_s
        self.warmup_calls = warmup_calls
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._target: Target | None = None

    # lifecycle ------------------------------------------------------------

    def start(self) -> LoadGenerator:
        ctx = mp.get_context("spawn")
        for i in range(self.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, i, self.workers), name=f"loadgen-{i}", daemon=True
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        return self

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(("exit", None))
        deadline = time.monotonic() + 5
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> LoadGenerator:
        return self if self._procs else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # commands ---------------------------------------------------------------

    def _broadcast(self, cmd: str, arg: Any, timeout: float, progress: ProgressFn | None = None,
                   expected_s: float = 0.0) -> list[Any]:
        if not self._conns:
            raise HarnessError("load generator not started")
        for conn in self._conns:
            conn.send((cmd, arg))
        replies: dict[int, Any] = {}
        start = time.monotonic()
        deadline = start + timeout
        index = {id(c): i for i, c in enumerate(self._conns)}
        while len(replies) < len(self._conns):
            waiting = [c for i, c in enumerate(self._conns) if i not in replies]
            for ready in mp_wait(waiting, timeout=0.1):
                conn = cast(Connection, ready)
                i = index[id(conn)]
                try:
                    status, payload = conn.recv()
                except EOFError as exc:
                    raise HarnessError(f"load worker {i} exited") from exc
                if status != "ok":
                    raise HarnessError(f"load worker {i} failed on {cmd}:\n{payload}")
                replies[i] = payload
            if progress is not None and expected_s > 0:
                progress(min(1.0, (time.monotonic() - start) / expected_s))
            for i, proc in enumerate(self._procs):
                if i not in replies and not proc.is_alive():
                    raise HarnessError(f"load worker {i} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise HarnessError(f"load workers did not answer {cmd} within {timeout:.0f} s")
        if progress is not None:
            progress(1.0)
        return [replies[i] for i in range(len(self._conns))]

    def setup(self, target: Target) -> dict[str, int]:
        """Connect every worker to ``target`` and warm it up; returns the warm-up outcomes."""
        replies = self._broadcast("setup", (target, self.seed, self.warmup_calls), timeout=120)
        self._target = target
        merged: Counter[str] = Counter()
        for r in replies:
            merged.update(r)
        if merged and merged.get("ok", 0) == 0:
            raise HarnessError(f"{target.name}: every warm-up call failed: {dict(merged)}")
        return dict(merged)

    def _merge(self, replies: list[dict[str, Any]], mode: str, offered: float, concurrency: int,
               duration: float) -> StepResult:
        assert self._target is not None
        errors: Counter[str] = Counter()
        latency, service, lag = Histogram(), Histogram(), Histogram()
        for r in replies:
            errors.update(r["errors"])
            latency.merge(Histogram.from_dict(r["latency"]))
            service.merge(Histogram.from_dict(r["service"]))
            lag.merge(Histogram.from_dict(r["send_lag"]))
        return StepResult(
            target=self._target.name,
            mode=mode,
            offered_rps=offered,
            concurrency=concurrency,
            duration_s=duration,
            scheduled=sum(r["scheduled"] for r in replies),
            ok=sum(r["ok"] for r in replies),
            errors=dict(errors),
            timed_out=sum(r["timed_out"] for r in replies),
            elapsed_s=max(r["elapsed_s"] for r in replies),
            latency=latency,
            service=service,
            send_lag=lag,
        )

    def run_open(self, rate: float, duration_s: float, *, progress: ProgressFn | None = None,
                 start_delay_s: float = 0.3) -> StepResult:
        """Open loop: ``round(rate * duration_s)`` requests, request i due at t0 + i/rate."""
        if rate <= 0 or duration_s <= 0:
            raise ValueError("rate and duration must be positive")
        total = max(1, round(rate * duration_s))
        spec = _OpenSpec(time.time() + start_delay_s, rate, total, self.max_inflight, self.drain_s)
        expected = start_delay_s + duration_s
        replies = self._broadcast("open", spec, timeout=expected + self.drain_s + 60,
                                  progress=progress, expected_s=expected)
        return self._merge(replies, "open", rate, self.max_inflight * self.workers, total / rate)

    def run_closed(self, concurrency: int, duration_s: float, *, progress: ProgressFn | None = None,
                   start_delay_s: float = 0.3) -> StepResult:
        """Closed loop: ``concurrency`` callers (over all workers) send back to back."""
        spec = _ClosedSpec(time.time() + start_delay_s, concurrency, duration_s)
        expected = start_delay_s + duration_s
        replies = self._broadcast("closed", spec, timeout=expected + 60 + 30,
                                  progress=progress, expected_s=expected)
        return self._merge(replies, "closed", 0.0, concurrency, duration_s)


# --------------------------------------------------------------------------- step search


@dataclass(frozen=True)
class SearchCriteria:
    """When an open-loop step counts as sustained."""

    min_achieved_fraction: float = 0.95
    max_error_fraction: float = 0.01
    p99_limit_ms: float = 100.0

    def check(self, step: StepResult) -> tuple[bool, str]:
        reasons = []
        if step.achieved_rps < self.min_achieved_fraction * step.offered_rps:
            reasons.append(
                f"achieved {step.achieved_rps:,.0f} < {self.min_achieved_fraction:.0%} of offered"
            )
        if step.error_fraction > self.max_error_fraction:
            reasons.append(f"errors {step.error_fraction:.1%}")
        p99 = step.latency.percentile_ms(99)
        if p99 > self.p99_limit_ms:
            reasons.append(f"p99 {p99:,.1f} ms > {self.p99_limit_ms:g} ms")
        return (not reasons, "; ".join(reasons) or "ok")


@dataclass(frozen=True)
class SearchPlan:
    probe_s: float = 3.0
    step_s: float = 10.0
    concurrency: int = 64  # closed-loop probe callers, over all workers
    start_fraction: float = 0.8
    growth: float = 1.2
    backoff: float = 0.6
    resolution: float = 0.05  # stop bisecting when failing/passing rate <= 1 + resolution
    max_steps: int = 8
    settle_s: float = 1.0  # idle time between steps, so a backlog drains
    # A failing step is run again this many times and fails only if every run
    # fails: one stall of a noisy neighbour must not define the maximum.
    confirm_failures: int = 1


@dataclass
class SearchStep:
    result: StepResult
    passed: bool
    reason: str

    def summary(self) -> dict[str, Any]:
        return {**self.result.summary(), "passed": self.passed, "reason": self.reason}

    def line(self) -> str:
        """One line of a step search's progress log (rich markup)."""
        r = self.result
        mark = "[green]✔[/]" if self.passed else f"[red]✘ {self.reason}[/]"
        return (f"  {r.target}: {r.offered_rps:,.0f}/s offered → {r.achieved_rps:,.0f}/s, "
                f"p50 {r.latency.percentile_ms(50):.2f} ms, p99 {r.latency.percentile_ms(99):.2f} ms "
                f"{mark}")


@dataclass
class SearchResult:
    target: str
    probe: StepResult
    steps: list[SearchStep] = field(default_factory=list)
    best: StepResult | None = None

    @property
    def max_rps(self) -> float:
        return self.best.achieved_rps if self.best is not None else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "max_rps": round(self.max_rps, 1),
            "probe": self.probe.summary(),
            "steps": [s.summary() for s in self.steps],
        }


StepCallback = Callable[[str, float], ProgressFn | None]


def find_max_rate(
    lg: LoadGenerator,
    plan: SearchPlan,
    criteria: SearchCriteria | None = None,
    *,
    on_step: StepCallback | None = None,
    on_result: Callable[[SearchStep], None] | None = None,
) -> SearchResult:
    """The target's maximum sustained open-loop rate (see the module docstring).

    ``on_step(label, seconds)`` is called before each step and may return a
    progress function; ``on_result`` after each open-loop step.
    """
    assert lg._target is not None, "setup first"
    criteria = criteria or SearchCriteria()
    name = lg._target.name
    cb = on_step or (lambda label, secs: None)
    probe = lg.run_closed(plan.concurrency, plan.probe_s,
                          progress=cb(f"{name}: closed-loop probe", plan.probe_s))
    if probe.ok == 0 or probe.error_fraction > 0.5:
        raise HarnessError(f"{name}: the probe got errors only: {probe.errors}")
    out = SearchResult(target=name, probe=probe)
    rate = max(1.0, probe.achieved_rps * plan.start_fraction)
    lo: float | None = None
    hi: float | None = None
    for _ in range(plan.max_steps):
        for attempt in range(1 + max(0, plan.confirm_failures)):
            time.sleep(plan.settle_s)
            again = " (again)" if attempt else ""
            step = lg.run_open(rate, plan.step_s,
                               progress=cb(f"{name}: open loop @ {rate:,.0f}/s{again}", plan.step_s))
            passed, reason = criteria.check(step)
            s = SearchStep(step, passed, reason)
            out.steps.append(s)
            if on_result is not None:
                on_result(s)
            if passed:
                break
        if passed:
            lo = rate if lo is None else max(lo, rate)
            if out.best is None or step.achieved_rps > out.best.achieved_rps:
                out.best = step
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:
            assert lo is not None
            rate = lo * plan.growth
        elif lo is None:
            rate = hi * plan.backoff
        elif hi / lo <= 1 + plan.resolution:
            break
        else:
            rate = (lo + hi) / 2
    return out


# --------------------------------------------------------------------------- floor processes


class ServerProcess:
    """A server subprocess that prints ``{"port": N, ...}`` once it listens."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 30.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr_tail(self, limit: int = 4000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]

    def start(self) -> ServerProcess:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
            env=self.env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout_s
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line:
            self.stop()
            raise HarnessError(f"{self.name} did not start:\n{self.stderr_tail()}")
        self.port = int(json.loads(line)["port"])
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _floor_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def start_echo_floor(
    *, delay_ms: float = 0.0, serial: bool = False, port: int = 0
) -> ServerProcess:
    """The bare grpc.aio echo server (method :data:`ECHO_METHOD`), started and listening."""
    argv = [sys.executable, "-m", "clients.bench.floors", "echo", "--port", str(port),
            "--delay-ms", str(delay_ms)]
    if serial:
        argv.append("--serial")
    return ServerProcess("grpc echo floor", argv, env=_floor_env()).start()


def start_http_floor(*, port: int = 0) -> ServerProcess:
    """The bare aiohttp 301 server, started and listening."""
    argv = [sys.executable, "-m", "clients.bench.floors", "http301", "--port", str(port)]
    return ServerProcess("aiohttp 301 floor", argv, env=_floor_env()).start()


@contextlib.contextmanager
def running(*servers: Callable[[], ServerProcess]) -> Iterator[list[ServerProcess]]:
    """Start several servers, stop them all on exit."""
    started: list[ServerProcess] = []
    try:
        for factory in servers:
            started.append(factory())
        yield started
    finally:
        for s in reversed(started):
            s.stop()
