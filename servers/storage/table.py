"""The table port: a wide-column store with Cassandra's data model and nothing more.

A table declares its partition key, its clustering columns (all in one
direction) and its columns. Operations:

- ``put``: upsert the given columns of one row, optionally ``IF NOT EXISTS``
  (a lightweight transaction on Cassandra) and optionally with a TTL;
- ``get``: one row by its full primary key;
- ``slice``: rows of one partition in clustering order (or reversed), within
  an optional clustering range, at most ``limit`` rows, resumable with an
  opaque page token;
- ``delete``: one row by its full primary key, or a whole partition.

No joins and no scans across partitions: what works on the SQLite adapter
works on the Cassandra adapter. Both adapters run through one contract suite
(tests/contract/test_table_contract.py).
"""

from __future__ import annotations

import abc
import base64
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ColumnType = Literal["text", "bigint", "int", "boolean", "double", "blob"]
COLUMN_TYPES: tuple[str, ...] = ("text", "bigint", "int", "boolean", "double", "blob")

Row = dict[str, Any]


@dataclass(frozen=True)
class Table:
    """A table definition. The same object emits the CQL schema and the SQLite DDL."""

    name: str
    partition_key: tuple[str, ...]
    columns: Mapping[str, ColumnType]
    clustering: tuple[str, ...] = ()
    # Clustering order of every clustering column: one direction per table, so
    # a clustering range is a plain tuple comparison on both backends.
    descending: bool = False
    comment: str = ""

    def __post_init__(self) -> None:
        if not self.partition_key:
            raise ValueError(f"{self.name}: a table needs a partition key")
        for col in (*self.partition_key, *self.clustering):
            if col not in self.columns:
                raise ValueError(f"{self.name}: key column {col!r} is not declared")
        for col, typ in self.columns.items():
            if typ not in COLUMN_TYPES:
                raise ValueError(f"{self.name}.{col}: unknown column type {typ!r}")
        if set(self.partition_key) & set(self.clustering):
            raise ValueError(f"{self.name}: a column cannot be both partition and clustering key")

    @functools.cached_property
    def primary_key(self) -> tuple[str, ...]:
        return (*self.partition_key, *self.clustering)

    @property
    def regular_columns(self) -> tuple[str, ...]:
        keys = set(self.primary_key)
        return tuple(c for c in self.columns if c not in keys)


@dataclass
class Page:
    rows: list[Row]
    # Opaque; empty when there are no more rows.
    next_page_token: str = ""


@dataclass(frozen=True)
class ClusteringRange:
    """Bounds on the clustering key, as tuples compared column by column.

    A bound may be a prefix of the clustering columns. ``gt``/``ge`` and
    ``lt``/``le`` are in terms of the values, independent of the table's
    clustering order and of ``reverse``.
    """

    gt: tuple[Any, ...] | None = None
    ge: tuple[Any, ...] | None = None
    lt: tuple[Any, ...] | None = None
    le: tuple[Any, ...] | None = None


class TableError(Exception):
    """A backend failure (unreachable, timed out)."""


class InvalidPageToken(ValueError):
    """The page token was not produced by this table's slice."""


@dataclass
class _TokenState:
    table: str
    last: list[Any] = field(default_factory=list)


def encode_page_token(table: Table, last_row: Row) -> str:
    """A token that resumes a slice after ``last_row`` (its clustering key)."""
    last = []
    for col in table.clustering:
        v = last_row[col]
        if isinstance(v, bytes | bytearray):
            v = {"b": base64.b64encode(bytes(v)).decode()}
        last.append(v)
    raw = json.dumps({"t": table.name, "k": last}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(table: Table, token: str) -> tuple[Any, ...]:
    """The clustering key to resume after; InvalidPageToken when malformed."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data["t"] != table.name or len(data["k"]) != len(table.clustering):
            raise ValueError("token of another table")
        out = []
        for v in data["k"]:
            if isinstance(v, dict):
                v = base64.b64decode(v["b"])
            out.append(v)
        return tuple(out)
    except Exception as exc:
        raise InvalidPageToken("malformed page token") from exc


class TableStore(abc.ABC):
    """The port. Adapters: SqliteTableStore (embedded), CassandraTableStore."""

    @abc.abstractmethod
    async def create_tables(self, tables: Sequence[Table]) -> None:
        """Create the tables if they do not exist (idempotent)."""

    @abc.abstractmethod
    async def put(
        self,
        table: Table,
        row: Row,
        *,
        if_not_exists: bool = False,
        ttl_seconds: int | None = None,
    ) -> bool:
        """Upsert the given columns of one row (the row must hold its whole primary key).

        With ``if_not_exists`` the row is written only when no live row has
        that primary key; returns whether it was written (always True without
        it). With ``ttl_seconds`` the written row expires after that time.
        """

    @abc.abstractmethod
    async def put_many(self, table: Table, rows: Sequence[Row], *, ttl_seconds: int | None = None) -> None:
        """Upsert many rows of one table, each as ``put`` would (no ``IF NOT EXISTS``).

        Every row is checked before any is written, so a bad row writes
        nothing. Adapters batch the writes: SQLite runs them as one job of
        its group commit (all or none), Cassandra sends them concurrently
        (each row on its own, as a Cassandra batch across partitions would
        only add coordinator work). A fan-out of one post to thousands of
        timelines costs one call instead of thousands.
        """

    @abc.abstractmethod
    async def get(self, table: Table, key: Mapping[str, Any]) -> Row | None:
        """One live row by its full primary key, with every column (missing ones None)."""

    @abc.abstractmethod
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
        """Live rows of one partition in clustering order (reversed with ``reverse``)."""

    @abc.abstractmethod
    async def delete(self, table: Table, key: Mapping[str, Any]) -> None:
        """Delete one row by full primary key, or a whole partition given only its key."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise TableError when the backend is unreachable."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def cql_type(typ: str) -> str:
    return {"text": "text", "bigint": "bigint", "int": "int", "boolean": "boolean",
            "double": "double", "blob": "blob"}[typ]


def cql_create_table(table: Table, keyspace: str) -> str:
    """The CQL DDL of one table."""
    cols = ",\n  ".join(f"{c} {cql_type(t)}" for c, t in table.columns.items())
    pk = "(" + ", ".join(table.partition_key) + ")"
    key = ", ".join([pk, *table.clustering])
    ddl = f"CREATE TABLE IF NOT EXISTS {keyspace}.{table.name} (\n  {cols},\n  PRIMARY KEY ({key})\n)"
    opts = []
    if table.clustering:
        order = "DESC" if table.descending else "ASC"
        opts.append("CLUSTERING ORDER BY (" + ", ".join(f"{c} {order}" for c in table.clustering) + ")")
    if table.comment:
        opts.append("comment = '" + table.comment.replace("'", "''") + "'")
    if opts:
        ddl += " WITH " + " AND ".join(opts)
    return ddl + ";"


def cql_create_keyspace(keyspace: str, replication: Mapping[str, Any] | None = None) -> str:
    repl = dict(replication or {"class": "SimpleStrategy", "replication_factor": 1})
    body = ", ".join(f"'{k}': {v!r}" if isinstance(v, str) else f"'{k}': {v}" for k, v in repl.items())
    return f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {{{body}}};"
