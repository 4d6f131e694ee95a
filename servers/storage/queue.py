"""A job queue on Redis Streams with consumer groups.

Delivery is **at-least-once**: a job can run more than once (a consumer dies
after the work but before the ack, a handler outlives the claim timeout while
its process is frozen, an ack is lost to a connection error). Handlers must be
idempotent: write with ``IF NOT EXISTS`` / upserts keyed by the job, check
before side effects, and so on.

Life of a job::

    enqueue ──XADD──> stream ──XREADGROUP >──> consumer ──handler ok──> XACK (+XDEL)
                                     │                  └─handler raises──> stays pending
                                     │                                         │
                         XAUTOCLAIM (idle > claim_idle_ms) <───────────────────┘
                                     │
                         delivery count > max_attempts, or the handler fails on
                         attempt max_attempts ──> XADD <stream>:dead, XACK, XDEL

- A failed job is retried after ``claim_idle_ms`` by whichever consumer scans
  first (that delay is the retry back-off).
- Jobs of a consumer that died are reclaimed the same way.
- While a handler runs, its consumer touches the job every
  ``claim_idle_ms / 3`` (``XCLAIM ... JUSTID``: resets the idle time, leaves
  the delivery count alone), so a long job (a transcode) is not stolen from a
  live consumer. ``job_timeout`` bounds a handler that hangs.
- A consumer holds at most ``concurrency`` jobs at a time (each read asks for
  no more than the free slots), so idle consumers get the work.

Keys: the stream, its group and ``<stream>:dead`` (or the ``dead_stream`` given). Dead-lettering is one
MULTI over the stream and the dead-letter stream, so on Redis Cluster pass a
hash-tagged stream name, e.g. ``key("q:blobgc")`` -> ``{q:blobgc}``; then
``{q:blobgc}:dead`` lands in the same slot.

Field names ``error``, ``attempts`` and ``original_id`` are reserved: the
dead-letter entry carries the original fields plus those three.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions as rexc
import structlog

log = structlog.get_logger()

RESERVED_FIELDS = frozenset({"error", "attempts", "original_id"})

FieldValue = str | bytes | int | float


@dataclass
class Job:
    """One delivery of a stream entry.

    ``fields`` values are ``str`` where they are valid UTF-8, ``bytes``
    otherwise. ``attempts`` is the delivery count including this one (1 on
    the first delivery).
    """

    id: str
    fields: dict[str, str | bytes] = field(default_factory=dict)
    attempts: int = 1


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _decode_fields(raw: Mapping[Any, Any] | None) -> dict[str, str | bytes]:
    out: dict[str, str | bytes] = {}
    for k, v in (raw or {}).items():
        if isinstance(v, bytes):
            try:
                v = v.decode()
            except UnicodeDecodeError:
                pass
        out[_s(k)] = v
    return out


def _entries_of_read(resp: Any) -> list[tuple[Any, Any]]:
    """Entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 dict)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        entries: list[tuple[Any, Any]] = []
        for v in resp.values():
            # redis-py RESP3: {stream: [[(id, fields), ...]]}
            for part in v:
                entries.extend(part if part and isinstance(part[0], list | tuple) else [part])
        return entries
    return list(resp[0][1])


def _cancel_requested() -> bool:
    """True when the current task has a cancellation pending that was swallowed.

    On Python 3.11, ``asyncio.wait_for`` (used inside redis-py when a socket
    timeout is set) drops a cancellation that arrives as the inner call
    completes: the Redis call returns normally and the task carries on. Loops
    check this so that a cancelled worker still stops.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + "…"


def _hash_tag(name: str) -> str:
    """The part of a key Redis Cluster hashes, if the key has a tag (``{...}``, non-empty)."""
    start = name.find("{")
    end = name.find("}", start + 1)
    return name[start + 1:end] if start >= 0 and end > start + 1 else ""


class JobQueue:
    """A stream + consumer group used as a job queue (see the module docstring).

    ``maxlen`` caps the stream with approximate trimming on each enqueue; it is
    a safety valve, not flow control: entries trimmed while still pending are
    lost (logged when a scan finds them). Acked entries are deleted
    (``delete_acked``), so the stream length is the backlog.
    """

    def __init__(
        self,
        redis: Any,
        stream: str,
        group: str,
        *,
        max_attempts: int = 5,
        claim_idle_ms: int = 30000,
        maxlen: int | None = None,
        delete_acked: bool = True,
        dead_stream: str | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if claim_idle_ms < 1:
            raise ValueError("claim_idle_ms must be positive")
        self.redis = redis
        self.stream = stream
        self.group = group
        # The dead-letter stream is written in one MULTI with the stream's XACK,
        # so on Redis Cluster it must hash to the stream's slot: "{q:x}" gets
        # "{q:x}:dead"; an untagged "jobs" gets "{jobs}:dead" (the slot of "jobs").
        # A caller naming its own dead-letter stream (one per group of a shared
        # stream, say) must keep it in the stream's slot.
        if dead_stream is None:
            dead_stream = f"{stream}:dead" if _hash_tag(stream) else "{" + stream + "}:dead"
        elif _hash_tag(dead_stream) != (_hash_tag(stream) or stream):
            raise ValueError(f"dead-letter stream {dead_stream!r} is not in the slot of {stream!r}")
        self.dead_stream = dead_stream
        self.max_attempts = max_attempts
        self.claim_idle_ms = claim_idle_ms
        self.maxlen = maxlen
        self.delete_acked = delete_acked

    # ------------------------------------------------------------------ producer

    async def ensure_group(self) -> None:
        """Create the stream and the group (reading from the start); idempotent."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, payload: Mapping[str, FieldValue]) -> str:
        """Append a job; returns its entry id."""
        if not payload:
            raise ValueError("a job needs at least one field")
        reserved = RESERVED_FIELDS.intersection(payload)
        if reserved:
            raise ValueError(f"reserved job field names: {sorted(reserved)}")
        entry_id = await self.redis.xadd(
            self.stream,
            dict(payload),
            maxlen=self.maxlen,
            approximate=True,
        )
        return _s(entry_id)

    # ------------------------------------------------------------------ consumer

    async def run(
        self,
        consumer: str,
        handler: Callable[[Job], Awaitable[None]],
        *,
        stop: asyncio.Event,
        batch: int = 16,
        block_ms: int = 1000,
        concurrency: int = 1,
        job_timeout: float | None = None,
    ) -> None:
        """Consume until ``stop`` is set, then finish the jobs in hand and return.

        ``consumer`` must be unique among live consumers of the group (host +
        pid, or the leased worker id). Notices ``stop`` within ``block_ms``.
        Cancelling ``run`` cancels running handlers; their jobs stay pending
        and are reclaimed by another consumer after ``claim_idle_ms``.
        """
        if concurrency < 1 or batch < 1:
            raise ValueError("concurrency and batch must be at least 1")
        await self.ensure_group()
        inflight: dict[str, asyncio.Task[None]] = {}
        heartbeat_done = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(consumer, inflight, heartbeat_done))
        stop_wait = asyncio.create_task(stop.wait())
        cursor = "0-0"
        scan_every = max(self.claim_idle_ms / 2000, 0.01)  # seconds
        next_scan = 0.0
        backoff = 0.1
        cancelled = False
        try:
            while not stop.is_set():
                if _cancel_requested():
                    raise asyncio.CancelledError
                free = concurrency - len(inflight)
                if free <= 0:
                    await asyncio.wait(
                        [stop_wait, *inflight.values()], return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                want = min(batch, free)
                try:
                    jobs: list[Job] = []
                    now = time.monotonic()
                    if cursor != "0-0" or now >= next_scan:
                        jobs, cursor = await self._claim_stuck(consumer, cursor, want)
                        if cursor == "0-0":
                            next_scan = now + scan_every
                    if len(jobs) < want:
                        block: int | None = None
                        if not jobs and cursor == "0-0":
                            wait_ms = int((next_scan - time.monotonic()) * 1000)
                            block = max(1, min(block_ms, wait_ms))
                        jobs += await self._read_new(consumer, want - len(jobs), block)
                    backoff = 0.1
                except rexc.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("queue_group_missing", stream=self.stream, group=self.group)
                    await self.ensure_group()
                    cursor = "0-0"
                    continue
                except (rexc.ConnectionError, rexc.TimeoutError) as exc:
                    log.warning(
                        "queue_redis_unavailable",
                        stream=self.stream,
                        error=str(exc),
                        retry_s=backoff,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stop_wait), backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                for job in jobs:
                    if job.id in inflight:  # already running here (reclaimed from ourselves)
                        continue
                    task = asyncio.create_task(
                        self._process(job, handler, job_timeout), name=job.id
                    )
                    inflight[job.id] = task
                    task.add_done_callback(lambda t: inflight.pop(t.get_name(), None))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            stop_wait.cancel()
            tasks = list(inflight.values())
            if cancelled:
                for t in tasks:
                    t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            # Stopped by a flag, not by cancel(): a cancel can be swallowed (see
            # _cancel_requested) and the heartbeat would then run forever.
            heartbeat_done.set()
            await heartbeat

    async def _read_new(self, consumer: str, count: int, block: int | None) -> list[Job]:
        resp = await self.redis.xreadgroup(
            self.group, consumer, {self.stream: ">"}, count=count, block=block
        )
        # ">" hands out entries never delivered before: this is delivery 1.
        return [
            Job(id=_s(eid), fields=_decode_fields(raw), attempts=1)
            for eid, raw in _entries_of_read(resp)
        ]

    async def _claim_stuck(self, consumer: str, cursor: str, count: int) -> tuple[list[Job], str]:
        """XAUTOCLAIM entries idle longer than claim_idle_ms; their true delivery counts.

        XAUTOCLAIM increments the delivery count but does not return it, so it
        is read back with XPENDING for each claimed id (now owned by us, idle
        ~0, so nobody else can claim it in between).
        """
        resp = await self.redis.xautoclaim(
            self.stream, self.group, consumer, self.claim_idle_ms, start_id=cursor, count=count
        )
        next_cursor = _s(resp[0])
        claimed = [(eid, raw) for eid, raw in resp[1] if eid is not None]
        deleted = resp[2] if len(resp) > 2 else []
        if deleted:
            log.warning(
                "queue_pending_entries_trimmed",
                stream=self.stream,
                ids=[_s(d) for d in deleted],
            )
        if not claimed:
            return [], next_cursor
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid, _ in claimed:
                pipe.xpending_range(self.stream, self.group, eid, eid, 1)
            pendings = await pipe.execute()
        jobs: list[Job] = []
        for (eid, raw), pend in zip(claimed, pendings, strict=True):
            if not pend:  # acked in between by a slow previous owner
                continue
            if raw is None:  # entry deleted but still pending (older servers)
                await self._ack([eid])
                continue
            jobs.append(
                Job(
                    id=_s(eid), fields=_decode_fields(raw), attempts=int(pend[0]["times_delivered"])
                )
            )
            log.info(
                "queue_job_reclaimed",
                stream=self.stream,
                job_id=_s(eid),
                attempts=jobs[-1].attempts,
                consumer=consumer,
                previous_consumer=_s(pend[0]["consumer"]),
            )
        return jobs, next_cursor

    async def _heartbeat(
        self, consumer: str, inflight: Mapping[str, asyncio.Task[None]], done: asyncio.Event
    ) -> None:
        """Keep running jobs' idle time low so no other consumer reclaims them.

        XCLAIM with JUSTID resets the idle time without counting a delivery.
        If this process stalled for longer than claim_idle_ms and another
        consumer already reclaimed a job, this takes it back; both copies run
        to completion, which at-least-once delivery allows.
        """
        interval = max(self.claim_idle_ms / 3000, 0.01)
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await done.wait()
            ids = list(inflight)
            if done.is_set() or not ids:
                continue
            try:
                await self.redis.xclaim(self.stream, self.group, consumer, 0, ids, justid=True)
            except Exception as exc:
                log.warning("queue_heartbeat_failed", stream=self.stream, error=str(exc))

    async def _process(
        self, job: Job, handler: Callable[[Job], Awaitable[None]], job_timeout: float | None
    ) -> None:
        if job.attempts > self.max_attempts:
            # Delivered more often than allowed without an outcome: its consumers
            # died or hung while running it (a poison job that kills workers).
            await self._dead_letter(
                job,
                f"delivered {job.attempts} times without being acknowledged "
                "(consumer died or stalled while running it)",
                job.attempts - 1,
            )
            return
        try:
            if job_timeout is None:
                await handler(job)
            else:
                await asyncio.wait_for(handler(job), job_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            final = job.attempts >= self.max_attempts
            log.warning(
                "queue_job_failed",
                stream=self.stream,
                job_id=job.id,
                attempts=job.attempts,
                max_attempts=self.max_attempts,
                dead_letter=final,
                exc_info=exc,
            )
            if final:
                await self._dead_letter(job, _error_text(exc), job.attempts)
            return
        try:
            await self._ack([job.id])
        except Exception as exc:  # it will be reclaimed and run again: at-least-once
            log.warning("queue_ack_failed", stream=self.stream, job_id=job.id, error=str(exc))

    async def _ack(self, ids: Iterable[Any]) -> None:
        ids = list(ids)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *ids)
            if self.delete_acked:
                pipe.xdel(self.stream, *ids)
            await pipe.execute()

    async def dead_letter(self, job: Job, error: str) -> None:
        """Move a job to the dead-letter stream now (a handler that knows retrying
        cannot help, e.g. an entry it cannot parse); the handler then returns."""
        await self._dead_letter(job, error, job.attempts)

    async def _dead_letter(self, job: Job, error: str, attempts: int) -> None:
        fields: dict[str, FieldValue] = dict(job.fields)
        fields.update(error=error, attempts=attempts, original_id=job.id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_stream, fields)
                pipe.xack(self.stream, self.group, job.id)
                if self.delete_acked:
                    pipe.xdel(self.stream, job.id)
                await pipe.execute()
        except Exception as exc:  # still pending: the next claim retries the dead-lettering
            log.error("queue_dead_letter_failed", stream=self.stream, job_id=job.id, error=str(exc))
            return
        log.error(
            "queue_job_dead_lettered",
            stream=self.stream,
            dead_stream=self.dead_stream,
            job_id=job.id,
            attempts=attempts,
            error=error,
        )

    # ------------------------------------------------------------------ inspection

    async def depth(self) -> dict[str, int]:
        """``length`` (entries in the stream: with delete_acked, the backlog),
        ``pending`` (delivered, not acked), ``lag`` (never delivered; -1 when
        the server cannot tell) and ``dead`` (dead-letter stream length)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xlen(self.dead_stream)
            pipe.xinfo_groups(self.stream)
            length, dead, groups = await pipe.execute(raise_on_error=False)
        pending, lag = 0, 0
        if isinstance(length, Exception):
            raise length
        if isinstance(dead, Exception):
            raise dead
        if not isinstance(groups, Exception):  # no such key: nothing pending
            for g in groups:
                if _s(g.get("name")) == self.group:
                    pending = int(g.get("pending") or 0)
                    raw_lag = g.get("lag", -1)
                    lag = -1 if raw_lag is None else int(raw_lag)
        return {"length": int(length), "pending": pending, "lag": lag, "dead": int(dead)}

    async def dead_letters(self, count: int = 100) -> list[Job]:
        """The oldest dead letters (``attempts`` taken from the entry)."""
        entries = await self.redis.xrange(self.dead_stream, count=count)
        out: list[Job] = []
        for eid, raw in entries:
            fields = _decode_fields(raw)
            attempts = fields.get("attempts", "0")
            out.append(Job(id=_s(eid), fields=fields, attempts=int(attempts)))
        return out
