"""Fixtures of the storage contract suites: every adapter of a port behind one fixture.

- table: SQLite (a file per test) always; the real Cassandra node that
  ``scripts/cassandra.py run`` started for the test run (``make test`` does;
  or any cluster named by ``SYSDESIGN_TEST_CASSANDRA_HOSTS``), a fresh
  keyspace per run, dropped at the end. Without a node that half is skipped
  with the reason, except under ``CI=true``, where it fails.
- blob: the filesystem (a directory per test) always; S3 always, against a
  moto server run as a separate process for the session (a bucket per test),
  and against a real MinIO server (built from the Go module proxy by
  ``scripts/minio.py build``, which ``make test`` runs first). Without Go the
  MinIO half is skipped with the reason, except under ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from servers.storage.blob import BlobStore
from servers.storage.table import TableStore
from tests.conftest import cassandra_unavailable, skip_or_fail
from tests.s3server import moto_server
from tests.stack import free_port

CASSANDRA_ENV = "SYSDESIGN_TEST_CASSANDRA_HOSTS"


# ---------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------


@dataclass
class TableBackend:
    """Opens stores on one place (a SQLite file, a Cassandra keyspace)."""

    name: str
    open: Callable[[], TableStore]


@pytest.fixture(scope="session")
def cassandra_keyspace() -> Iterator[str]:
    hosts = os.environ.get(CASSANDRA_ENV, "")
    if not hosts:
        why = cassandra_unavailable()
        skip_or_fail("Cassandra half", why)
    keyspace = "sysdesign_test_" + secrets.token_hex(4)
    yield keyspace
    # Drop the run's keyspace (best effort).
    try:
        from cassandra.cluster import Cluster

        cluster = Cluster(
            contact_points=[h for h in hosts.split(",") if h],
            port=int(os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042")),
        )
        try:
            cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        finally:
            cluster.shutdown()
    except Exception as exc:
        print(f"could not drop keyspace {keyspace}: {exc}", file=sys.stderr)


@pytest.fixture(params=["sqlite", "cassandra"])
def table_backend(request: pytest.FixtureRequest, tmp_path: Path) -> TableBackend:
    if request.param == "sqlite":
        from servers.storage.sqlite_table import SqliteTableStore

        path = tmp_path / "tables.sqlite3"
        return TableBackend("sqlite", lambda: SqliteTableStore(path))

    keyspace = request.getfixturevalue("cassandra_keyspace")
    from servers.storage.cassandra_table import CassandraTableStore

    hosts = [h for h in os.environ[CASSANDRA_ENV].split(",") if h]
    port = int(os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042"))
    local_dc = os.environ.get("SYSDESIGN_TEST_CASSANDRA_LOCAL_DC") or None
    return TableBackend(
        "cassandra", lambda: CassandraTableStore(hosts, port, keyspace, local_dc=local_dc)
    )


# ---------------------------------------------------------------------------
# blob
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process for the whole session."""
    with moto_server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real MinIO server in its own process for the whole session."""
    from clients.minio_server import MinioServer, missing_tools

    why = missing_tools()
    if why:
        skip_or_fail("MinIO half", why)
    server = MinioServer(tmp_path_factory.mktemp("minio") / "data").start()
    yield server
    server.stop()


@dataclass
class BlobBackend:
    name: str
    open: Callable[[], BlobStore]
    # Prepares the place (creates the bucket) before the first store is opened.
    setup: Callable[[], Awaitable[None]]


@pytest.fixture(params=["filesystem", "moto", "minio"])
def blob_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BlobBackend:
    if request.param == "filesystem":
        from servers.storage.fs_blob import FilesystemBlobStore

        root = tmp_path / "blobs"

        async def nothing() -> None:
            return None

        return BlobBackend("filesystem", lambda: FilesystemBlobStore(root), nothing)

    from servers.storage.s3_blob import S3BlobStore

    if request.param == "moto":
        endpoint, access, secret = request.getfixturevalue("moto_endpoint"), "test", "test"
    else:
        server = request.getfixturevalue("minio")
        env = server.env()
        endpoint, access, secret = server.endpoint, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    bucket = "contract-" + secrets.token_hex(6)

    def make() -> S3BlobStore:
        return S3BlobStore(bucket, endpoint_url=endpoint, access_key=access, secret_key=secret)

    async def create() -> None:
        store = make()
        try:
            await store.ensure_bucket()
        finally:
            await store.close()

    return BlobBackend(request.param, make, create)


@pytest.fixture
async def blob_store(blob_backend: BlobBackend) -> AsyncIterator[BlobStore]:
    await blob_backend.setup()
    store = blob_backend.open()
    yield store
    await store.close()
