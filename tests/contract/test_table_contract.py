"""The table port's contract: every adapter passes the same tests.

Tables are created once per store; each test uses its own partitions, so the
suite also runs against one shared Cassandra keyspace.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from servers.storage.table import (
    ClusteringRange,
    InvalidPageToken,
    Page,
    Table,
    TableError,
    TableStore,
)

TYPES = Table(
    name="ct_types",
    partition_key=("pk",),
    clustering=("ck",),
    columns={
        "pk": "text",
        "ck": "bigint",
        "t": "text",
        "b": "bigint",
        "i": "int",
        "flag": "boolean",
        "d": "double",
        "data": "blob",
    },
)

EVENTS = Table(
    name="ct_events",
    partition_key=("tenant", "bucket"),
    clustering=("ts", "seq"),
    columns={"tenant": "text", "bucket": "int", "ts": "bigint", "seq": "int", "body": "text"},
)

EVENTS_DESC = Table(
    name="ct_events_desc",
    partition_key=("tenant", "bucket"),
    clustering=("ts", "seq"),
    descending=True,
    columns={"tenant": "text", "bucket": "int", "ts": "bigint", "seq": "int", "body": "text"},
)

KV = Table(
    name="ct_kv",
    partition_key=("k",),
    columns={"k": "text", "v": "text", "n": "bigint"},
    comment="a table without clustering columns",
)

TEXT_CK = Table(
    name="ct_text_ck",
    partition_key=("p",),
    clustering=("name",),
    columns={"p": "text", "name": "text", "data": "blob"},
)

TABLES = (TYPES, EVENTS, EVENTS_DESC, KV, TEXT_CK)


def uid(prefix: str = "") -> str:
    return prefix + secrets.token_hex(6)


@pytest.fixture
async def store(table_backend: Any) -> AsyncIterator[TableStore]:
    s = table_backend.open()
    await s.create_tables(TABLES)
    yield s
    await s.close()


async def slice_all(store: TableStore, table: Table, partition: dict[str, Any], **kw: Any) -> list:
    """Every row of a slice, following page tokens."""
    rows: list = []
    token = ""
    while True:
        page = await store.slice(table, partition, page_token=token, **kw)
        rows.extend(page.rows)
        if not page.next_page_token:
            return rows
        token = page.next_page_token


async def fill_events(store: TableStore, table: Table, tenant: str, n_ts: int = 5, n_seq: int = 3):
    """Rows (ts, seq) for ts in 1..n_ts, seq in 0..n_seq-1; returns their keys ascending."""
    keys = [(ts, seq) for ts in range(1, n_ts + 1) for seq in range(n_seq)]
    await asyncio.gather(
        *(
            store.put(
                table, {"tenant": tenant, "bucket": 0, "ts": ts, "seq": seq, "body": f"{ts}.{seq}"}
            )
            for ts, seq in keys
        )
    )
    return keys


def keys_of(rows: list) -> list[tuple[int, int]]:
    return [(r["ts"], r["seq"]) for r in rows]


# --- basics ---------------------------------------------------------------------


async def test_create_tables_is_idempotent(store: TableStore) -> None:
    await store.create_tables(TABLES)
    await store.ping()


async def test_put_get_every_column_type(store: TableStore) -> None:
    pk = uid()
    row = {
        "pk": pk,
        "ck": -(2**62),
        "t": "héllo wörld ✓",
        "b": 2**63 - 1,
        "i": -(2**31),
        "flag": True,
        "d": 3.25,
        "data": bytes(range(256)) + b"\x00",
    }
    assert await store.put(TYPES, row) is True
    got = await store.get(TYPES, {"pk": pk, "ck": -(2**62)})
    assert got == row
    assert isinstance(got["flag"], bool)
    assert isinstance(got["data"], bytes)
    assert isinstance(got["d"], float)

    await store.put(TYPES, {"pk": pk, "ck": 1, "flag": False, "d": -0.5, "data": b""})
    got = await store.get(TYPES, {"pk": pk, "ck": 1})
    assert got is not None
    assert got["flag"] is False
    assert got["d"] == -0.5
    # Cassandra reads an empty blob back as b"" (not null).
    assert got["data"] == b""


async def test_missing_columns_are_none(store: TableStore) -> None:
    pk = uid()
    await store.put(TYPES, {"pk": pk, "ck": 7, "t": "x"})
    got = await store.get(TYPES, {"pk": pk, "ck": 7})
    assert got == {
        "pk": pk, "ck": 7, "t": "x", "b": None, "i": None, "flag": None, "d": None, "data": None
    }


async def test_get_absent_row(store: TableStore) -> None:
    assert await store.get(TYPES, {"pk": uid(), "ck": 1}) is None
    assert await store.get(KV, {"k": uid()}) is None


async def test_upsert_updates_only_given_columns(store: TableStore) -> None:
    k = uid()
    await store.put(KV, {"k": k, "v": "one", "n": 1})
    await store.put(KV, {"k": k, "n": 2})
    assert await store.get(KV, {"k": k}) == {"k": k, "v": "one", "n": 2}
    await store.put(KV, {"k": k, "v": None})
    assert await store.get(KV, {"k": k}) == {"k": k, "v": None, "n": 2}


async def test_if_not_exists_does_not_overwrite(store: TableStore) -> None:
    k = uid()
    assert await store.put(KV, {"k": k, "v": "first"}, if_not_exists=True) is True
    assert await store.put(KV, {"k": k, "v": "second", "n": 5}, if_not_exists=True) is False
    assert await store.get(KV, {"k": k}) == {"k": k, "v": "first", "n": None}


async def test_if_not_exists_concurrent_single_winner(store: TableStore) -> None:
    k = uid()
    results = await asyncio.gather(
        *(store.put(KV, {"k": k, "v": f"writer-{i}"}, if_not_exists=True) for i in range(20))
    )
    assert sum(results) == 1
    winner = results.index(True)
    assert await store.get(KV, {"k": k}) == {"k": k, "v": f"writer-{winner}", "n": None}


async def test_if_not_exists_on_clustered_table(store: TableStore) -> None:
    pk = uid()
    assert await store.put(TYPES, {"pk": pk, "ck": 1, "t": "a"}, if_not_exists=True)
    assert await store.put(TYPES, {"pk": pk, "ck": 2, "t": "b"}, if_not_exists=True)
    assert not await store.put(TYPES, {"pk": pk, "ck": 1, "t": "c"}, if_not_exists=True)
    assert [r["t"] for r in (await store.slice(TYPES, {"pk": pk})).rows] == ["a", "b"]


# A table that no test creates: writing to it fails in the backend (not in the argument checks).
NOT_CREATED = Table(name="ct_not_created", partition_key=("k",), columns={"k": "text"})


async def test_concurrent_puts_resolve_one_by_one(store: TableStore) -> None:
    """200 concurrent puts (as a batching adapter groups them): each resolves on its own.

    Unconditional upserts and IF NOT EXISTS on distinct keys, IF NOT EXISTS
    contending on a few keys, and in the middle a put refused by the argument
    checks and one failing in the backend: exactly one winner per contended
    key, the two bad writes fail alone, every other write is stored.
    """
    p = uid()
    calls: list[tuple[str, str, str]] = []  # (kind, key, value)
    calls += [("plain", f"{p}-u{i}", f"u{i}") for i in range(48)]
    calls += [("ine", f"{p}-d{i}", f"d{i}") for i in range(100)]
    calls += [("ine", f"{p}-c{i % 10}", f"c{i % 10}-{i}") for i in range(50)]
    random.Random(7).shuffle(calls)
    calls.insert(99, ("invalid", f"{p}-bad", "wrong type"))
    calls.insert(101, ("backend", f"{p}-ghost", ""))
    assert len(calls) == 200

    def call(kind: str, k: str, v: str) -> Awaitable[bool]:
        if kind == "plain":
            return store.put(KV, {"k": k, "v": v, "n": 1})
        if kind == "ine":
            return store.put(KV, {"k": k, "v": v}, if_not_exists=True)
        if kind == "invalid":
            return store.put(KV, {"k": k, "v": v, "n": "not an int"}, if_not_exists=True)
        return store.put(NOT_CREATED, {"k": k})

    results = await asyncio.gather(*(call(*c) for c in calls), return_exceptions=True)

    winners: dict[str, list[str]] = {}
    for (kind, k, v), r in zip(calls, results, strict=True):
        if kind == "invalid":
            assert isinstance(r, ValueError), r
        elif kind == "backend":
            assert isinstance(r, TableError), r
        elif k.startswith(f"{p}-c"):
            assert isinstance(r, bool), r
            if r:
                winners.setdefault(k, []).append(v)
        else:
            assert r is True, (kind, k, r)
    assert sorted(winners) == sorted(f"{p}-c{i}" for i in range(10))
    assert all(len(w) == 1 for w in winners.values()), winners

    for k, [v] in winners.items():
        assert await store.get(KV, {"k": k}) == {"k": k, "v": v, "n": None}
    for kind, k, v in calls:
        if kind == "plain":
            assert await store.get(KV, {"k": k}) == {"k": k, "v": v, "n": 1}
        elif kind == "ine" and k.startswith(f"{p}-d"):
            assert await store.get(KV, {"k": k}) == {"k": k, "v": v, "n": None}
    assert await store.get(KV, {"k": f"{p}-bad"}) is None


# --- TTL -------------------------------------------------------------------------


async def wait_gone(store: TableStore, table: Table, key: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30
    while await store.get(table, key) is not None:
        assert time.monotonic() < deadline, "row did not expire"
        await asyncio.sleep(0.25)


async def test_put_many_writes_every_row_across_partitions(store: TableStore) -> None:
    tenants = [uid("t"), uid("t")]
    rows = [{"tenant": t, "bucket": 0, "ts": ts, "seq": 0, "body": f"{t}:{ts}"}
            for t in tenants for ts in range(1, 301)]
    await store.put_many(EVENTS, rows)
    for t in tenants:
        got = await slice_all(store, EVENTS, {"tenant": t, "bucket": 0}, limit=128)
        assert [r["body"] for r in got] == [f"{t}:{ts}" for ts in range(1, 301)]


async def test_put_many_upserts_and_mixes_column_sets(store: TableStore) -> None:
    a, b = uid(), uid()
    await store.put(KV, {"k": a, "v": "old", "n": 1})
    await store.put_many(KV, [{"k": a, "v": "new"}, {"k": b, "n": 7}, {"k": b, "v": "later"}])
    assert await store.get(KV, {"k": a}) == {"k": a, "v": "new", "n": 1}
    assert await store.get(KV, {"k": b}) == {"k": b, "v": "later", "n": 7}
    await store.put_many(KV, [])  # nothing to do is fine


async def test_put_many_with_a_bad_row_writes_nothing(store: TableStore) -> None:
    good, also = uid(), uid()
    with pytest.raises(ValueError):
        await store.put_many(KV, [{"k": good, "v": "x"}, {"v": "no key"}, {"k": also, "v": "y"}])
    with pytest.raises(ValueError):
        await store.put_many(KV, [{"k": good, "v": "x"}, {"k": also, "nope": 1}])
    assert await store.get(KV, {"k": good}) is None
    assert await store.get(KV, {"k": also}) is None


async def test_put_many_with_ttl(store: TableStore) -> None:
    gone, stays = uid(), uid()
    await store.put_many(KV, [{"k": gone, "v": "short"}], ttl_seconds=1)
    await store.put(KV, {"k": stays, "v": "kept"})
    await wait_gone(store, KV, {"k": gone})
    assert await store.get(KV, {"k": stays}) == {"k": stays, "v": "kept", "n": None}
    # Over the expired row: a partial row brings none of its columns back, and a
    # full row (every column) is a new, unexpiring row.
    await store.put_many(KV, [{"k": gone, "n": 5}])
    assert await store.get(KV, {"k": gone}) == {"k": gone, "v": None, "n": 5}
    full = uid()
    await store.put_many(KV, [{"k": full, "v": "a", "n": 1}], ttl_seconds=1)
    await wait_gone(store, KV, {"k": full})
    await store.put_many(KV, [{"k": full, "v": "b", "n": 2}])
    await asyncio.sleep(1.2)
    assert await store.get(KV, {"k": full}) == {"k": full, "v": "b", "n": 2}


async def test_ttl_expiry(store: TableStore) -> None:
    k, keep = uid(), uid()
    await store.put(KV, {"k": k, "v": "short", "n": 1}, ttl_seconds=1)
    await store.put(KV, {"k": keep, "v": "long"}, ttl_seconds=3600)
    await wait_gone(store, KV, {"k": k})
    assert await store.get(KV, {"k": keep}) == {"k": keep, "v": "long", "n": None}

    # Expired rows vanish from slices too.
    pk = uid()
    await store.put(TYPES, {"pk": pk, "ck": 1, "t": "stays"})
    await store.put(TYPES, {"pk": pk, "ck": 2, "t": "goes"}, ttl_seconds=1)
    await wait_gone(store, TYPES, {"pk": pk, "ck": 2})
    page = await store.slice(TYPES, {"pk": pk})
    assert [r["t"] for r in page.rows] == ["stays"]
    assert page.next_page_token == ""


async def test_expired_row_counts_as_absent(store: TableStore) -> None:
    k = uid()
    await store.put(KV, {"k": k, "v": "old", "n": 9}, ttl_seconds=1)
    assert await store.put(KV, {"k": k, "v": "again"}, if_not_exists=True) is False
    await wait_gone(store, KV, {"k": k})
    assert await store.put(KV, {"k": k, "v": "new"}, if_not_exists=True) is True
    # Nothing of the expired row comes back.
    assert await store.get(KV, {"k": k}) == {"k": k, "v": "new", "n": None}

    # An upsert over an expired row does not resurrect its other columns either.
    k2 = uid()
    await store.put(KV, {"k": k2, "v": "old", "n": 9}, ttl_seconds=1)
    await wait_gone(store, KV, {"k": k2})
    await store.put(KV, {"k": k2, "n": 10})
    assert await store.get(KV, {"k": k2}) == {"k": k2, "v": None, "n": 10}


async def test_if_not_exists_with_ttl(store: TableStore) -> None:
    k = uid()
    assert await store.put(KV, {"k": k, "v": "lease"}, if_not_exists=True, ttl_seconds=1)
    await wait_gone(store, KV, {"k": k})
    assert await store.put(KV, {"k": k, "v": "lease2"}, if_not_exists=True, ttl_seconds=60)
    assert (await store.get(KV, {"k": k}) or {}).get("v") == "lease2"


# --- slices ------------------------------------------------------------------------


@pytest.mark.parametrize("table", [EVENTS, EVENTS_DESC], ids=["asc", "desc"])
async def test_slice_order(store: TableStore, table: Table) -> None:
    tenant = uid()
    keys = await fill_events(store, table, tenant)
    natural = sorted(keys, reverse=table.descending)
    page = await store.slice(table, {"tenant": tenant, "bucket": 0})
    assert keys_of(page.rows) == natural
    assert page.next_page_token == ""
    assert page.rows[0]["body"] == "{}.{}".format(*natural[0])
    page = await store.slice(table, {"tenant": tenant, "bucket": 0}, reverse=True)
    assert keys_of(page.rows) == natural[::-1]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("table", [EVENTS, EVENTS_DESC], ids=["asc", "desc"])
@pytest.mark.parametrize(
    ("bounds", "keep"),
    [
        (ClusteringRange(gt=(2, 1)), lambda k: k > (2, 1)),
        (ClusteringRange(ge=(2, 1)), lambda k: k >= (2, 1)),
        (ClusteringRange(lt=(4, 1)), lambda k: k < (4, 1)),
        (ClusteringRange(le=(4, 1)), lambda k: k <= (4, 1)),
        (ClusteringRange(gt=(2,)), lambda k: k[0] > 2),
        (ClusteringRange(ge=(2,)), lambda k: k[0] >= 2),
        (ClusteringRange(lt=(4,)), lambda k: k[0] < 4),
        (ClusteringRange(le=(4,)), lambda k: k[0] <= 4),
        (ClusteringRange(ge=(2,), lt=(4,)), lambda k: 2 <= k[0] < 4),
        (ClusteringRange(gt=(2, 0), le=(4,)), lambda k: k > (2, 0) and k[0] <= 4),
        (ClusteringRange(ge=(3, 1), le=(3, 1)), lambda k: k == (3, 1)),
        (ClusteringRange(gt=(9,)), lambda k: False),
    ],
    ids=[
        "gt", "ge", "lt", "le", "gt-prefix", "ge-prefix", "lt-prefix", "le-prefix",
        "ge-lt-prefix", "gt-le-mixed", "point", "empty",
    ],
)
async def test_slice_bounds(
    store: TableStore, table: Table, reverse: bool, bounds: ClusteringRange, keep: Any
) -> None:
    tenant = uid()
    keys = await fill_events(store, table, tenant)
    want = sorted((k for k in keys if keep(k)), reverse=table.descending != reverse)
    partition = {"tenant": tenant, "bucket": 0}
    page = await store.slice(table, partition, reverse=reverse, bounds=bounds)
    assert keys_of(page.rows) == want
    assert page.next_page_token == ""
    # The same through pages of two rows: bounds hold across page tokens.
    assert keys_of(await slice_all(store, table, partition, reverse=reverse, bounds=bounds,
                                   limit=2)) == want


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("table", [EVENTS, EVENTS_DESC], ids=["asc", "desc"])
async def test_paging_250_rows(store: TableStore, table: Table, reverse: bool) -> None:
    tenant = uid()
    partition = {"tenant": tenant, "bucket": 0}
    keys = [(1000 + i // 2, i % 2) for i in range(250)]
    sem = asyncio.Semaphore(50)

    async def put(ts: int, seq: int) -> None:
        async with sem:
            await store.put(table, {**partition, "ts": ts, "seq": seq, "body": f"{ts}.{seq}"})

    await asyncio.gather(*(put(*k) for k in keys))
    pages: list[Page] = []
    token = ""
    while True:
        page = await store.slice(table, partition, limit=40, page_token=token, reverse=reverse)
        pages.append(page)
        assert len(pages) <= 10, "paging does not end"
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert [len(p.rows) for p in pages] == [40] * 6 + [10]
    assert all(p.next_page_token for p in pages[:-1])
    assert pages[-1].next_page_token == ""
    got = [k for p in pages for k in keys_of(p.rows)]
    assert got == sorted(keys, reverse=table.descending != reverse)


async def test_paging_exact_multiple_ends_with_empty_token(store: TableStore) -> None:
    tenant = uid()
    keys = await fill_events(store, EVENTS, tenant, n_ts=4, n_seq=2)  # 8 rows
    partition = {"tenant": tenant, "bucket": 0}
    first = await store.slice(EVENTS, partition, limit=4)
    assert len(first.rows) == 4 and first.next_page_token
    second = await store.slice(EVENTS, partition, limit=4, page_token=first.next_page_token)
    assert keys_of(first.rows + second.rows) == keys
    assert second.next_page_token == ""
    whole = await store.slice(EVENTS, partition, limit=8)
    assert len(whole.rows) == 8 and whole.next_page_token == ""


async def test_paging_with_text_and_blob_keys(store: TableStore) -> None:
    p = uid()
    names = [f"name-{i:03d}" for i in range(25)] + ["Zeta", "alpha", "é"]
    for n in names:
        await store.put(TEXT_CK, {"p": p, "name": n, "data": n.encode()})
    got = await slice_all(store, TEXT_CK, {"p": p}, limit=7)
    # Text clusters by its UTF-8 bytes on both backends.
    assert [r["name"] for r in got] == sorted(names, key=lambda s: s.encode())
    assert [r["data"] for r in got] == [r["name"].encode() for r in got]


async def test_rows_of_other_partitions_never_appear(store: TableStore) -> None:
    tenant, other = uid("a"), uid("b")
    await fill_events(store, EVENTS, tenant, n_ts=3, n_seq=1)
    await fill_events(store, EVENTS, other, n_ts=3, n_seq=1)
    await store.put(EVENTS, {"tenant": tenant, "bucket": 1, "ts": 2, "seq": 0, "body": "b1"})
    rows = await slice_all(store, EVENTS, {"tenant": tenant, "bucket": 0}, limit=1)
    assert keys_of(rows) == [(1, 0), (2, 0), (3, 0)]
    assert all(r["tenant"] == tenant and r["bucket"] == 0 for r in rows)
    rows = await slice_all(store, EVENTS, {"tenant": tenant, "bucket": 1})
    assert [r["body"] for r in rows] == ["b1"]
    assert (await store.slice(EVENTS, {"tenant": uid(), "bucket": 0})).rows == []


async def test_slice_of_table_without_clustering(store: TableStore) -> None:
    k = uid()
    assert (await store.slice(KV, {"k": k})).rows == []
    await store.put(KV, {"k": k, "v": "only"})
    page = await store.slice(KV, {"k": k}, limit=1)
    assert page.rows == [{"k": k, "v": "only", "n": None}]
    assert page.next_page_token == ""


@pytest.mark.parametrize(
    "token",
    [
        "garbage!!",
        "e30",
        "bm90LWpzb24",
        "eyJ0IjoiY3RfZXZlbnRzIiwiayI6WzFdfQ",
        "eyJ0IjoiY3RfZXZlbnRzIiwiayI6WyJhIiwiYiJdfQ",
    ],
)
async def test_malformed_page_token(store: TableStore, token: str) -> None:
    with pytest.raises(InvalidPageToken):
        await store.slice(EVENTS, {"tenant": uid(), "bucket": 0}, page_token=token)


async def test_page_token_of_another_table_is_refused(store: TableStore) -> None:
    tenant = uid()
    await fill_events(store, EVENTS_DESC, tenant, n_ts=3, n_seq=1)
    page = await store.slice(EVENTS_DESC, {"tenant": tenant, "bucket": 0}, limit=1)
    assert page.next_page_token
    with pytest.raises(InvalidPageToken):
        await store.slice(EVENTS, {"tenant": tenant, "bucket": 0}, page_token=page.next_page_token)


# --- delete --------------------------------------------------------------------------


async def test_delete_row(store: TableStore) -> None:
    tenant = uid()
    await fill_events(store, EVENTS, tenant, n_ts=3, n_seq=1)
    await store.delete(EVENTS, {"tenant": tenant, "bucket": 0, "ts": 2, "seq": 0})
    assert await store.get(EVENTS, {"tenant": tenant, "bucket": 0, "ts": 2, "seq": 0}) is None
    rows = await slice_all(store, EVENTS, {"tenant": tenant, "bucket": 0})
    assert keys_of(rows) == [(1, 0), (3, 0)]
    # Deleting an absent row is not an error.
    await store.delete(EVENTS, {"tenant": tenant, "bucket": 0, "ts": 2, "seq": 0})
    k = uid()
    await store.put(KV, {"k": k, "v": "x"})
    await store.delete(KV, {"k": k})
    assert await store.get(KV, {"k": k}) is None


async def test_delete_partition(store: TableStore) -> None:
    tenant = uid()
    await fill_events(store, EVENTS, tenant, n_ts=3, n_seq=2)
    await store.put(EVENTS, {"tenant": tenant, "bucket": 1, "ts": 1, "seq": 0, "body": "keep"})
    await store.delete(EVENTS, {"tenant": tenant, "bucket": 0})
    assert (await store.slice(EVENTS, {"tenant": tenant, "bucket": 0})).rows == []
    rows = (await store.slice(EVENTS, {"tenant": tenant, "bucket": 1})).rows
    assert [r["body"] for r in rows] == ["keep"]
    # The partition can be written again.
    await store.put(EVENTS, {"tenant": tenant, "bucket": 0, "ts": 5, "seq": 0, "body": "new"})
    assert keys_of((await store.slice(EVENTS, {"tenant": tenant, "bucket": 0})).rows) == [(5, 0)]


# --- durability ----------------------------------------------------------------------


async def test_data_survives_reopen(table_backend: Any) -> None:
    k, tenant = uid(), uid()
    first = table_backend.open()
    await first.create_tables(TABLES)
    await first.put(KV, {"k": k, "v": "durable", "n": 42})
    await fill_events(first, EVENTS, tenant, n_ts=2, n_seq=2)
    await first.close()

    second = table_backend.open()
    try:
        await second.create_tables(TABLES)
        assert await second.get(KV, {"k": k}) == {"k": k, "v": "durable", "n": 42}
        rows = await slice_all(second, EVENTS, {"tenant": tenant, "bucket": 0})
        assert keys_of(rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    finally:
        await second.close()


async def test_two_stores_on_one_place_see_each_other(table_backend: Any) -> None:
    """The server and the CLI open the same SQLite file (or cluster) at once."""
    a, b = table_backend.open(), table_backend.open()
    try:
        await a.create_tables(TABLES)
        await b.create_tables(TABLES)
        k = uid()
        results = await asyncio.gather(
            *(s.put(KV, {"k": k, "v": name}, if_not_exists=True)
              for s, name in [(a, "a"), (b, "b")] * 5)
        )
        assert sum(results) == 1
        assert await a.get(KV, {"k": k}) == await b.get(KV, {"k": k})
    finally:
        await a.close()
        await b.close()


# --- programming errors ------------------------------------------------------------------


async def test_invalid_rows_and_keys_are_refused(store: TableStore) -> None:
    with pytest.raises(ValueError):
        await store.put(KV, {"v": "no key"})
    with pytest.raises(ValueError):
        await store.put(EVENTS, {"tenant": "t", "bucket": 0, "ts": 1, "body": "no seq"})
    with pytest.raises(ValueError):
        await store.put(KV, {"k": "x", "undeclared": 1})
    with pytest.raises(ValueError):
        await store.put(KV, {"k": None, "v": "null key"})
    with pytest.raises(ValueError):
        await store.put(KV, {"k": "x", "n": "not an int"})
    with pytest.raises(ValueError):
        await store.put(TYPES, {"pk": "x", "ck": 1, "i": 2**31})
    with pytest.raises(ValueError):
        await store.put(TYPES, {"pk": "x", "ck": 1, "flag": 1})
    with pytest.raises(ValueError):
        await store.put(KV, {"k": "x"}, ttl_seconds=0)
    with pytest.raises(ValueError):
        await store.get(EVENTS, {"tenant": "t", "bucket": 0})
    with pytest.raises(ValueError):
        await store.delete(EVENTS, {"tenant": "t", "bucket": 0, "ts": 1})
    with pytest.raises(ValueError):
        await store.slice(EVENTS, {"tenant": "t"})
    with pytest.raises(ValueError):
        await store.slice(EVENTS, {"tenant": "t", "bucket": 0}, limit=0)
    with pytest.raises(ValueError):
        await store.slice(EVENTS, {"tenant": "t", "bucket": 0},
                          bounds=ClusteringRange(gt=(1,), ge=(1,)))
    with pytest.raises(ValueError):
        await store.slice(EVENTS, {"tenant": "t", "bucket": 0},
                          bounds=ClusteringRange(lt=(1, 2, 3)))
    with pytest.raises(ValueError):
        await store.create_tables(
            [Table(name="ct_bad", partition_key=("token",), columns={"token": "text"})]
        )
