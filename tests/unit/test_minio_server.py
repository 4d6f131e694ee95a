"""scripts/minio.py without Go: one line saying why, and never a silent pass under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_without_go(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    # A PATH with the interpreter but no go, and an empty cache (no binary built before).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
    env.update({"PATH": str(bindir), "CI": ci, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "minio.py"), "build"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_without_go_the_minio_half_is_skipped_with_the_reason(tmp_path: Path) -> None:
    out = build_without_go(tmp_path, ci="")
    assert out.returncode == 0, out.stderr
    assert "MinIO half skipped" in out.stderr and "Go is not installed" in out.stderr
    assert out.stdout == ""


def test_under_ci_a_missing_go_fails(tmp_path: Path) -> None:
    out = build_without_go(tmp_path, ci="true")
    assert out.returncode == 2
    assert "CI=true" in out.stderr and "Go is not installed" in out.stderr
    assert not list((tmp_path / "cache").glob("**/minio"))
