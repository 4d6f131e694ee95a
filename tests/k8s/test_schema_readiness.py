"""On Cassandra, a store is healthy only once the schema Job has created its tables.

The Kubernetes services wait for the schema Job through their readiness: the
Cassandra adapter's ping fails until every table the process expects exists,
so health stays NOT_SERVING. Needs a Cassandra node
(SYSDESIGN_TEST_CASSANDRA_HOSTS, as for the table contract suite); skipped
otherwise.
"""

from __future__ import annotations

import os
import secrets

import pytest

from servers.storage.table import TableError
from servers.systems import all_tables

CASSANDRA_ENV = "SYSDESIGN_TEST_CASSANDRA_HOSTS"

pytestmark = pytest.mark.skipif(not os.environ.get(CASSANDRA_ENV),
                                reason=f"needs a Cassandra node: set {CASSANDRA_ENV}=host[,host...]")


async def test_ping_fails_until_the_schema_exists() -> None:
    from servers.storage.cassandra_table import CassandraTableStore

    hosts = [h for h in os.environ[CASSANDRA_ENV].split(",") if h]
    port = int(os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042"))
    local_dc = os.environ.get("SYSDESIGN_TEST_CASSANDRA_LOCAL_DC") or None
    keyspace = "sysdesign_ready_" + secrets.token_hex(4)
    tables = all_tables()
    store = CassandraTableStore(hosts, port, keyspace, local_dc=local_dc,
                                replication={"class": "SimpleStrategy", "replication_factor": 1})
    store.expect_tables(tables)
    try:
        with pytest.raises(TableError, match="no tables"):
            await store.ping()
        await store.create_tables(tables[:1])  # a partial schema is not enough
        with pytest.raises(TableError, match="lacks tables"):
            await store.ping()
        await store.create_tables(tables)  # what `sysdesign migrate --apply` does
        await store.ping()
    finally:
        try:
            await store._execute(f"DROP KEYSPACE IF EXISTS {keyspace}", request_timeout=60)
        finally:
            await store.close()
