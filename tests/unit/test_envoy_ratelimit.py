"""The envoyproxy/ratelimit runner's pieces that need no build: its Redis address and its skip line.

The runner itself (the build, the process, its answers) is exercised by
tests/integration/test_ratelimit_envoy_compat.py and the throughput bench's test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients.envoy_ratelimit import redis_address

ROOT = Path(__file__).resolve().parents[2]


def test_redis_address_is_what_its_tcp_mode_takes() -> None:
    assert redis_address("redis://127.0.0.1:6379/0") == ("127.0.0.1:6379", "")
    assert redis_address("redis://127.0.0.1:6379") == ("127.0.0.1:6379", "")
    assert redis_address("redis://:s%40cret@10.0.0.1:7000") == ("10.0.0.1:7000", "s@cret")
    assert redis_address("redis://app:pw@h:1") == ("h:1", "app:pw")
    assert redis_address("redis://default:pw@h:1") == ("h:1", "pw")
    assert redis_address("redis://[::1]:6379") == ("[::1]:6379", "")


@pytest.mark.parametrize("url", ["redis://h:1/3", "redis://a:1,redis://b:2", "rediss://h:1", "redis://h"])
def test_what_it_cannot_take_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        redis_address(url)


def _without_go(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and not (Path(p) / "go").exists())
    return {**os.environ, "PATH": path, "XDG_CACHE_HOME": str(tmp_path), **extra}


def test_without_go_the_build_is_skipped_with_one_line_and_fails_under_ci(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "clients.envoy_ratelimit", "build"]
    env = {k: v for k, v in _without_go(tmp_path).items() if k != "CI"}
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "envoy-ratelimit: envoyproxy/ratelimit skipped: Go is not installed (envoy-ratelimit is "
        "built from the Go module proxy with `go install`)"]
    r = subprocess.run(cmd, env={**env, "CI": "true"}, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "CI=true" in r.stderr
