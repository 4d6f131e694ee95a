"""The committed stubs under generated/ are exactly what `make proto` produces."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(ROOT / "generated") for p in (ROOT / "generated").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert fresh == committed, f"files differ: run `make proto` ({sorted(fresh ^ committed)})"
    stale = [str(rel) for rel in sorted(fresh)
             if not filecmp.cmp(tmp_path / rel, ROOT / "generated" / rel, shallow=False)]
    assert not stale, f"stale stubs, run `make proto`: {stale}"


def test_every_proto_has_stubs() -> None:
    for proto in (ROOT / "protos").rglob("*.proto"):
        rel = proto.relative_to(ROOT / "protos").with_suffix("")
        base = ROOT / "generated" / rel.parent / rel.name
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert Path(str(base) + suffix).exists(), f"missing stub for {proto}"
