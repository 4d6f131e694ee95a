"""The open-loop generator against the real echo floor process (no timing thresholds).

The bounds asserted below are logical, not speed expectations: a server that
sleeps ``d`` per request and sees one request at a time cannot finish request
``i`` before ``(i + 1) * d`` after the start, whatever the machine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import pytest

from clients.bench.loadgen import (
    ECHO_METHOD,
    GrpcUnaryTarget,
    Histogram,
    LoadGenerator,
    RandomChoice,
    SearchCriteria,
    ServerProcess,
    StepResult,
    start_echo_floor,
)


@pytest.fixture(scope="module")
def echo() -> Iterator[ServerProcess]:
    with start_echo_floor() as server:
        yield server


def _target(address: str) -> GrpcUnaryTarget:
    return GrpcUnaryTarget("echo", address, ECHO_METHOD, RandomChoice((b"a" * 64, b"b" * 64)))


def test_open_loop_completes_the_schedule(echo: ServerProcess) -> None:
    with LoadGenerator(workers=2) as lg:
        warm = lg.setup(_target(echo.address))
        assert warm == {"ok": lg.warmup_calls * 2}
        step = lg.run_open(rate=200, duration_s=1.0)
    assert step.scheduled == 200
    assert step.ok == 200
    assert step.errors == {}
    assert step.timed_out == 0
    assert step.latency.count == step.service.count == step.send_lag.count == 200
    assert step.offered_rps == 200
    assert step.achieved_rps > 0
    # Every request's latency from its scheduled time is at least its service time.
    for q in (0, 50, 90, 99, 100):
        assert step.latency.percentile_us(q) >= step.service.percentile_us(q)


def test_latency_is_measured_from_the_scheduled_time() -> None:
    """One request in flight at a time against a 20 ms handler, 100 scheduled per second.

    Request i is due at i * 10 ms but cannot complete before (i + 1) * 20 ms:
    measured from its schedule, the last of 50 requests waited at least
    50 * 20 - 490 = 510 ms, although each one spent only ~20 ms on the wire.
    A generator that measured from the actual send (coordinated omission)
    would never report that queueing.
    """
    n, rate, delay_ms = 50, 100.0, 20.0
    with start_echo_floor(delay_ms=delay_ms) as slow, LoadGenerator(
        workers=1, max_inflight=1, warmup_calls=2
    ) as lg:
        lg.setup(_target(slow.address))
        step = lg.run_open(rate=rate, duration_s=n / rate)
    assert step.scheduled == n
    assert step.ok == n
    lower_bound_us = (n * delay_ms - (n - 1) * 1000.0 / rate) * 1000.0
    assert step.latency.max_us >= lower_bound_us
    # The service time (send to response) never includes the client-side queue.
    assert step.service.min_us >= delay_ms * 1000.0
    # Queueing grows along the schedule: the median request also waited for
    # the ~25 before it: (26 * 20 - 25 * 10) ms = 270 ms at least.
    assert step.latency.percentile_us(50) >= (26 * delay_ms - 25 * 1000.0 / rate) * 1000.0 * 0.99
    assert step.elapsed_s >= n * delay_ms / 1000.0


def test_closed_loop_counts_what_it_sent(echo: ServerProcess) -> None:
    with LoadGenerator(workers=2, warmup_calls=4) as lg:
        lg.setup(_target(echo.address))
        step = lg.run_closed(concurrency=4, duration_s=0.5)
    assert step.ok > 0
    assert step.scheduled == step.ok + step.failed
    assert step.latency.count == step.ok


def test_histogram_percentiles_within_one_percent() -> None:
    rnd = random.Random(7)
    values = sorted(rnd.randint(1, 5_000_000) for _ in range(20_000))
    h = Histogram()
    for v in values:
        h.record(v / 1e6)
    for q in (1, 50, 90, 99, 99.9):
        exact = values[max(0, math.ceil(len(values) * q / 100) - 1)]
        got = h.percentile_us(q)
        assert abs(got - exact) <= max(1.0, 0.01 * exact), (q, got, exact)
    assert h.percentile_us(100) == values[-1]
    assert h.min_us == values[0]
    # Merging two halves equals recording everything.
    a, b = Histogram(), Histogram()
    for i, v in enumerate(values):
        (a if i % 2 else b).record(v / 1e6)
    merged = Histogram.from_dict(a.to_dict()).merge(b)
    assert merged.counts == h.counts
    assert (merged.count, merged.min_us, merged.max_us) == (h.count, h.min_us, h.max_us)


def test_histogram_exact_below_256us() -> None:
    h = Histogram()
    for us in range(256):
        h.record(us / 1e6)
    assert h.percentile_us(50) == 127
    assert len(h.counts) == 256


def test_criteria_flags_a_backlog() -> None:
    lat = Histogram()
    for _ in range(100):
        lat.record(0.5)
    step = StepResult(
        target="t", mode="open", offered_rps=100, concurrency=1, duration_s=1.0, scheduled=100,
        ok=100, errors={}, timed_out=0, elapsed_s=2.0, latency=lat, service=Histogram(),
        send_lag=Histogram(),
    )
    passed, reason = SearchCriteria().check(step)
    assert not passed
    assert "achieved" in reason and "p99" in reason
