"""The arithmetic of `sysdesign bench ratelimit`, and one quick throughput run for real.

No timing is asserted: the run checks that the harness measures the echo
floor, sysdesign's service and envoyproxy/ratelimit (when Go can build it)
and writes its results, not what the figures are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clients.bench.ratelimit import (
    ALGORITHMS,
    THROUGHPUT_DOMAIN,
    THROUGHPUT_LIMIT,
    RateLimitBenchOptions,
    analyse,
    config_yaml,
    main,
    max_span,
    throughput_config_yaml,
    throughput_requests,
)
from servers.platform.ratelimit import Algorithm
from servers.ratelimit.config import RateLimitConfig


def test_the_bench_config_is_one_limit_per_algorithm_that_the_service_reads() -> None:
    cfg = RateLimitConfig()
    cfg.load_text("bench.yaml", config_yaml(100))
    for algo in ALGORITHMS:
        limit = cfg.get_limit("bench", [(algo, "flood")])
        assert limit is not None
        assert limit.rule().requests == 100 and limit.rule().window_s == 1
        assert limit.algorithm is Algorithm(algo)


def test_windows_are_whole_seconds_after_the_first() -> None:
    # 10.5 .. 15.5: seconds 11..14 are whole; 11 is left out (a bucket's burst), 15 is partial.
    times = [11.1] * 150 + [12.0 + i / 100 for i in range(100)] + [13.5] * 98 + [14.2] * 102 + [15.1] * 7
    acc = analyse(times, 10.5, 15.5, 100)
    assert acc.first_window == 11
    assert acc.windows == [100, 98, 102]
    assert acc.mean == 100.0
    assert acc.worst in (98, 102)
    assert acc.max_span == 200  # 13.5 and 14.2 are less than a second apart


def test_max_span_is_half_open() -> None:
    assert max_span([1.0, 2.0, 3.0]) == 1
    assert max_span([1.0, 1.5, 1.998, 2.5]) == 3
    assert max_span([1.0, 1.5, 1.9995, 2.5]) == 2  # 1 ms resolution
    assert max_span([]) == 0


def test_the_throughput_requests_hit_a_fixed_window_no_call_exceeds() -> None:
    from envoy.service.ratelimit.v3 import rls_pb2 as pb

    cfg = RateLimitConfig()
    cfg.load_text("bench.yaml", throughput_config_yaml())
    requests = throughput_requests(50)
    assert len(set(requests)) == 50
    for raw in requests[:3]:
        r = pb.RateLimitRequest.FromString(raw)
        assert r.domain == THROUGHPUT_DOMAIN and len(r.descriptors) == 1
        limit = cfg.get_limit(r.domain, [(e.key, e.value) for e in r.descriptors[0].entries])
        assert limit is not None and limit.algorithm is Algorithm.FIXED_WINDOW
        assert (limit.requests_per_unit, limit.unit) == (THROUGHPUT_LIMIT, "MINUTE")


def test_options_refuse_unknown_scenarios_and_quick_shortens_the_steps() -> None:
    with pytest.raises(ValueError, match="unknown scenarios"):
        RateLimitBenchOptions(scenarios=("speed",)).resolved()
    full, quick = RateLimitBenchOptions().throughput(), RateLimitBenchOptions(quick=True).throughput()
    assert quick.step_s < full.step_s and quick.max_steps < full.max_steps
    assert RateLimitBenchOptions(scenarios=("throughput", "accuracy")).scenario_list() == [
        "accuracy", "throughput"]


@pytest.mark.slow
def test_quick_throughput_run_measures_the_floor_and_both_services(tmp_path: Path) -> None:
    """`sysdesign bench ratelimit --quick --scenarios throughput`, with shorter steps still."""
    from clients import envoy_ratelimit

    # The p99 bar is loose: this run shares two cores with the rest of the
    # suite, and what it checks is that every target was driven and measured;
    # a step that fails the bar would leave nothing to measure.
    code = main(RateLimitBenchOptions(
        quick=True, scenarios=("throughput",), out_dir=tmp_path, step_seconds=0.75,
        probe_seconds=0.5, fixed_rate_seconds=0.5, users=100, progress=False,
        p99_limit_ms=2000.0, argv=["sysdesign", "bench", "ratelimit"]))
    data = json.loads((tmp_path / "ratelimit-latest.json").read_text())
    assert data["error"] == "", data["error"]
    [sc] = data["scenarios"]
    assert sc["key"] == "throughput" and sc["error"] == "", sc["error"]
    assert code == 0
    rows = {r["figure"]: r for r in sc["rows"]}
    assert rows["max calls/s, sysdesign"]["value"] > 0
    assert rows["max calls/s, sysdesign"]["floor"] > 0  # the echo floor's
    searches = data["measurements"]["searches"]
    assert searches["sysdesign"]["redis_round_trips_per_call"] > 0
    why = envoy_ratelimit.missing_tools()
    if why:
        assert os.environ.get("CI") != "true"
        assert any("envoyproxy/ratelimit skipped" in n for n in sc["notes"])
        assert rows["max calls/s, envoyproxy/ratelimit"]["value"] is None
    else:
        assert rows["max calls/s, envoyproxy/ratelimit"]["value"] > 0
        assert rows["max calls/s, sysdesign vs envoyproxy/ratelimit"]["ratio"] > 0
        assert searches["envoy"]["redis_round_trips_per_call"] > 0
        assert any(k.startswith("p99 @") and r["value"] for k, r in rows.items())
    assert (tmp_path / "ratelimit-latest.md").read_text().startswith("# `ratelimit` benchmark")
