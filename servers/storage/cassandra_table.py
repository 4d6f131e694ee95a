"""The scale-out table adapter: Apache Cassandra (or ScyllaDB) via cassandra-driver.

- Token-aware, DC-aware load balancing; ``LOCAL_QUORUM`` for reads and writes,
  ``SERIAL`` for the Paxos phase of lightweight transactions (``IF NOT EXISTS``).
- Statements are prepared once per (table, statement shape) and cached.
- ``Session.execute_async`` is bridged to asyncio: the driver's IO thread
  completes an asyncio future through ``loop.call_soon_threadsafe``.
- The driver is imported and the cluster connected lazily (in a worker
  thread), so importing this module or building the store needs no server.

Tables live in one keyspace and are always named ``keyspace.table`` in CQL.
``create_tables`` creates the keyspace and the tables (``IF NOT EXISTS``)
and adds regular columns that a table definition gained since.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from servers.storage.sqlite_table import (
    check_identifier,
    check_key,
    check_row,
    check_table_definition,
    check_ttl,
    finish_page,
    plan_slice,
)
from servers.storage.table import (
    ClusteringRange,
    Page,
    Row,
    Table,
    TableError,
    TableStore,
    cql_create_keyspace,
    cql_create_table,
    cql_type,
)

# Timeouts in seconds.
REQUEST_TIMEOUT = 10.0
SCHEMA_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
RECONNECT_MAX_DELAY = 5.0


def _is_bug(exc: BaseException) -> bool:
    """A statement the cluster refused as such (bad CQL, unknown table): a bug, not an outage.

    Everything else the driver raises (no host available, timeouts,
    ``Unavailable``, overloaded, connection errors) becomes ``TableError``,
    which callers see as ``UNAVAILABLE``: retry later.
    """
    from cassandra import InvalidRequest
    from cassandra.protocol import ConfigurationException, SyntaxException

    if isinstance(exc, SyntaxException | ConfigurationException):
        return True
    # A keyspace or table not created yet is the migration's missing step, an
    # outage of this deployment like any other (health reports it too).
    text = str(exc).lower()
    return isinstance(exc, InvalidRequest) and not (
        "unconfigured table" in text or "does not exist" in text
    )


def cql_schema(
    tables: Sequence[Table],
    keyspace: str,
    replication: Mapping[str, Any] | None = None,
) -> str:
    """The whole schema (keyspace and tables) as CQL text, for ``sysdesign migrate``."""
    check_identifier(keyspace, "keyspace")
    parts = [cql_create_keyspace(keyspace, replication)]
    for t in tables:
        check_table_definition(t)
        parts.append(cql_create_table(t, keyspace))
    return "\n\n".join(parts) + "\n"


class CassandraTableStore(TableStore):
    """The table port on a Cassandra cluster."""

    def __init__(
        self,
        hosts: Sequence[str],
        port: int = 9042,
        keyspace: str = "sysdesign",
        local_dc: str | None = None,
        replication: Mapping[str, Any] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not hosts:
            raise ValueError("CassandraTableStore needs at least one contact point")
        self.hosts = list(hosts)
        self.port = port
        self.keyspace = check_identifier(keyspace, "keyspace")
        self.local_dc = local_dc or None
        self.replication = dict(replication) if replication else None
        self._username = username
        self._password = password
        self._cluster: Any = None
        self._session: Any = None
        self._connect_lock = asyncio.Lock()
        self._prepared: dict[tuple[str, Any], Any] = {}
        self._prepare_lock = threading.Lock()
        self._closed = False
        self._expected_tables: set[str] = set()

    # -- connection -----------------------------------------------------------

    def _connect_blocking(self) -> Any:
        from cassandra import ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import (
            DCAwareRoundRobinPolicy,
            ExponentialReconnectionPolicy,
            TokenAwarePolicy,
        )
        from cassandra.query import tuple_factory

        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(
                DCAwareRoundRobinPolicy(local_dc=self.local_dc or "")
            ),
            consistency_level=ConsistencyLevel.LOCAL_QUORUM,
            serial_consistency_level=ConsistencyLevel.SERIAL,
            request_timeout=REQUEST_TIMEOUT,
            # Rows come back as tuples in the order of the selected columns.
            row_factory=tuple_factory,
        )
        auth = (
            PlainTextAuthProvider(username=self._username, password=self._password)
            if self._username
            else None
        )
        cluster = Cluster(
            contact_points=self.hosts,
            port=self.port,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            auth_provider=auth,
            connect_timeout=CONNECT_TIMEOUT,
            max_schema_agreement_wait=int(SCHEMA_TIMEOUT),
            # The driver's default backs off to ten minutes between attempts: a
            # node back after a one-minute outage would stay "down" for minutes.
            reconnection_policy=ExponentialReconnectionPolicy(0.5, RECONNECT_MAX_DELAY),
        )
        try:
            session = cluster.connect()
        except BaseException:
            cluster.shutdown()
            raise
        self._cluster = cluster
        return session

    def _connect_with_retries(self, attempts: int = 3) -> Any:
        """``_connect_blocking``, tried again after a short pause when no node answered in
        time: a node busy at that moment (many stores connecting at once, a loaded machine)
        is not a node that is down."""
        from cassandra.cluster import NoHostAvailable

        for attempt in range(attempts):
            try:
                return self._connect_blocking()
            except NoHostAvailable:
                if attempt == attempts - 1 or self._closed:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    async def _get_session(self) -> Any:
        if self._session is not None:
            return self._session
        async with self._connect_lock:
            if self._closed:
                raise TableError("the table store is closed")
            if self._session is None:
                try:
                    self._session = await asyncio.to_thread(self._connect_with_retries)
                except Exception as exc:
                    raise TableError(f"cassandra {self.hosts}:{self.port}: {exc}") from exc
            return self._session

    async def _execute(
        self,
        statement: Any,
        params: Sequence[Any] | None = None,
        *,
        request_timeout: float | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement; every row of the result (all pages)."""
        session = await self._get_session()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[tuple[Any, ...]]] = loop.create_future()
        acc: list[tuple[Any, ...]] = []

        def settle_ok(rows: list[tuple[Any, ...]]) -> None:
            if not fut.done():
                fut.set_result(rows)

        def settle_err(exc: BaseException) -> None:
            if not fut.done():
                fut.set_exception(exc)

        try:
            rf = session.execute_async(
                statement, params, timeout=request_timeout or REQUEST_TIMEOUT
            )
        except Exception as exc:
            if _is_bug(exc):
                raise
            raise TableError(f"cassandra: {exc}") from exc

        # Driver callbacks run on its IO thread (or right away when already done);
        # they must not block, and their exceptions would be swallowed.
        def on_rows(rows: Any) -> None:
            try:
                if rows:
                    acc.extend(rows)
                if rf.has_more_pages:
                    rf.start_fetching_next_page()  # calls on_rows again
                else:
                    loop.call_soon_threadsafe(settle_ok, acc)
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(settle_err, exc)

        def on_error(exc: BaseException) -> None:
            loop.call_soon_threadsafe(settle_err, exc)

        rf.add_callbacks(on_rows, on_error)
        try:
            return await fut
        except asyncio.CancelledError:
            raise
        except TableError:
            raise
        except Exception as exc:
            if _is_bug(exc):
                raise
            raise TableError(f"cassandra: {type(exc).__name__}: {exc}") from exc

    async def _prepare(self, key: tuple[str, Any], cql: str) -> Any:
        stmt = self._prepared.get(key)
        if stmt is not None:
            return stmt
        session = await self._get_session()

        def prepare() -> Any:
            with self._prepare_lock:
                found = self._prepared.get(key)
                if found is None:
                    found = session.prepare(cql)
                    self._prepared[key] = found
                return found

        try:
            return await asyncio.to_thread(prepare)
        except Exception as exc:
            raise TableError(f"cassandra: preparing {cql!r}: {exc}") from exc

    def _name(self, table: Table) -> str:
        return f"{self.keyspace}.{table.name}"

    # -- the port -------------------------------------------------------------

    async def create_tables(self, tables: Sequence[Table]) -> None:
        for t in tables:
            check_table_definition(t)
        await self._execute(
            cql_create_keyspace(self.keyspace, self.replication), request_timeout=SCHEMA_TIMEOUT
        )
        for t in tables:
            await self._execute(cql_create_table(t, self.keyspace), request_timeout=SCHEMA_TIMEOUT)
            existing = await self._execute(
                "SELECT column_name FROM system_schema.columns"
                " WHERE keyspace_name = %s AND table_name = %s",
                (self.keyspace, t.name),
            )
            have = {r[0] for r in existing}
            for col in t.regular_columns:
                if col not in have:
                    await self._execute(
                        f"ALTER TABLE {self._name(t)} ADD {col} {cql_type(t.columns[col])}",
                        request_timeout=SCHEMA_TIMEOUT,
                    )
        # Statements prepared against an older shape of a table must be prepared again.
        self._prepared.clear()

    async def put(
        self,
        table: Table,
        row: Row,
        *,
        if_not_exists: bool = False,
        ttl_seconds: int | None = None,
    ) -> bool:
        clean = check_row(table, row)
        check_ttl(ttl_seconds)
        cols = tuple(clean)
        shape = ("put", cols, if_not_exists, ttl_seconds is not None)
        cql = (
            f"INSERT INTO {self._name(table)} ({', '.join(cols)})"
            f" VALUES ({', '.join('?' * len(cols))})"
        )
        if if_not_exists:
            cql += " IF NOT EXISTS"
        if ttl_seconds is not None:
            cql += " USING TTL ?"
        stmt = await self._prepare((table.name, shape), cql)
        params: list[Any] = [clean[c] for c in cols]
        if ttl_seconds is not None:
            params.append(ttl_seconds)
        rows = await self._execute(stmt, params)
        if not if_not_exists:
            return True
        # An LWT answers one row whose first column is [applied] (then the existing row).
        if not rows:
            raise TableError("cassandra: conditional insert returned no [applied] row")
        return bool(rows[0][0])

    async def put_many(self, table: Table, rows: Sequence[Row], *, ttl_seconds: int | None = None) -> None:
        for row in rows:
            check_row(table, row)
        check_ttl(ttl_seconds)
        await asyncio.gather(*(self.put(table, row, ttl_seconds=ttl_seconds) for row in rows))

    async def get(self, table: Table, key: Mapping[str, Any]) -> Row | None:
        names, vals = check_key(table, key)
        cql = (
            f"SELECT {', '.join(table.columns)} FROM {self._name(table)}"
            f" WHERE {' AND '.join(f'{c} = ?' for c in names)}"
        )
        stmt = await self._prepare((table.name, ("get",)), cql)
        rows = await self._execute(stmt, vals)
        if not rows:
            return None
        return dict(zip(table.columns, rows[0], strict=True))

    async def slice(
        self,
        table: Table,
        partition: Mapping[str, Any],
        *,
        limit: int = 100,
        page_token: str = "",
        reverse: bool = False,
        bounds: ClusteringRange | None = None,
    ) -> Page:
        plan = plan_slice(
            table, partition, limit=limit, page_token=page_token, reverse=reverse, bounds=bounds
        )
        if plan.limit == 0:
            return Page(rows=[])
        where = [f"{c} = ?" for c in table.partition_key]
        params: list[Any] = list(plan.partition_values)
        for b in plan.bounds:
            where.append(f"({', '.join(b.columns)}) {b.op} ({', '.join('?' * len(b.values))})")
            params.extend(b.values)
        cql = (
            f"SELECT {', '.join(table.columns)} FROM {self._name(table)}"
            f" WHERE {' AND '.join(where)}"
        )
        if table.clustering:
            direction = "ASC" if plan.ascending else "DESC"
            cql += " ORDER BY " + ", ".join(f"{c} {direction}" for c in table.clustering)
        cql += " LIMIT ?"
        params.append(plan.limit + 1)
        shape = ("slice", plan.ascending, tuple((b.op, len(b.values)) for b in plan.bounds))
        stmt = await self._prepare((table.name, shape), cql)
        rows = await self._execute(stmt, params)
        return finish_page(
            table, [dict(zip(table.columns, r, strict=True)) for r in rows], plan.limit
        )

    async def delete(self, table: Table, key: Mapping[str, Any]) -> None:
        names, vals = check_key(table, key, allow_partition=True)
        cql = (
            f"DELETE FROM {self._name(table)}"
            f" WHERE {' AND '.join(f'{c} = ?' for c in names)}"
        )
        stmt = await self._prepare((table.name, ("delete", len(names))), cql)
        await self._execute(stmt, vals)

    def expect_tables(self, tables: Sequence[Table]) -> None:
        """Tables that must exist before ``ping`` reports this store healthy."""
        self._expected_tables = {t.name for t in tables}

    async def ping(self) -> None:
        """Healthy once the cluster answers *and* the schema is there.

        On Cassandra the schema is created by ``sysdesign migrate --apply``
        (the Kubernetes schema Job), not by the servers; until it has run,
        ping fails, health stays NOT_SERVING and readiness holds traffic back.
        """
        rows = await self._execute(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s",
            (self.keyspace,),
        )
        have = {r[0] for r in rows}
        if not have:
            raise TableError(f"cassandra: keyspace {self.keyspace} has no tables yet"
                             " (run `sysdesign migrate --apply`)")
        missing = sorted(self._expected_tables - have)
        if missing:
            raise TableError(f"cassandra: keyspace {self.keyspace} lacks tables {missing}"
                             " (run `sysdesign migrate --apply`)")

    async def close(self) -> None:
        async with self._connect_lock:
            self._closed = True
            cluster, self._cluster, self._session = self._cluster, None, None
            self._prepared.clear()
        if cluster is not None:
            await asyncio.to_thread(cluster.shutdown)
