"""The arithmetic of `sysdesign bench ratelimit` (the run itself is a benchmark, not a test)."""

from __future__ import annotations

from clients.bench.ratelimit import ALGORITHMS, analyse, config_yaml, max_span
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
