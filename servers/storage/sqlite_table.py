"""The embedded table adapter: one SQLite file.

Each :class:`~servers.storage.table.Table` becomes a ``WITHOUT ROWID`` table
whose primary key is ``(partition key..., clustering...)``, plus a hidden
``_expires_at`` column (unix seconds, NULL = never) for TTLs. Rows past their
expiry are invisible to ``get``/``slice``, count as absent for
``IF NOT EXISTS`` and are removed lazily.

All SQLite work runs on one dedicated worker thread with one connection
(WAL, ``synchronous=NORMAL``, ``busy_timeout=5000``): several processes (the
server and the CLI) may open the same file, writers serialise on SQLite's
write lock (``BEGIN IMMEDIATE``). Writes queued together share one
transaction (group commit, each write in its own savepoint; see
:class:`SqliteTableStore`), and a write is acknowledged only once its
transaction committed. WAL with ``synchronous=NORMAL`` keeps every
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
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
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

# At most this many jobs are taken off the queue at once; the writes among them
# share one transaction.
MAX_GROUP = 256

_READ, _WRITE, _CLOSE = 0, 1, 2


class _Job:
    """One call handed to the worker thread, and its outcome."""

    __slots__ = ("error", "fn", "future", "kind", "loop", "value")

    def __init__(
        self,
        kind: int,
        fn: Callable[[sqlite3.Connection], Any] | None,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.kind = kind
        self.fn = fn
        self.loop = loop
        self.future = future
        self.value: Any = None
        self.error: BaseException | None = None


def _settle(jobs: list[_Job]) -> None:
    """On the event loop: resolve the futures of a finished batch (one callback per batch)."""
    for job in jobs:
        fut = job.future
        if fut.done():  # cancelled by its caller
            continue
        if job.error is None:
            fut.set_result(job.value)
        else:
            fut.set_exception(job.error)


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

    Group commit: calls queue up for the worker thread, which takes every
    queued call at once (at most :data:`MAX_GROUP`). The writes among them
    (``put``, ``delete``, ``create_tables``) run in submission order in one
    ``BEGIN IMMEDIATE ... COMMIT``, each in its own savepoint: a write that
    raises is rolled back alone and fails alone, and a write sees the writes
    queued before it (``IF NOT EXISTS``: the first wins). No write is
    acknowledged before the COMMIT succeeded; if it fails, every write of the
    group fails with :class:`TableError`. The reads of the batch run after the
    COMMIT, outside any transaction, so a read never sees an uncommitted
    write. The whole batch is answered with one callback on the event loop.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._queue: SimpleQueue[_Job] = SimpleQueue()
        self._thread: threading.Thread | None = None  # started by the first call
        self._conn: sqlite3.Connection | None = None  # only touched on the worker thread
        self._closed = False
        self._last_cleanup: dict[str, float] = {}
        self._lock = threading.Lock()  # guards _closed and _thread against a concurrent close
        # SQL text by statement shape (built on the event loop, read-only once stored).
        self._sql: dict[tuple[Any, ...], tuple[str, str]] = {}

    # -- plumbing (event loop side) -------------------------------------------

    async def _submit(self, kind: int, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise TableError("the table store is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="sqlite-table", daemon=True
                )
                self._thread.start()
            self._queue.put(_Job(kind, fn, loop, fut))
        return await fut

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(_READ, fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` inside a write transaction (shared with other queued writes)."""
        return await self._submit(_WRITE, fn)

    # -- plumbing (worker thread side) ----------------------------------------

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

    def _failure(self, exc: BaseException) -> BaseException:
        """The exception a caller sees: SQLite errors become TableError."""
        if isinstance(exc, sqlite3.Error):
            err = TableError(f"sqlite {self.path}: {exc}")
            err.__cause__ = exc
            return err
        return exc

    def _serve(self) -> None:
        """The worker thread: run batches of queued jobs until a close job."""
        queue = self._queue
        while True:
            batch = [queue.get()]
            while len(batch) < MAX_GROUP and batch[-1].kind != _CLOSE:
                try:
                    batch.append(queue.get_nowait())
                except Empty:
                    break
            try:
                self._run_batch(batch)
            except BaseException as exc:  # a bug: fail the batch rather than hang its callers
                for job in batch:
                    job.error = TableError(f"sqlite {self.path}: internal error: {exc!r}")
                if self._conn is not None:
                    self._rollback(self._conn)
            self._post(batch)
            if batch[-1].kind == _CLOSE:
                return

    def _run_batch(self, batch: list[_Job]) -> None:
        # A job cancelled before it ran is skipped (as a cancelled executor job was).
        live = [job for job in batch if not job.future.cancelled()]
        writes = [job for job in live if job.kind == _WRITE]
        if writes:
            self._write_group(writes)
        for job in live:
            if job.kind == _READ and job.fn is not None:
                try:
                    job.value = job.fn(self._connection())
                except Exception as exc:
                    job.error = self._failure(exc)
            elif job.kind == _CLOSE and self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except Exception as exc:
                    job.error = self._failure(exc)

    def _write_group(self, jobs: list[_Job]) -> None:
        while jobs:
            try:
                conn = self._connection()
            except Exception as exc:
                for job in jobs:
                    job.error = self._failure(exc)
                return
            jobs = self._write_transaction(conn, jobs)

    def _write_transaction(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[_Job]:
        """Run write jobs in one transaction, each in its own savepoint (unless alone).

        Sets each job's outcome. Returns the jobs not run because the
        transaction was lost midway (SQLite rolls a whole transaction back on
        some errors, e.g. a full disk): the caller runs them in a new one.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            for job in jobs:
                job.error = self._failure(exc)
            return []
        alone = len(jobs) == 1
        done: list[_Job] = []
        for i, job in enumerate(jobs):
            fn = job.fn
            assert fn is not None
            try:
                if alone:
                    job.value = fn(conn)
                else:
                    conn.execute("SAVEPOINT job")
                    job.value = fn(conn)
                    conn.execute("RELEASE job")
                done.append(job)
                continue
            except Exception as exc:
                job.error = self._failure(exc)
            if not alone and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    continue  # only this job is undone
                except sqlite3.Error:
                    pass
            # This job was alone, or the transaction is lost: nothing of it stays.
            self._rollback(conn)
            for other in done:
                other.error = TableError(
                    f"sqlite {self.path}: transaction rolled back after: {job.error}"
                )
            return jobs[i + 1 :]
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            for job in done:
                job.error = self._failure(exc)
        return []

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            # The connection is in an unknown state: start over with a new one.
            if self._conn is conn:
                self._conn = None
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _post(self, batch: list[_Job]) -> None:
        """Hand the outcomes to the event loop(s): one callback per loop and batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, jobs)
            except RuntimeError:
                pass  # the loop is closed: nobody awaits these any more

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

    def _cache_sql(
        self, key: tuple[Any, ...], build: Callable[[], tuple[str, str]]
    ) -> tuple[str, str]:
        sql = self._sql.get(key)
        if sql is None:
            if len(self._sql) >= 4096:
                self._sql.clear()
            sql = self._sql[key] = build()
        return sql

    # -- the port -----------------------------------------------------------

    async def create_tables(self, tables: Sequence[Table]) -> None:
        for t in tables:
            check_table_definition(t)

        def ddl(conn: sqlite3.Connection) -> None:
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

        await self._write(ddl)

    @staticmethod
    def _put_sql(table: Table, cols: Sequence[str], if_not_exists: bool) -> tuple[str, str]:
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
        delete_expired = (
            f"DELETE FROM {_q(table.name)} WHERE {_where(table.primary_key)} AND {_EXPIRES} <= ?"
        )
        return sql, delete_expired

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
        sql, delete_expired = self._cache_sql(
            ("put", table.name, table.primary_key, cols, if_not_exists),
            lambda: self._put_sql(table, cols, if_not_exists),
        )
        key_vals = tuple(clean[c] for c in table.primary_key)
        values = tuple(clean.values())

        def tx(conn: sqlite3.Connection) -> bool:
            now = time.time()
            expires = now + ttl_seconds if ttl_seconds is not None else None
            # An expired row is gone: its other columns must not come back.
            conn.execute(delete_expired, (*key_vals, now))
            cur = conn.execute(sql, (*values, expires))
            self._maybe_cleanup(conn, table, now)
            return cur.rowcount > 0

        written = await self._write(tx)
        return written if if_not_exists else True

    async def put_many(self, table: Table, rows: Sequence[Row], *, ttl_seconds: int | None = None) -> None:
        """One write job for all the rows (all or none), statements prepared once per shape."""
        check_ttl(ttl_seconds)
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            clean = check_row(table, row)
            shapes.setdefault(tuple(clean), []).append(clean)
        if not shapes:
            return
        work = []
        for cols, group in shapes.items():
            sql, delete_expired = self._cache_sql(
                ("put", table.name, table.primary_key, cols, False),
                lambda cols=cols: self._put_sql(table, cols, False),  # type: ignore[misc]
            )
            keys = [tuple(r[c] for c in table.primary_key) for r in group]
            values = [tuple(r.values()) for r in group]
            work.append((sql, delete_expired, keys, values))

        every_column = len(table.columns)

        def tx(conn: sqlite3.Connection) -> None:
            now = time.time()
            expires = now + ttl_seconds if ttl_seconds is not None else None
            for sql, delete_expired, keys, values in work:
                # A row that sets every column overwrites all of an expired one:
                # nothing of it can come back, so there is nothing to delete first.
                if len(values[0]) < every_column:
                    conn.executemany(delete_expired, [(*k, now) for k in keys])
                conn.executemany(sql, [(*v, expires) for v in values])
            self._maybe_cleanup(conn, table, now)

        await self._write(tx)

    async def get(self, table: Table, key: Mapping[str, Any]) -> Row | None:
        names, vals = check_key(table, key)
        sql, _ = self._cache_sql(
            ("get", table.name, tuple(table.columns), names),
            lambda: (
                f"SELECT {', '.join(_q(c) for c in table.columns)} FROM {_q(table.name)}"
                f" WHERE {_where(names)} AND {_LIVE}",
                "",
            ),
        )

        def job(conn: sqlite3.Connection) -> Row | None:
            found = conn.execute(sql, (*vals, time.time())).fetchone()
            return None if found is None else self._to_row(table, found)

        return await self._read(job)

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

        rows = await self._read(job)
        return finish_page(table, rows, plan.limit)

    async def delete(self, table: Table, key: Mapping[str, Any]) -> None:
        names, vals = check_key(table, key, allow_partition=True)
        sql = f"DELETE FROM {_q(table.name)} WHERE {_where(names)}"

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(sql, vals)

        await self._write(tx)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is None:
                return  # never used: no thread, no connection
            # The last job: the worker runs what was queued before it, then closes
            # the connection and ends.
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._queue.put(_Job(_CLOSE, None, loop, fut))
        await fut
