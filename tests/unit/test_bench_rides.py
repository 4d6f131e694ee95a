"""The rides benchmark's pieces, and one tiny end-to-end run against the real stack.

No timing is asserted: the run checks that every scenario is measured and
written, and the counts dispatch is about (no driver holds two rides, every
driver is matched, every other rider is told no driver is available).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.bench.rides import RidesBenchOptions, main, mint_tokens, sizes


def test_sizes_are_decades_up_to_the_max() -> None:
    assert sizes(1_000_000) == [10_000, 100_000, 1_000_000]
    assert sizes(10_000) == [100, 1_000, 10_000]


def test_options_resolve_and_check() -> None:
    full = RidesBenchOptions().resolved()
    assert full["drivers"] == 10_000 and full["drivers_max"] == 1_000_000
    assert full["riders"] == 1000 and full["dispatch_drivers"] == 300
    quick = RidesBenchOptions(quick=True).resolved()
    assert quick["drivers"] < full["drivers"] and quick["drivers_max"] < full["drivers_max"]
    for bad in (RidesBenchOptions(scenarios=("ingest", "nope")), RidesBenchOptions(drivers_max=50),
                RidesBenchOptions(riders=10, dispatch_drivers=10)):
        with pytest.raises(ValueError):
            bad.resolved()


def test_minted_tokens_verify_with_the_secret() -> None:
    from servers.platform.auth import TokenSigner

    secret = b"s" * 32
    toks = mint_tokens(secret, 7_000_000_000_000_000_000, 3, "u")
    assert len({t for _, t in toks}) == 3
    caller = TokenSigner(secret).verify(toks[1][1])
    assert caller.user_id == 7_000_000_000_000_000_001


def test_a_tiny_run_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(RidesBenchOptions(quick=True, drivers=20, duration=2.0, drivers_max=1000,
                                  quote_rate=20.0, quote_seconds=1.0, nearby_calls=10, riders=12,
                                  dispatch_drivers=4, out_dir=out))
    assert code == 0
    data = json.loads((out / "rides.json").read_text())
    assert (out / "rides.md").read_text().startswith("# `rides` benchmark")
    assert (out / "rides.png").stat().st_size > 0
    assert not data["error"]
    assert [s["key"] for s in data["scenarios"]] == ["ingest", "nearby", "dispatch"]
    for s in data["scenarios"]:
        assert not s["error"], s
        for row in s["rows"]:
            assert row["value"] is not None, (s["key"], row["figure"])
    ingest = data["measurements"]["ingest"]
    assert ingest["sent"] > 0 and ingest["accepted"] == ingest["sent"] and ingest["errors"] == 0
    assert ingest["floor_positions_per_s"] > 0 and ingest["lag"]["count"] > 0
    near = data["measurements"]["nearby"]["sizes"]
    assert [p["drivers"] for p in near] == [10, 100, 1000]
    assert all(p["getquote"]["count"] == 20 and p["nearby"]["count"] == 10 for p in near)
    assert near[-1]["quotes_with_eta"] > 0  # the loaded drivers are found as candidates
    dispatch = data["measurements"]["dispatch"]
    assert dispatch["double_assignments"] == 0 and dispatch["drivers_with_two_rides"] == 0
    assert dispatch["matched"] == 4 and dispatch["no_driver"] == 8 and dispatch["unsettled"] == 0
