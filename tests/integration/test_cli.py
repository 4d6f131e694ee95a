"""The `sysdesign` CLI as a new user meets it, against a real `sysdesign up` (issue 23).

Every command runs as a subprocess (`python -m clients.cli ...`) with the
stack's environment, a private config dir and 80 columns, the way a person
types it in a terminal.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sysdesign.feed.v1 import feed_pb2, feed_pb2_grpc

from tests.integration.helpers import grpc_metadata
from tests.stack import ROOT, StackProcess

THRESHOLD = 40


@pytest.fixture(scope="module")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("cli") / "data", extra_env={
        "SYSDESIGN_FEED_CELEBRITY_THRESHOLD": str(THRESHOLD)}).start()
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def config_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-config")


def cli(stack: StackProcess, *args: str, env: dict[str, str] | None = None, stdin: str = "",
        config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**stack.env(), "COLUMNS": "80", "TERM": "dumb",
            "XDG_CONFIG_HOME": str(config or stack.data_dir.parent / "xdg"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], env=full, cwd=str(ROOT),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A refused command: non-zero exit, no traceback, the reason in one line on stderr."""
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr and "Error ─" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines, r
    for n in needles:
        assert n in lines[0], lines


def test_generate_yields_the_celebrities_asked_for(cstack: StackProcess) -> None:
    """30 users cannot give anyone 40 followers: the generator tops the top 2 up to the threshold."""
    r = cli(cstack, "feed", "generate", "--users", "30", "--celebrities", "2", "--posts-per-user", "0",
            "--prefix", "gen")
    assert r.returncode == 0, r.stderr
    assert f"2 celebrities (threshold {THRESHOLD} followers)" in r.stdout, r.stdout
    graph = feed_pb2_grpc.GraphServiceStub(cstack.channel())
    md = grpc_metadata(cstack.token("counter"))

    def counts(name: str) -> feed_pb2.GetFollowCountsResponse:
        return graph.GetFollowCounts(feed_pb2.GetFollowCountsRequest(
            user=feed_pb2.UserRef(username=name)), metadata=md, timeout=30)

    for name in ("gen0000000", "gen0000001"):
        c = counts(name)
        assert c.celebrity and c.follower_count >= THRESHOLD, (name, c)
    assert not counts("gen0000002").celebrity
    before = counts("gen0000000").follower_count
    again = cli(cstack, "feed", "generate", "--users", "30", "--celebrities", "2", "--posts-per-user",
                "0", "--prefix", "gen")
    assert again.returncode == 0, again.stderr
    assert counts("gen0000000").follower_count == before, "a re-run adds no followers twice"
