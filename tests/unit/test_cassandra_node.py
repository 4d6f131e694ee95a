"""scripts/cassandra.py without Java: one line saying why, and never a silent pass under CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_without_java(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    # A PATH with the interpreter but no java and no mvn, and an empty cache.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
    env.update({"PATH": str(bindir), "CI": ci, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    probe = tmp_path / "ran"
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cassandra.py"), "run", "--",
         sys.executable, "-c",
         f"import os, pathlib; pathlib.Path({str(probe)!r}).write_text("
         "os.environ.get('SYSDESIGN_TEST_CASSANDRA', '') + '|' "
         "+ os.environ.get('SYSDESIGN_TEST_CASSANDRA_HOSTS', ''))"],
        env=env, capture_output=True, text=True, timeout=60,
    )


def test_without_java_the_cassandra_half_is_skipped_with_the_reason(tmp_path: Path) -> None:
    out = run_without_java(tmp_path, ci="")
    assert out.returncode == 0, out.stderr
    assert "SKIPPED" in out.stderr and "java" in out.stderr
    skip, hosts = (tmp_path / "ran").read_text().split("|")
    assert skip.startswith("skip:") and "java" in skip
    assert hosts == ""


def test_under_ci_a_missing_java_fails_and_runs_nothing(tmp_path: Path) -> None:
    out = run_without_java(tmp_path, ci="true")
    assert out.returncode != 0
    assert "CI=true" in out.stderr
    assert not (tmp_path / "ran").exists()
