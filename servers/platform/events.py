"""Domain events: an outbox on the table port, a Redis Stream per topic, consumer groups.

A producer publishes an event *with* a state change; consumers in any
language read the topic's stream through a consumer group. Delivery is
at-least-once: a consumer may see an event twice, never miss one that was
published with its state change (docs/events.md).

**Publishing** (:meth:`Publisher.publish`), three table-port/Redis steps::

    1. put event_outbox (source, bucket, event_id) -> where the state row is   the pointer
    2. put <state row> + its `event` column (the whole event)                  one row, one write
    3. XADD events:{<topic>} id type payload ...  (MAXLEN ~)                  then delete the pointer

The table port writes one row atomically on both adapters but has no
multi-row write that is atomic on Cassandra (``put_many`` sends its rows
concurrently), so the event is not a second row beside the state change: it
is a column *of the state row*, written by the same ``put``. The state row
is the commit: an event exists exactly when its state row carries it. The
pointer, written before, is only how the sweep finds state rows that may
hold an event the stream never got (the table port has no scans). A crash
after 1 leaves a pointer to nothing, which the sweep drops once
``abandon_s`` has passed; a crash after 2 leaves a pointer to a committed
event, which the sweep appends to the stream after ``grace_s``. A put that
failed ambiguously (a Cassandra timeout: maybe written) is the same case:
the sweep looks at the row and decides.

Producers whose state rows are immutable (a log of transitions, each row
claimed ``IF NOT EXISTS``, as payments and rides keep them) carry one event
per row and never overwrite one; a producer that upserts one row per entity
must not overwrite the row's event before it was published (step 3 or the
sweep), or that event is lost.

**Consuming** (:class:`Consumer`): a consumer group per (topic, consumer
name) on the topic's stream, run by :class:`~servers.storage.queue.JobQueue`
(XREADGROUP, ack after the handler succeeds, XAUTOCLAIM of a dead consumer's
entries after ``claim_idle_ms``, dead-letter stream after ``max_attempts``).
Entries are not deleted on ack (other groups read the same stream); the
stream is trimmed by the producers' ``MAXLEN ~``. :class:`Dedupe` makes a
handler idempotent by event id.

Keys, all in the topic's hash slot on Redis Cluster: ``events:{<topic>}``
(the stream), ``events:{<topic>}:dead:<consumer>`` (dead letters of one
consumer group), ``events:{<topic>}:seen:<consumer>:<event id>`` (dedupe).

Stream entry fields: ``id`` (the event id, a decimal Snowflake id), ``type``
(the payload's full protobuf message name, e.g.
``sysdesign.payments.v1.PaymentIntentEvent``), ``payload`` (the serialized
message), ``topic``, ``subject`` (the entity the event is about, or empty)
and ``at_ms`` (Unix milliseconds of the change).

| variable                         | default | what                                                 |
|----------------------------------|---------|------------------------------------------------------|
| SYSDESIGN_EVENTS_MAXLEN          | 1000000 | approximate cap of each topic's stream (XADD MAXLEN ~) |
| SYSDESIGN_EVENTS_GRACE_S         | 30      | an unconfirmed event this old is appended again       |
| SYSDESIGN_EVENTS_ABANDON_S       | 3600    | a pointer to no event this old is dropped             |
| SYSDESIGN_EVENTS_SWEEP_S         | 10      | seconds between two sweeps                            |
| SYSDESIGN_EVENTS_WINDOW_H        | 24      | hours of outbox partitions a sweep reads              |
| SYSDESIGN_EVENTS_CLAIM_IDLE_MS   | 30000   | a delivered, unacked event this idle is claimed       |
| SYSDESIGN_EVENTS_MAX_ATTEMPTS    | 5       | failed deliveries before the dead-letter stream       |
| SYSDESIGN_EVENTS_DEDUPE_TTL_S    | 86400   | how long Dedupe remembers a handled event id          |
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from servers.platform.config import env_int
from servers.platform.failpoints import failpoint
from servers.platform.ids import Snowflake, bucket_of, id_for_time, id_timestamp_ms
from servers.storage.queue import Job, JobQueue
from servers.storage.table import Row, Table, TableStore

log = structlog.get_logger("sysdesign.events")

# The column of a producer's state row that carries the event it commits
# (JSON of the whole event; see encode_event). Declare it in the table:
# ``columns={..., EVENT_COLUMN: EVENT_COLUMN_TYPE}``.
EVENT_COLUMN = "event"
EVENT_COLUMN_TYPE = "text"

# One outbox partition per producer and hour of event ids: a sweep reads the
# recent ones only, and the rows deleted on confirmation are tombstones in
# partitions nobody reads again once the window has passed them.
OUTBOX_BUCKET_MS = 60 * 60 * 1000

EVENT_OUTBOX = Table(
    name="event_outbox",
    partition_key=("source", "bucket"),
    clustering=("event_id",),
    columns={
        "source": "text", "bucket": "bigint", "event_id": "bigint", "topic": "text",
        # Where the event is: the state table, its primary key (JSON list) and column.
        "state_table": "text", "state_key": "text", "state_column": "text",
    },
    comment="domain events written and not yet confirmed on their stream (pointers to the state rows)",
)

TABLES = [EVENT_OUTBOX]

_TOPIC_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")
_CONSUMER_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class EventSettings:
    maxlen: int = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_MAXLEN", 1_000_000))
    grace_s: float = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_GRACE_S", 30, minimum=0))
    abandon_s: float = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_ABANDON_S", 3600, minimum=0))
    sweep_s: float = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_SWEEP_S", 10))
    window_h: int = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_WINDOW_H", 24))
    claim_idle_ms: int = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_CLAIM_IDLE_MS", 30_000))
    max_attempts: int = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_MAX_ATTEMPTS", 5))
    dedupe_ttl_s: int = field(default_factory=lambda: env_int("SYSDESIGN_EVENTS_DEDUPE_TTL_S", 86_400))


def check_topic(topic: str) -> str:
    if not _TOPIC_RE.match(topic):
        raise ValueError(f"topic {topic!r}: use [a-z][a-z0-9_.-]* (at most 100 characters)")
    return topic


def stream_key(topic: str) -> str:
    """``events:{<topic>}``: the topic's stream; its other keys share the hash tag."""
    return "events:{" + check_topic(topic) + "}"


def dead_key(topic: str, consumer: str) -> str:
    return f"{stream_key(topic)}:dead:{consumer}"


def seen_key(topic: str, consumer: str, event_id: int) -> str:
    return f"{stream_key(topic)}:seen:{consumer}:{event_id}"


@dataclass(frozen=True)
class Event:
    """One domain event. ``message`` is the decoded payload on the consumer side."""

    id: int
    topic: str
    type: str
    payload: bytes
    subject: str = ""
    at_ms: int = 0
    message: Message | None = None
    # Consumer side: the stream entry and how often it was delivered (1 the first time).
    entry_id: str = ""
    attempts: int = 1

    def fields(self) -> dict[str, str | bytes]:
        """The stream entry's fields."""
        return {"id": str(self.id), "type": self.type, "payload": self.payload,
                "topic": self.topic, "subject": self.subject, "at_ms": str(self.at_ms)}


def encode_event(event: Event) -> str:
    """The value of a state row's event column."""
    return json.dumps({"id": event.id, "topic": event.topic, "type": event.type,
                       "payload": base64.b64encode(event.payload).decode(),
                       "subject": event.subject, "at_ms": event.at_ms}, separators=(",", ":"))


def decode_event(value: str | None) -> Event | None:
    """The event a state row's event column carries, or None."""
    if not value:
        return None
    d = json.loads(value)
    return Event(id=int(d["id"]), topic=d["topic"], type=d["type"],
                 payload=base64.b64decode(d["payload"]), subject=d.get("subject", ""),
                 at_ms=int(d.get("at_ms", 0)))


def _encode_key(table: Table, row: Mapping[str, Any]) -> str:
    out: list[Any] = []
    for col in table.primary_key:
        v = row[col]
        out.append({"b": base64.b64encode(bytes(v)).decode()} if isinstance(v, bytes | bytearray) else v)
    return json.dumps(out, separators=(",", ":"))


def _decode_key(table: Table, raw: str) -> dict[str, Any]:
    vals = json.loads(raw)
    return {col: base64.b64decode(v["b"]) if isinstance(v, dict) else v
            for col, v in zip(table.primary_key, vals, strict=True)}


@dataclass
class SweepStats:
    republished: int = 0  # committed events appended to their stream again
    dropped: int = 0      # pointers to no event, older than abandon_s
    waiting: int = 0      # pointers to no event (yet), kept for a later sweep


class Publisher:
    """The producing side of one system (``source``, e.g. ``"payments"``).

    ``state_tables`` are the tables whose rows carry events (each with an
    :data:`EVENT_COLUMN` column); the sweep reads them back by name.
    """

    def __init__(
        self,
        tables: TableStore,
        redis: Any,
        snowflake: Snowflake,
        *,
        source: str,
        state_tables: Sequence[Table],
        settings: EventSettings | None = None,
    ) -> None:
        check_topic(source)
        self.tables = tables
        self.redis = redis
        self.snowflake = snowflake
        self.source = source
        self.settings = settings or EventSettings()
        self._state: dict[str, Table] = {}
        for t in state_tables:
            if t.columns.get(EVENT_COLUMN) != EVENT_COLUMN_TYPE:
                raise ValueError(f"{t.name}: a table carrying events needs a {EVENT_COLUMN!r}"
                                 f" {EVENT_COLUMN_TYPE} column")
            self._state[t.name] = t

    def event(self, topic: str, message: Message, *, subject: str = "") -> Event:
        """A new event (its id allocated now) with ``message`` as its payload."""
        event_id = self.snowflake.next_id()
        return Event(id=event_id, topic=check_topic(topic), type=message.DESCRIPTOR.full_name,
                     payload=message.SerializeToString(deterministic=True), subject=subject,
                     at_ms=id_timestamp_ms(event_id))

    def _pointer_key(self, event_id: int) -> dict[str, Any]:
        return {"source": self.source, "bucket": bucket_of(event_id, OUTBOX_BUCKET_MS),
                "event_id": event_id}

    async def publish(
        self,
        table: Table,
        row: Row,
        topic: str,
        message: Message,
        *,
        subject: str = "",
        if_not_exists: bool = False,
        ttl_seconds: int | None = None,
    ) -> Event | None:
        """Write ``row`` (the state change) carrying a new event, then append the event.

        Returns the event, or None when ``if_not_exists`` found the row taken
        (no state change, no event). Raises what the table port raises for the
        state write; a Redis failure after it is logged, not raised: the state
        change happened and the sweep appends its event later.
        """
        if self._state.get(table.name) != table:
            raise ValueError(f"{table.name} is not among this publisher's state tables")
        if EVENT_COLUMN in row:
            raise ValueError(f"{table.name}: the {EVENT_COLUMN!r} column is the publisher's")
        event = self.event(topic, message, subject=subject)
        await self.tables.put(EVENT_OUTBOX, {
            **self._pointer_key(event.id), "topic": event.topic, "state_table": table.name,
            "state_key": _encode_key(table, row), "state_column": EVENT_COLUMN})
        failpoint("events.publish.after_pointer")
        written = await self.tables.put(table, {**row, EVENT_COLUMN: encode_event(event)},
                                        if_not_exists=if_not_exists, ttl_seconds=ttl_seconds)
        if not written:
            await self.tables.delete(EVENT_OUTBOX, self._pointer_key(event.id))
            return None
        failpoint("events.publish.before_stream")
        try:
            await self.append(event)
            await self.tables.delete(EVENT_OUTBOX, self._pointer_key(event.id))
        except Exception as exc:  # committed: the sweep appends it (again)
            log.warning("event_append_deferred", topic=topic, event_id=event.id, error=repr(exc))
        return event

    async def append(self, event: Event) -> str:
        """XADD the event to its topic's stream (approximately trimmed); the entry id."""
        entry = await self.redis.xadd(stream_key(event.topic), event.fields(),
                                      maxlen=self.settings.maxlen, approximate=True)
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def sweep_once(self, now_ms: int | None = None) -> SweepStats:
        """Append again every committed event whose pointer is older than ``grace_s``.

        Reads this source's outbox partitions of the last ``window_h`` hours.
        For each pointer past the grace period it reads the state row: if the
        row carries that event, the event goes to the stream and the pointer
        is deleted; if not (the state write never happened, or lost its
        ``IF NOT EXISTS``), the pointer is kept until ``abandon_s`` and then
        deleted. A consumer may see an event twice (its first append went
        through but the pointer's delete did not, or two sweepers raced).
        """
        st = self.settings
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        older_than = id_for_time(now_ms - int(st.grace_s * 1000))
        abandon_before = id_for_time(now_ms - int(st.abandon_s * 1000))
        newest = bucket_of(max(older_than - 1, 0), OUTBOX_BUCKET_MS)
        stats = SweepStats()
        for bucket in range(newest, newest - st.window_h - 1, -1):
            token = ""
            while True:
                page = await self.tables.slice(EVENT_OUTBOX, {"source": self.source, "bucket": bucket},
                                               limit=500, page_token=token)
                for ptr in page.rows:
                    if ptr["event_id"] >= older_than:
                        continue
                    await self._resolve(ptr, abandon_before, stats)
                token = page.next_page_token
                if not token:
                    break
        if stats.republished or stats.dropped:
            log.info("events_swept", source=self.source, republished=stats.republished,
                     dropped=stats.dropped, waiting=stats.waiting)
        return stats

    async def _resolve(self, ptr: Row, abandon_before: int, stats: SweepStats) -> None:
        table = self._state.get(ptr["state_table"])
        if table is None:
            log.warning("event_pointer_unknown_table", source=self.source, table=ptr["state_table"],
                        event_id=ptr["event_id"])
            stats.waiting += 1
            return
        row = await self.tables.get(table, _decode_key(table, ptr["state_key"]))
        event = decode_event(row.get(ptr["state_column"] or EVENT_COLUMN)) if row else None
        pkey = {"source": ptr["source"], "bucket": ptr["bucket"], "event_id": ptr["event_id"]}
        if event is not None and event.id == ptr["event_id"]:
            await self.append(event)
            await self.tables.delete(EVENT_OUTBOX, pkey)
            stats.republished += 1
        elif ptr["event_id"] < abandon_before:
            await self.tables.delete(EVENT_OUTBOX, pkey)
            stats.dropped += 1
        else:
            stats.waiting += 1

    async def sweep(self) -> float:
        """One sweep for a :class:`~servers.systems.Worker`; seconds to the next."""
        await self.sweep_once()
        return float(self.settings.sweep_s)


# --------------------------------------------------------------------------- consuming


def _field_bytes(v: str | bytes | None) -> bytes:
    if v is None:
        return b""
    return v if isinstance(v, bytes) else v.encode()


def _field_str(v: str | bytes | None) -> str:
    if v is None:
        return ""
    return v.decode() if isinstance(v, bytes) else v


def message_class(type_name: str, types: Mapping[str, type[Message]] | None = None) -> type[Message]:
    """The class of a payload: one of ``types``, else from the default descriptor pool
    (any generated module imported in this process); KeyError when unknown."""
    if types and type_name in types:
        return types[type_name]
    descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    return message_factory.GetMessageClass(descriptor)  # type: ignore[no-any-return]


def event_of_job(job: Job, types: Mapping[str, type[Message]] | None = None) -> Event:
    """The event a stream entry carries, its payload decoded (ValueError when it cannot be)."""
    f = job.fields
    try:
        event_id = int(_field_str(f.get("id")))
        type_name = _field_str(f.get("type"))
        cls = message_class(type_name, types)
        payload = _field_bytes(f.get("payload"))
        msg = cls()
        msg.ParseFromString(payload)
    except (KeyError, ValueError, DecodeError) as exc:
        raise ValueError(f"entry {job.id} is not a decodable event: {exc!r}") from exc
    return Event(id=event_id, topic=_field_str(f.get("topic")), type=type_name, payload=payload,
                 subject=_field_str(f.get("subject")), at_ms=int(_field_str(f.get("at_ms")) or 0),
                 message=msg, entry_id=job.id, attempts=job.attempts)


Handler = Callable[[Event], Awaitable[None]]


class Dedupe:
    """Remembers handled event ids per consumer group (``SET NX`` with a TTL).

    :meth:`wrap` skips an event already handled and remembers one once its
    handler returned. An event redelivered while its first delivery is still
    running, or after a crash between the handler and the mark, runs again:
    effects that must happen once belong in a write keyed by the event id.
    """

    def __init__(self, redis: Any, topic: str, consumer: str, ttl_s: int = 86_400) -> None:
        self.redis = redis
        self.topic = check_topic(topic)
        self.consumer = consumer
        self.ttl_s = ttl_s

    async def seen(self, event_id: int) -> bool:
        return bool(await self.redis.exists(seen_key(self.topic, self.consumer, event_id)))

    async def mark(self, event_id: int) -> bool:
        """Remember the event; False when it was remembered already."""
        return bool(await self.redis.set(seen_key(self.topic, self.consumer, event_id), b"1",
                                         nx=True, ex=self.ttl_s))

    def wrap(self, handler: Handler) -> Handler:
        async def once(event: Event) -> None:
            if await self.seen(event.id):
                log.info("event_duplicate_skipped", topic=event.topic, event_id=event.id,
                         consumer=self.consumer)
                return
            await handler(event)
            await self.mark(event.id)

        return once


class Consumer:
    """One consumer group (``name``) on one topic; run one :meth:`run` per process.

    The handler gets each event with its payload decoded (``types`` maps
    full message names to classes; otherwise the default descriptor pool is
    asked). It is acked once the handler returns; an event whose handler
    raised is retried after ``claim_idle_ms`` and dead-lettered on attempt
    ``max_attempts``; an entry that cannot be decoded (unknown type, bad
    payload) is dead-lettered on its first delivery.
    """

    def __init__(
        self,
        redis: Any,
        topic: str,
        name: str,
        handler: Handler,
        *,
        types: Iterable[type[Message]] = (),
        dedupe: bool = True,
        settings: EventSettings | None = None,
    ) -> None:
        if not _CONSUMER_RE.match(name):
            raise ValueError(f"consumer name {name!r}: use [a-z][a-z0-9_.-]*")
        st = settings or EventSettings()
        self.topic = check_topic(topic)
        self.name = name
        self.types = {t.DESCRIPTOR.full_name: t for t in types}
        self.dedupe = Dedupe(redis, topic, name, st.dedupe_ttl_s) if dedupe else None
        self.handler = self.dedupe.wrap(handler) if self.dedupe else handler
        self.queue = JobQueue(redis, stream_key(topic), name, max_attempts=st.max_attempts,
                              claim_idle_ms=st.claim_idle_ms, delete_acked=False,
                              dead_stream=dead_key(topic, name))

    async def handle(self, job: Job) -> None:
        try:
            event = event_of_job(job, self.types)
        except ValueError as exc:  # no retry can decode it
            await self.queue.dead_letter(job, str(exc))
            return
        await self.handler(event)

    async def run(self, consumer_id: str, *, stop: Any, block_ms: int = 1000,
                  concurrency: int = 1) -> None:
        """Consume until ``stop`` (an asyncio.Event) is set; ``consumer_id`` unique per process."""
        await self.queue.run(consumer_id, self.handle, stop=stop, block_ms=block_ms,
                             concurrency=concurrency)

    async def dead_letters(self, count: int = 100) -> list[Job]:
        return await self.queue.dead_letters(count)


__all__ = [
    "EVENT_COLUMN", "EVENT_COLUMN_TYPE", "EVENT_OUTBOX", "TABLES", "Consumer", "Dedupe", "Event",
    "EventSettings", "Publisher", "SweepStats", "dead_key", "decode_event", "encode_event",
    "event_of_job", "message_class", "seen_key", "stream_key",
]
