"""The embedded table adapter: one SQLite file.

Each :class:`~servers.storage.table.Table` becomes a ``WITHOUT ROWID`` table
whose primary key is ``(partition key..., clustering...)``, plus a hidden
``_expires_at`` column (unix seconds, NULL = never) for TTLs. Rows past their
expiry are invisible to ``get``/``slice``, count as absent for
``IF NOT EXISTS`` and are removed lazily.

All SQLite work runs on one dedicated worker thread with one connection
(WAL, ``synchronous=NORMAL``, ``busy_timeout=5000``): several processes (the
server and the CLI) may open the same file, writers serialise on SQLite's
write lock (``BEGIN IMMEDIATE``). WAL with ``synchronous=NORMAL`` keeps every
acknowledged write across a crash of the process; only an OS crash or power
loss can lose the last transactions.

This module also holds the argument checks and the slice planning that both
table adapters share (``check_*``, ``plan_slice``), so that a call refused
by one adapter is refused by the other.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from servers.storage.table import (
    ClusteringRange,
    InvalidPageToken,
    Page,
    Row,
    Table,
    TableError,
    TableStore,
    decode_page_token,
    encode_page_token,
)

T = TypeVar("T")

# ---------------------------------------------------------------------------
# Shared checks (used by both adapters)
# ---------------------------------------------------------------------------

# Unquoted CQL identifiers are case-insensitive and start with a letter; Cassandra
# limits table names to 48 characters. Keeping names to this shape means one name
# works unquoted in CQL and in SQLite.
_IDENT_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

# Apache Cassandra's reserved CQL keywords: not usable as unquoted identifiers.
CQL_RESERVED = frozenset(
    """add allow alter and apply asc authorize batch begin by columnfamily create default
    delete desc describe drop entries execute from full grant if in index infinity insert
    into is keyspace limit materialized mbean mbeans modify nan norecursive not null of on
    or order primary rename replace revoke schema select set table to token truncate
    unlogged unset update use using view where with""".split()
)

_INT_RANGE = {"int": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}

# Cassandra's maximum TTL (20 years).
MAX_TTL_SECONDS = 630_720_000


def check_identifier(name: str, what: str) -> str:
    if not _IDENT_RE.match(name) or name in CQL_RESERVED:
        raise ValueError(
            f"{what} {name!r}: use lowercase [a-z][a-z0-9_]* (at most 48 characters),"
            " not a reserved CQL keyword"
        )
    return name


def check_table_definition(table: Table) -> None:
    """Names that work unquoted on both backends."""
    check_identifier(table.name, "table name")
    for col in table.columns:
        check_identifier(col, f"{table.name}: column")


def check_value(table: Table, col: str, value: Any) -> Any:
    """The value normalised for the backends; ValueError when it does not fit the column."""
    typ = table.columns[col]
    if value is None:
        if col in table.primary_key:
            raise ValueError(f"{table.name}.{col}: a primary key column cannot be None")
        return None
    if typ == "text":
        if isinstance(value, str):
            return value
    elif typ in ("int", "bigint"):
        if isinstance(value, int) and not isinstance(value, bool):
            lo, hi = _INT_RANGE[typ]
            if not lo <= value <= hi:
                raise ValueError(f"{table.name}.{col}: {value} out of range for {typ}")
            return value
    elif typ == "boolean":
        if isinstance(value, bool):
            return value
    elif typ == "double":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif typ == "blob" and isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise ValueError(f"{table.name}.{col}: {type(value).__name__} value for a {typ} column")


def check_row(table: Table, row: Mapping[str, Any]) -> Row:
    """A row to write: the whole primary key, only declared columns, values of their type."""
    unknown = [c for c in row if c not in table.columns]
    if unknown:
        raise ValueError(f"{table.name}: undeclared columns {unknown}")
    missing = [c for c in table.primary_key if c not in row]
    if missing:
        raise ValueError(f"{table.name}: row lacks primary key columns {missing}")
    return {c: check_value(table, c, row[c]) for c in row}


def check_key(
    table: Table, key: Mapping[str, Any], *, allow_partition: bool = False
) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The key's columns and values: the whole primary key (or, if allowed, the partition key)."""
    cols = set(key)
    if cols == set(table.primary_key):
        names = table.primary_key
    elif allow_partition and cols == set(table.partition_key):
        names = table.partition_key
    else:
        want = "the primary key" + (" or the partition key" if allow_partition else "")
        raise ValueError(
            f"{table.name}: key {sorted(cols)} is not {want} {list(table.primary_key)}"
        )
    return names, tuple(check_value(table, c, key[c]) for c in names)


def check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is None:
        return
    if (
        not isinstance(ttl_seconds, int)
        or isinstance(ttl_seconds, bool)
        or not 1 <= ttl_seconds <= MAX_TTL_SECONDS
    ):
        raise ValueError(
            f"ttl_seconds must be an int in [1, {MAX_TTL_SECONDS}], not {ttl_seconds!r}"
        )


@dataclass(frozen=True)
class Bound:
    """``(cols) op (values)`` over a prefix of the clustering columns."""

    op: str  # one of > >= < <=
    columns: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SlicePlan:
    partition_values: tuple[Any, ...]
    ascending: bool  # iteration order in terms of clustering values
    bounds: tuple[Bound, ...]  # at most one lower and one upper bound
    limit: int


def _bound(table: Table, op: str, values: tuple[Any, ...] | list[Any]) -> Bound:
    values = tuple(values)
    if not 1 <= len(values) <= len(table.clustering):
        raise ValueError(
            f"{table.name}: a clustering bound holds 1..{len(table.clustering)} values,"
            f" not {len(values)}"
        )
    cols = table.clustering[: len(values)]
    checked = tuple(check_value(table, c, v) for c, v in zip(cols, values, strict=True))
    return Bound(op, cols, checked)


def plan_slice(
    table: Table,
    partition: Mapping[str, Any],
    *,
    limit: int,
    page_token: str,
    reverse: bool,
    bounds: ClusteringRange | None,
) -> SlicePlan:
    """Check a slice's arguments and reduce them to at most one lower and one upper bound.

    The page token resumes strictly after the last returned row in iteration
    order; that row satisfied the caller's bounds, so the token's bound
    replaces the caller's bound on the same side (Cassandra accepts only one
    bound per side).
    """
    if set(partition) != set(table.partition_key):
        raise ValueError(
            f"{table.name}: partition {sorted(partition)} is not {list(table.partition_key)}"
        )
    pvals = tuple(check_value(table, c, partition[c]) for c in table.partition_key)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise ValueError(f"limit must be an int in [1, 100000], not {limit!r}")
    ascending = table.descending == reverse
    lower: Bound | None = None
    upper: Bound | None = None
    if bounds is not None:
        if bounds.gt is not None and bounds.ge is not None:
            raise ValueError("give at most one of gt and ge")
        if bounds.lt is not None and bounds.le is not None:
            raise ValueError("give at most one of lt and le")
        if bounds.gt is not None:
            lower = _bound(table, ">", bounds.gt)
        elif bounds.ge is not None:
            lower = _bound(table, ">=", bounds.ge)
        if bounds.lt is not None:
            upper = _bound(table, "<", bounds.lt)
        elif bounds.le is not None:
            upper = _bound(table, "<=", bounds.le)
    if page_token:
        last = decode_page_token(table, page_token)
        if not table.clustering:
            # A partition without clustering columns holds one row: nothing follows it.
            return SlicePlan(pvals, ascending, (), 0)
        try:
            if ascending:
                lower = _bound(table, ">", last)
            else:
                upper = _bound(table, "<", last)
        except ValueError as exc:
            raise InvalidPageToken("malformed page token") from exc
    return SlicePlan(pvals, ascending, tuple(b for b in (lower, upper) if b is not None), limit)


def finish_page(table: Table, rows: list[Row], limit: int) -> Page:
    """``rows`` was fetched with ``limit + 1``: trim it and set the next page token."""
    if len(rows) > limit:
        rows = rows[:limit]
        return Page(rows=rows, next_page_token=encode_page_token(table, rows[-1]))
    return Page(rows=rows)


# ---------------------------------------------------------------------------
# The SQLite adapter
# ---------------------------------------------------------------------------

_SQLITE_TYPES = {
    "text": "TEXT",
    "bigint": "INTEGER",
    "int": "INTEGER",
    "boolean": "INTEGER",
    "double": "REAL",
    "blob": "BLOB",
}

_EXPIRES = "_expires_at"
_CLEANUP_INTERVAL = 60.0


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sqlite_create_table(table: Table) -> list[str]:
    """The SQLite DDL of one table (the table and its expiry index)."""
    cols = [f"{_q(c)} {_SQLITE_TYPES[t]}" for c, t in table.columns.items()]
    cols.append(f"{_EXPIRES} REAL")
    pk = ", ".join(_q(c) for c in table.primary_key)
    return [
        f"CREATE TABLE IF NOT EXISTS {_q(table.name)} (\n  "
        + ",\n  ".join(cols)
        + f",\n  PRIMARY KEY ({pk})\n) WITHOUT ROWID",
        f"CREATE INDEX IF NOT EXISTS {_q(table.name + '__expires')} ON {_q(table.name)}"
        f" ({_EXPIRES}) WHERE {_EXPIRES} IS NOT NULL",
    ]


def _where(cols: Sequence[str]) -> str:
    return " AND ".join(f"{_q(c)} = ?" for c in cols)


_LIVE = f"({_EXPIRES} IS NULL OR {_EXPIRES} > ?)"


class SqliteTableStore(TableStore):
    """The table port on one SQLite file.

    TTL differs from Cassandra in granularity: Cassandra expires each written
    cell (and the row marker of an INSERT) on its own, while here the TTL is
    the row's: a ``put`` with ``ttl_seconds`` sets the expiry of the whole
    row, a ``put`` without it clears the expiry of the whole row. E.g. after
    ``put({k, a, b}, ttl_seconds=60)`` then ``put({k, a})``: here the whole row
    lives on; on Cassandra ``a`` and the row live on but ``b`` still expires
    after 60 s. A service that always writes a row with the same TTL
    (sessions, codes, caches) sees the same behaviour on both backends.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-table")
        self._conn: sqlite3.Connection | None = None  # only touched on the worker thread
        self._closed = False
        self._last_cleanup: dict[str, float] = {}
        self._lock = threading.Lock()  # guards _closed against a concurrent close

    # -- plumbing -----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            try:
                return fn(self._connection())
            except sqlite3.Error as exc:
                raise TableError(f"sqlite {self.path}: {exc}") from exc

        with self._lock:
            if self._closed:
                raise TableError("the table store is closed")
            fut = self._executor.submit(job)
        return await asyncio.wrap_future(fut)

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    def _maybe_cleanup(self, conn: sqlite3.Connection, table: Table, now: float) -> None:
        """Drop expired rows of a table at most once a minute (inside a write transaction)."""
        if now - self._last_cleanup.get(table.name, 0.0) < _CLEANUP_INTERVAL:
            return
        self._last_cleanup[table.name] = now
        conn.execute(f"DELETE FROM {_q(table.name)} WHERE {_EXPIRES} <= ?", (now,))

    def _to_row(self, table: Table, values: Sequence[Any]) -> Row:
        row: Row = {}
        for (col, typ), v in zip(table.columns.items(), values, strict=True):
            if v is not None:
                if typ == "boolean":
                    v = bool(v)
                elif typ == "double":
                    v = float(v)
                elif typ == "blob":
                    v = bytes(v)
            row[col] = v
        return row

    # -- the port -----------------------------------------------------------

    async def create_tables(self, tables: Sequence[Table]) -> None:
        for t in tables:
            check_table_definition(t)

        def job(conn: sqlite3.Connection) -> None:
            def ddl() -> None:
                for t in tables:
                    for stmt in sqlite_create_table(t):
                        conn.execute(stmt)
                    info = conn.execute(f"PRAGMA table_info({_q(t.name)})").fetchall()
                    have = {r[1]: r[5] for r in info}  # name -> position in the primary key
                    pk = tuple(n for n, pos in sorted(have.items(), key=lambda x: x[1]) if pos)
                    if pk != t.primary_key:
                        raise TableError(
                            f"{t.name}: existing primary key {pk} differs from {t.primary_key}"
                        )
                    # New regular columns are added (as ALTER TABLE ... ADD on Cassandra).
                    for col in t.regular_columns:
                        if col not in have:
                            conn.execute(
                                f"ALTER TABLE {_q(t.name)} ADD COLUMN"
                                f" {_q(col)} {_SQLITE_TYPES[t.columns[col]]}"
                            )

            self._write(conn, ddl)

        await self._run(job)

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
        cols = list(clean)
        names = ", ".join([*(_q(c) for c in cols), _EXPIRES])
        marks = ", ".join(["?"] * (len(cols) + 1))
        conflict = ", ".join(_q(c) for c in table.primary_key)
        if if_not_exists:
            action = "DO NOTHING"
        else:
            sets = [f"{_q(c)} = excluded.{_q(c)}" for c in cols if c not in table.primary_key]
            sets.append(f"{_EXPIRES} = excluded.{_EXPIRES}")
            action = "DO UPDATE SET " + ", ".join(sets)
        sql = (
            f"INSERT INTO {_q(table.name)} ({names}) VALUES ({marks})"
            f" ON CONFLICT ({conflict}) {action}"
        )
        key_vals = tuple(clean[c] for c in table.primary_key)
        delete_expired = (
            f"DELETE FROM {_q(table.name)} WHERE {_where(table.primary_key)} AND {_EXPIRES} <= ?"
        )

        def job(conn: sqlite3.Connection) -> bool:
            def tx() -> bool:
                now = time.time()
                expires = now + ttl_seconds if ttl_seconds is not None else None
                # An expired row is gone: its other columns must not come back.
                conn.execute(delete_expired, (*key_vals, now))
                cur = conn.execute(sql, (*(clean[c] for c in cols), expires))
                self._maybe_cleanup(conn, table, now)
                return cur.rowcount > 0

            return self._write(conn, tx)

        written = await self._run(job)
        return written if if_not_exists else True

    async def get(self, table: Table, key: Mapping[str, Any]) -> Row | None:
        names, vals = check_key(table, key)
        cols = ", ".join(_q(c) for c in table.columns)
        sql = f"SELECT {cols} FROM {_q(table.name)} WHERE {_where(names)} AND {_LIVE}"

        def job(conn: sqlite3.Connection) -> Row | None:
            found = conn.execute(sql, (*vals, time.time())).fetchone()
            return None if found is None else self._to_row(table, found)

        return await self._run(job)

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
        where = [_where(table.partition_key), _LIVE]
        for b in plan.bounds:
            cols = ", ".join(_q(c) for c in b.columns)
            marks = ", ".join("?" * len(b.values))
            where.append(f"({cols}) {b.op} ({marks})")
        sql = f"SELECT {', '.join(_q(c) for c in table.columns)} FROM {_q(table.name)}"
        sql += " WHERE " + " AND ".join(where)
        if table.clustering:
            direction = "ASC" if plan.ascending else "DESC"
            sql += " ORDER BY " + ", ".join(f"{_q(c)} {direction}" for c in table.clustering)
        sql += " LIMIT ?"

        def job(conn: sqlite3.Connection) -> list[Row]:
            args: list[Any] = [*plan.partition_values, time.time()]
            for b in plan.bounds:
                args.extend(b.values)
            args.append(plan.limit + 1)
            return [self._to_row(table, r) for r in conn.execute(sql, args).fetchall()]

        rows = await self._run(job)
        return finish_page(table, rows, plan.limit)

    async def delete(self, table: Table, key: Mapping[str, Any]) -> None:
        names, vals = check_key(table, key, allow_partition=True)
        sql = f"DELETE FROM {_q(table.name)} WHERE {_where(names)}"

        def job(conn: sqlite3.Connection) -> None:
            self._write(conn, lambda: conn.execute(sql, vals))

        await self._run(job)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return

            def job() -> None:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

            fut = self._executor.submit(job)
            self._closed = True
        try:
            await asyncio.wrap_future(fut)
        finally:
            self._executor.shutdown(wait=False)
