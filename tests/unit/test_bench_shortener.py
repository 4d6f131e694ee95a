"""The shortener benchmark's pieces, and one quick end-to-end run against the real stack.

No timing is asserted: the end-to-end run checks that the harness measures
every scenario and writes its results, not what the figures are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clients.bench.report import Row, RunReport, Scenario, to_markdown, write_results
from clients.bench.shortener import (
    SCENARIOS,
    BulkResolveRequests,
    CreateRequests,
    ShortenerBenchOptions,
    _settings,
    bulk_code,
    main,
)
from clients.bench.stack import CpuWindow, rss_tree


def test_bulk_codes_are_distinct_8_char_base62() -> None:
    codes = [bulk_code(i) for i in range(50_000)]
    assert len(set(codes)) == len(codes)
    assert all(len(c) == 8 and c.isalnum() and c.isascii() for c in codes)
    assert bulk_code(123) == bulk_code(123)


def test_payload_sources_make_valid_requests() -> None:
    from sysdesign.shortener.v1 import shortener_pb2

    make = BulkResolveRequests(10).bind(0, 1)
    codes = {shortener_pb2.ResolveShortUrlRequest.FromString(make()).code for _ in range(200)}
    assert codes <= {bulk_code(i) for i in range(10)}
    a, b = CreateRequests("t").bind(0, 1), CreateRequests("t").bind(1, 1)
    urls = [shortener_pb2.CreateShortUrlRequest.FromString(f()).long_url for f in (a, a, b)]
    assert len(set(urls)) == 3
    assert all(u.startswith("https://") for u in urls)


def test_row_verdicts() -> None:
    assert Row("t", 70, "/s", 100, "f", ">=", 0.7).passed is True
    assert Row("t", 69, "/s", 100, "f", ">=", 0.7).passed is False
    assert Row("p99", 3.0, "ms", 1.0, "f", "<=", 2.0).passed is False
    assert Row("rss", 240, "MiB", 100, "f", "<=", 250, target_on="value").passed is True
    assert Row("info", 1, "ms", 2).passed is None
    assert Row("lost", None, "ms", 2, "f", "<=", 2.0).passed is False


def test_results_files(tmp_path: Path) -> None:
    sc = Scenario("x", "X", rows=[Row("max throughput", 700, "/s", 1000, "echo", ">=", 0.7)])
    report = RunReport("demo", "sysdesign bench demo", {"quick": True}, scenarios=[sc])
    jpath, mpath = write_results(report, tmp_path)
    data = json.loads(jpath.read_text())
    assert data["scenarios"][0]["rows"][0]["ratio"] == 0.7
    assert data["scenarios"][0]["passed"] is True
    assert "| max throughput | 700 /s | 1,000 /s (echo) | 0.70x |" in mpath.read_text()
    assert (tmp_path / "demo-latest.json").exists()
    assert "PASS" in to_markdown(report)


def test_settings_defaults_and_bad_scenarios() -> None:
    full = _settings(ShortenerBenchOptions())
    assert full.links == 1_000_000 and full.step_s == 10.0
    quick = _settings(ShortenerBenchOptions(quick=True))
    assert quick.links == 10_000 and quick.step_s < full.step_s
    with pytest.raises(ValueError):
        _settings(ShortenerBenchOptions(scenarios=("nope",)))


def test_process_accounting() -> None:
    sample = rss_tree(os.getpid())
    assert sample.server_mib > 0
    usage = CpuWindow().close()
    assert set(usage) >= {"foreign_cores", "bench_cores", "machine_busy_cores"}


@pytest.mark.slow
def test_quick_run_measures_every_scenario(tmp_path: Path) -> None:
    """`sysdesign bench shortener --quick`, smaller still: every scenario measured and written."""
    code = main(ShortenerBenchOptions(
        quick=True, links=2000, hot_links=200, out_dir=tmp_path, step_seconds=1.0,
        probe_seconds=0.5, half_seconds=1.0, progress=False, argv=["sysdesign", "bench"],
    ))
    assert code == 0
    data = json.loads((tmp_path / "shortener-latest.json").read_text())
    assert data["error"] == ""
    assert [s["key"] for s in data["scenarios"]] == list(SCENARIOS)
    for s in data["scenarios"]:
        assert s["error"] == ""
        throughput = s["rows"][0]
        assert throughput["value"] > 0
    assert data["machine"]["cores"] >= 1
    assert data["command"] == "sysdesign bench"
    assert (tmp_path / "shortener-latest.md").read_text().startswith("# `shortener` benchmark")
