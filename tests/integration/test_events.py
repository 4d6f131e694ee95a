"""Domain events (servers/platform/events.py) on a real Valkey and the table engine of the run.

SQLite by default; with ``--tables=cassandra`` a keyspace of the real test
node; with ``--redis=cluster`` the streams live on a 3-master cluster. The
crashes are real: a child process is SIGKILLed at a failpoint between the
outbox pointer, the state row and the stream, or inside a handler before
its ack.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.protobuf.struct_pb2 import Struct

from servers.platform.events import (
    EVENT_OUTBOX,
    OUTBOX_BUCKET_MS,
    TABLES,
    Consumer,
    Event,
    EventSettings,
    Publisher,
    dead_key,
    decode_event,
    stream_key,
)
from servers.platform.ids import Snowflake, bucket_of, id_for_time, id_timestamp_ms
from servers.storage.redis_conn import connect
from servers.storage.table import Table, TableStore
from tests.conftest import cassandra_unavailable

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

ROOT = Path(__file__).resolve().parents[2]

# A producer's state: a log of transitions per item, each row carrying the event it commits.
STATE = Table(
    name="events_test_state",
    partition_key=("item_id",),
    clustering=("seq",),
    columns={"item_id": "bigint", "seq": "int", "status": "text", "event": "text"},
)


def open_store(spec: str) -> TableStore:
    """``sqlite:<path>`` or ``cassandra:<keyspace>`` (the test node)."""
    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        from servers.storage.sqlite_table import SqliteTableStore

        return SqliteTableStore(where)
    from servers.storage.cassandra_table import CassandraTableStore

    hosts = [h for h in os.environ["SYSDESIGN_TEST_CASSANDRA_HOSTS"].split(",") if h]
    return CassandraTableStore(hosts, int(os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042")), where,
                               local_dc=os.environ.get("SYSDESIGN_TEST_CASSANDRA_LOCAL_DC") or None)


@pytest.fixture(scope="module")
def store_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("SYSDESIGN_TEST_TABLES") != "cassandra":
        yield "sqlite:" + str(tmp_path_factory.mktemp("events") / "tables.sqlite3")
        return
    if cassandra_unavailable():
        pytest.skip(cassandra_unavailable())
    keyspace = "t_events_" + secrets.token_hex(4)
    yield "cassandra:" + keyspace
    from cassandra.cluster import Cluster

    cluster = Cluster(os.environ["SYSDESIGN_TEST_CASSANDRA_HOSTS"].split(","),
                      port=int(os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042")))
    try:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
async def tables(store_spec: str) -> AsyncIterator[TableStore]:
    store = open_store(store_spec)
    await store.create_tables([*TABLES, STATE])
    yield store
    await store.close()


@pytest.fixture
async def r(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(valkey_url)
    yield client
    await client.aclose()


def fast(**kw: Any) -> EventSettings:
    base: dict[str, Any] = {"claim_idle_ms": 200, "max_attempts": 3, "grace_s": 30, "abandon_s": 3600}
    base.update(kw)
    return EventSettings(**base)


def publisher(tables: TableStore, r: Any, **kw: Any) -> Publisher:
    return Publisher(tables, r, Snowflake(secrets.randbelow(1000)), source="t" + secrets.token_hex(4),
                     state_tables=[STATE], settings=fast(**kw))


def topic() -> str:
    return "test.items." + secrets.token_hex(4)


def msg(**fields: Any) -> Struct:
    s = Struct()
    s.update(fields)
    return s


async def wait_for(cond: Callable[[], Awaitable[bool] | bool], deadline_s: float = 30.0) -> None:
    """Poll until cond() holds (a deadline against hangs, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        res = cond()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


class Running:
    """A consumer's run loop as a task, stopped (and awaited) on exit."""

    def __init__(self, consumer: Consumer, consumer_id: str = "c1") -> None:
        self.consumer, self.id = consumer, consumer_id
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.consumer.run(self.id, stop=self.stop, block_ms=50))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


async def outbox_rows(tables: TableStore, pub: Publisher, event_id: int) -> list[dict[str, Any]]:
    page = await tables.slice(EVENT_OUTBOX, {"source": pub.source,
                                             "bucket": bucket_of(event_id, OUTBOX_BUCKET_MS)})
    return page.rows


async def settled(c: Consumer) -> bool:
    d = await c.queue.depth()
    return d["pending"] == 0 and d["lag"] == 0


def collector() -> tuple[list[Event], Callable[[Event], Awaitable[None]]]:
    seen: list[Event] = []

    async def handle(event: Event) -> None:
        seen.append(event)

    return seen, handle


# --------------------------------------------------------------------------- publish and consume


async def test_events_arrive_in_order_with_their_declared_payload(tables: TableStore, r: Any) -> None:
    pub, t = publisher(tables, r), topic()
    published = []
    for i in range(12):
        ev = await pub.publish(STATE, {"item_id": 100 + i % 3, "seq": i, "status": f"s{i}"}, t,
                               msg(n=i, status=f"s{i}"), subject=str(100 + i % 3))
        assert ev is not None
        published.append(ev)
    # Each state row carries the event it committed; no pointer is left once the stream has it.
    row = await tables.get(STATE, {"item_id": 100, "seq": 0})
    assert row is not None and row["status"] == "s0"
    carried = decode_event(row["event"])
    assert carried is not None and carried.id == published[0].id
    assert await outbox_rows(tables, pub, published[0].id) == []

    seen, handle = collector()
    c = Consumer(r, t, "indexer", handle, settings=fast())
    async with Running(c):
        await wait_for(lambda: len(seen) == 12)
        await wait_for(lambda: settled(c))
    assert [e.id for e in seen] == [e.id for e in published]
    assert all(e.type == "google.protobuf.Struct" for e in seen)
    assert all(isinstance(e.message, Struct) for e in seen)
    assert [int(e.message["n"]) for e in seen if isinstance(e.message, Struct)] == list(range(12))
    assert [e.subject for e in seen] == [str(100 + i % 3) for i in range(12)]
    assert all(e.topic == t and e.attempts == 1 for e in seen)


async def test_every_consumer_group_gets_every_event(tables: TableStore, r: Any) -> None:
    pub, t = publisher(tables, r), topic()
    ids = [(await pub.publish(STATE, {"item_id": 200, "seq": i, "status": "x"}, t, msg(n=i))).id  # type: ignore[union-attr]
           for i in range(5)]
    seen_a, ha = collector()
    seen_b, hb = collector()
    a, b = Consumer(r, t, "search", ha, settings=fast()), Consumer(r, t, "notify", hb, settings=fast())
    async with Running(a), Running(b):
        await wait_for(lambda: len(seen_a) == 5 and len(seen_b) == 5)
        await wait_for(lambda: settled(a))
        await wait_for(lambda: settled(b))
    assert [e.id for e in seen_a] == ids == [e.id for e in seen_b]
    # Acked entries stay for the other groups; MAXLEN trims the stream.
    assert await r.xlen(stream_key(t)) == 5


async def test_a_lost_if_not_exists_publishes_nothing(tables: TableStore, r: Any) -> None:
    pub, t = publisher(tables, r), topic()
    first = await pub.publish(STATE, {"item_id": 300, "seq": 1, "status": "won"}, t, msg(v="won"),
                              if_not_exists=True)
    second = await pub.publish(STATE, {"item_id": 300, "seq": 1, "status": "lost"}, t, msg(v="lost"),
                               if_not_exists=True)
    assert first is not None and second is None
    row = await tables.get(STATE, {"item_id": 300, "seq": 1})
    assert row is not None and row["status"] == "won"
    assert decode_event(row["event"]).id == first.id  # type: ignore[union-attr]
    assert await r.xlen(stream_key(t)) == 1
    assert await outbox_rows(tables, pub, first.id) == []


def test_bad_names_are_refused(tables: TableStore, r: Any) -> None:
    with pytest.raises(ValueError):
        stream_key("Bad{tag}")
    with pytest.raises(ValueError):
        Consumer(r, "ok.topic", "Bad Name", collector()[1])
    bare = Table(name="no_event_col", partition_key=("k",), columns={"k": "bigint"})
    with pytest.raises(ValueError):
        Publisher(tables, r, Snowflake(1), source="t", state_tables=[bare])


# --------------------------------------------------------------------------- crashes


CHILD = """
import asyncio, os, sys, signal
from google.protobuf.struct_pb2 import Struct
from servers.platform.events import Consumer, EventSettings, Publisher
from servers.platform.ids import Snowflake
from servers.storage.redis_conn import connect
from tests.integration.test_events import STATE, open_store

async def main():
    mode, spec, url, source, topic = sys.argv[1:6]
    r = connect(url)
    if mode == "publish":
        store = open_store(spec)
        pub = Publisher(store, r, Snowflake(int(sys.argv[6])), source=source, state_tables=[STATE])
        m = Struct()
        m.update({"crash": True})
        await pub.publish(STATE, {"item_id": int(sys.argv[7]), "seq": 1, "status": "paid"}, topic, m)
        print("published without dying", flush=True)
        return
    marker = sys.argv[6]
    async def hang(event):
        open(marker, "w").write(str(event.id))
        await asyncio.sleep(3600)
    c = Consumer(r, topic, "billing", hang, settings=EventSettings(claim_idle_ms=200))
    await c.run("doomed", stop=asyncio.Event(), block_ms=50)

asyncio.run(main())
"""


def child(*args: str, failpoints: str = "") -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")]),
           "SYSDESIGN_FAILPOINTS": failpoints}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_exit(p: subprocess.Popen[bytes]) -> int:
    code = await asyncio.wait_for(asyncio.to_thread(p.wait), 60)
    return code


async def test_a_crash_before_the_stream_is_repaired_by_the_sweep(
        tables: TableStore, r: Any, store_spec: str, valkey_url: str) -> None:
    pub, t = publisher(tables, r), topic()
    p = child("publish", store_spec, valkey_url, pub.source, t, "7", "400",
              failpoints="events.publish.before_stream=kill")
    code = await wait_exit(p)
    assert code == -signal.SIGKILL, p.stdout.read().decode() if p.stdout else ""
    # The state change is committed with its event; the stream never got it.
    row = await tables.get(STATE, {"item_id": 400, "seq": 1})
    assert row is not None and row["status"] == "paid"
    committed = decode_event(row["event"])
    assert committed is not None
    assert await r.xlen(stream_key(t)) == 0
    assert [x["event_id"] for x in await outbox_rows(tables, pub, committed.id)] == [committed.id]

    # Within the grace period the sweep leaves it (the producer may still be appending).
    early = await pub.sweep_once()
    assert early.republished == 0
    later = int(committed.at_ms) + 31_000
    stats = await pub.sweep_once(now_ms=later)
    assert (stats.republished, stats.dropped) == (1, 0)
    assert await outbox_rows(tables, pub, committed.id) == []
    assert (await pub.sweep_once(now_ms=later)).republished == 0

    seen, handle = collector()
    c = Consumer(r, t, "ledger", handle, settings=fast())
    async with Running(c):
        await wait_for(lambda: len(seen) == 1)
    assert seen[0].id == committed.id
    assert isinstance(seen[0].message, Struct) and seen[0].message["crash"] is True


async def test_a_crash_before_the_state_write_publishes_nothing(
        tables: TableStore, r: Any, store_spec: str, valkey_url: str) -> None:
    pub, t = publisher(tables, r, abandon_s=600), topic()
    p = child("publish", store_spec, valkey_url, pub.source, t, "8", "500",
              failpoints="events.publish.after_pointer=kill")
    assert await wait_exit(p) == -signal.SIGKILL
    assert await tables.get(STATE, {"item_id": 500, "seq": 1}) is None
    # The pointer is in this hour's partition (or, at the turn of the hour, the last one's).
    now = int(time.time() * 1000)
    rows = []
    for b in {bucket_of(id_for_time(now), OUTBOX_BUCKET_MS),
              bucket_of(id_for_time(now - 120_000), OUTBOX_BUCKET_MS)}:
        rows += (await tables.slice(EVENT_OUTBOX, {"source": pub.source, "bucket": b})).rows
    assert len(rows) == 1
    at = id_timestamp_ms(rows[0]["event_id"])

    # A pointer to no event: kept while the write might still land, then dropped; never published.
    kept = await pub.sweep_once(now_ms=at + 60_000)
    assert (kept.republished, kept.dropped, kept.waiting) == (0, 0, 1)
    gone = await pub.sweep_once(now_ms=at + 601_000)
    assert (gone.republished, gone.dropped) == (0, 1)
    assert await outbox_rows(tables, pub, rows[0]["event_id"]) == []
    assert await r.xlen(stream_key(t)) == 0


async def test_a_consumer_killed_before_its_ack_loses_the_event_to_another(
        tables: TableStore, r: Any, store_spec: str, valkey_url: str, tmp_path: Path) -> None:
    pub, t = publisher(tables, r), topic()
    marker = tmp_path / "handling"
    p = child("consume", store_spec, valkey_url, pub.source, t, str(marker))
    try:
        # The child's group exists (it reads from the stream's start) before the event.
        await wait_for(lambda: r.exists(stream_key(t)))
        await wait_for(lambda: group_exists(r, t, "billing"))
        ev = await pub.publish(STATE, {"item_id": 600, "seq": 1, "status": "paid"}, t, msg(amount=5))
        assert ev is not None
        await wait_for(marker.exists)
        assert marker.read_text() == str(ev.id)
    finally:
        p.send_signal(signal.SIGKILL)
        await wait_exit(p)

    seen, handle = collector()
    c = Consumer(r, t, "billing", handle, settings=fast())
    async with Running(c, "survivor"):
        await wait_for(lambda: len(seen) == 1)
        await wait_for(lambda: settled(c))
    assert seen[0].id == ev.id and seen[0].attempts == 2


async def group_exists(r: Any, t: str, name: str) -> bool:
    try:
        groups = await r.xinfo_groups(stream_key(t))
    except Exception:
        return False
    return any((g.get("name") or g.get(b"name")) in (name, name.encode()) for g in groups)


# --------------------------------------------------------------------------- duplicates and poison


async def test_duplicates_are_filtered_by_event_id(tables: TableStore, r: Any) -> None:
    pub, t = publisher(tables, r), topic()
    ev = await pub.publish(STATE, {"item_id": 700, "seq": 1, "status": "paid"}, t, msg(n=1))
    assert ev is not None
    await pub.append(ev)  # what a sweep racing the producer's own append leaves
    assert await r.xlen(stream_key(t)) == 2

    once, h1 = collector()
    twice, h2 = collector()
    deduped = Consumer(r, t, "mailer", h1, settings=fast())
    raw = Consumer(r, t, "audit", h2, dedupe=False, settings=fast())
    async with Running(deduped), Running(raw):
        await wait_for(lambda: len(twice) == 2)
        await wait_for(lambda: settled(deduped))
        await wait_for(lambda: settled(raw))
    assert [e.id for e in once] == [ev.id]
    assert [e.id for e in twice] == [ev.id, ev.id]


async def test_an_event_whose_handler_always_fails_is_dead_lettered(tables: TableStore, r: Any) -> None:
    pub, t = publisher(tables, r), topic()
    ev = await pub.publish(STATE, {"item_id": 800, "seq": 1, "status": "paid"}, t, msg(n=1))
    ok = await pub.publish(STATE, {"item_id": 800, "seq": 2, "status": "refunded"}, t, msg(n=2))
    assert ev is not None and ok is not None
    attempts: list[int] = []
    handled: list[int] = []

    async def fussy(event: Event) -> None:
        if event.id == ev.id:
            attempts.append(event.attempts)
            raise RuntimeError("cannot index this one")
        handled.append(event.id)

    c = Consumer(r, t, "indexer", fussy, settings=fast(max_attempts=2))
    async with Running(c):
        await wait_for(lambda: r.xlen(dead_key(t, "indexer")))
        await wait_for(lambda: settled(c))
    assert attempts == [1, 2]
    assert handled == [ok.id]
    [dead] = await c.dead_letters()
    assert dead.fields["id"] == str(ev.id)
    assert dead.fields["type"] == "google.protobuf.Struct"
    assert "cannot index this one" in str(dead.fields["error"])
    assert dead.attempts == 2


async def test_an_undecodable_entry_is_dead_lettered(r: Any) -> None:
    t = topic()
    await r.xadd(stream_key(t), {"id": "1", "type": "sysdesign.nothing.v1.NoSuchEvent", "payload": b"\x01"})
    seen, handle = collector()
    c = Consumer(r, t, "indexer", handle, settings=fast(max_attempts=5))
    async with Running(c):
        await wait_for(lambda: r.xlen(dead_key(t, "indexer")))
        await wait_for(lambda: settled(c))
    assert seen == []
    [dead] = await c.dead_letters()
    assert "NoSuchEvent" in str(dead.fields["error"])
    assert dead.attempts == 1  # not retried: no retry can decode it
