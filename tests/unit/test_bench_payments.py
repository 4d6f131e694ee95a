"""The payments benchmark's pieces, and one tiny end-to-end run against the real stack and stand-in.

No timing is asserted: the run checks that every scenario is measured and
written, and the soak's correctness counts (a clean audit, one answer per
key, reused keys refused, one charge per succeeded intent, nothing left
unsettled), which hold at any speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.bench.payments import PaymentsBenchOptions, TransferRequests, main


def test_options_resolve_and_check() -> None:
    full = PaymentsBenchOptions().resolved()
    assert full["intents"] == 10_000 and full["clients"] == 200 and full["step_seconds"] == 5.0
    quick = PaymentsBenchOptions(quick=True).resolved()
    assert quick["intents"] == 300 and quick["step_seconds"] < full["step_seconds"]
    for bad in (PaymentsBenchOptions(scenarios=("confirm", "nope")), PaymentsBenchOptions(accounts=1),
                PaymentsBenchOptions(timeout_share=1.5)):
        with pytest.raises(ValueError):
            bad.resolved()


def test_transfer_requests_are_fresh_and_between_two_accounts() -> None:
    from sysdesign.payments.v1 import payments_pb2 as pb

    src = TransferRequests((11, 12, 13), 1 << 59)
    a, b = src.bind(0, 5), src.bind(1, 5)
    reqs = [pb.CreateTransferRequest.FromString(f()) for f in (a, a, a, b, b)]
    assert len({r.transfer_id for r in reqs}) == 5
    for r in reqs:
        assert {r.debit_account_id, r.credit_account_id} <= {11, 12, 13}
        assert r.debit_account_id != r.credit_account_id and r.amount_minor > 0


def test_a_tiny_run_measures_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(PaymentsBenchOptions(quick=True, step_seconds=1.0, max_steps=1, customers=5, accounts=4,
                                     intents=40, clients=8, search_sample=20, settle_timeout=60, out_dir=out))
    assert code == 0
    data = json.loads((out / "payments.json").read_text())
    assert (out / "payments.md").read_text().startswith("# `payments` benchmark")
    assert (out / "payments.png").stat().st_size > 0
    assert not data["error"]
    assert [s["key"] for s in data["scenarios"]] == ["confirm", "ledger", "soak"]
    for s in data["scenarios"]:
        assert not s["error"], s
    for key in ("confirm", "ledger"):
        m = data["measurements"][key]
        assert m["floor"]["ops"] > 0 and m["search"]["steps"], key
    soak = data["measurements"]["soak"]
    assert soak["intents"] == 40 and soak["searched"] == 20
    assert soak["audit_findings"] == [] and soak["audit_intents_checked"] >= 40
    assert soak["inconsistent_keys"] == [] and soak["reuse_not_refused"] == []
    assert soak["wrong_charges"] == [] and soak["searched_bad"] == []
    assert soak["processing"] == [] and soak["work_left"] == 0 and soak["missing"] == []
    assert soak["drift"] == [] and soak["wrong_end"] == [] and soak["client_errors"] == []
    assert soak["succeeded"] > 0
    soak_rows = next(s for s in data["scenarios"] if s["key"] == "soak")["rows"]
    assert all(r["passed"] is not False for r in soak_rows), soak_rows
