"""JobQueue and worker-id leases against the real Valkey from the ``valkey_url`` fixture."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from servers.platform.ids import (
    LEASABLE_WORKER_IDS,
    TOOL_WORKER_ID,
    WorkerIdsExhausted,
    lease_worker_id,
)
from servers.storage.queue import Job, JobQueue
from servers.storage.redis_conn import connect, key

pytestmark = pytest.mark.redis_cluster


@pytest.fixture
async def r(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(valkey_url)
    yield client
    await client.aclose()


def stream_name() -> str:
    return key(f"q:test:{uuid.uuid4().hex[:12]}")


async def wait_for(cond: Callable[[], Awaitable[bool] | bool], deadline_s: float = 30.0) -> None:
    """Poll until cond() is true (a deadline against hangs, not a timing assertion)."""
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


async def stop_and_join(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


# --------------------------------------------------------------------------- queue


async def test_enqueue_consume_ack(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers")
    await q.ensure_group()
    await q.ensure_group()  # idempotent (BUSYGROUP ignored)
    ids = [await q.enqueue({"n": i, "name": f"job-{i}", "blob": b"\xff\x00"}) for i in range(5)]
    assert len(set(ids)) == 5

    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)

    stop = asyncio.Event()
    task = asyncio.create_task(q.run("c1", handler, stop=stop, block_ms=50))
    await wait_for(lambda: len(seen) == 5)
    await wait_for(lambda: _depth_is(q, length=0, pending=0))
    await stop_and_join(stop, task)

    assert [j.id for j in seen] == ids
    assert [j.fields["n"] for j in seen] == ["0", "1", "2", "3", "4"]
    assert seen[0].fields["name"] == "job-0"
    assert seen[0].fields["blob"] == b"\xff\x00"  # not UTF-8: stays bytes
    assert all(j.attempts == 1 for j in seen)
    assert await q.depth() == {"length": 0, "pending": 0, "lag": 0, "dead": 0}


async def _depth_is(q: JobQueue, **want: int) -> bool:
    d = await q.depth()
    return all(d[k] == v for k, v in want.items())


async def test_enqueue_rejects_reserved_and_empty(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "g")
    with pytest.raises(ValueError):
        await q.enqueue({})
    with pytest.raises(ValueError):
        await q.enqueue({"error": "x"})
    assert (await q.depth())["length"] == 0


async def test_failing_job_is_retried_then_dead_lettered(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers", max_attempts=3, claim_idle_ms=100)
    bad = await q.enqueue({"kind": "poison"})
    good = await q.enqueue({"kind": "fine"})
    attempts: Counter[str] = Counter()
    seen_attempts: list[int] = []

    async def handler(job: Job) -> None:
        attempts[job.id] += 1
        if job.fields["kind"] == "poison":
            seen_attempts.append(job.attempts)
            raise RuntimeError(f"boom #{job.attempts}")

    stop = asyncio.Event()
    task = asyncio.create_task(q.run("c1", handler, stop=stop, block_ms=50))
    await wait_for(lambda: _depth_is(q, dead=1, pending=0, length=0))
    await stop_and_join(stop, task)

    assert attempts[good] == 1
    assert attempts[bad] == 3
    assert seen_attempts == [1, 2, 3]
    [dead] = await q.dead_letters()
    assert dead.fields["kind"] == "poison"
    assert dead.fields["original_id"] == bad
    assert dead.fields["attempts"] == "3"
    assert dead.fields["error"] == "RuntimeError: boom #3"
    assert dead.attempts == 3
    raw: Any = await r.xrange(q.dead_stream)
    assert raw[0][1][b"error"] == b"RuntimeError: boom #3"


async def test_job_of_dead_consumer_is_reclaimed(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers", claim_idle_ms=200)
    await q.ensure_group()
    jid = await q.enqueue({"task": "resize"})
    # Consumer A takes the job and dies without acking.
    got: Any = await r.xreadgroup("workers", "A", {q.stream: ">"}, count=1)
    assert got[0][1][0][0].decode() == jid
    assert (await q.depth())["pending"] == 1

    seen: list[Job] = []

    async def handler(job: Job) -> None:
        seen.append(job)

    stop = asyncio.Event()
    task = asyncio.create_task(q.run("B", handler, stop=stop, block_ms=50))
    await wait_for(lambda: len(seen) == 1)
    await wait_for(lambda: _depth_is(q, pending=0, length=0))
    await stop_and_join(stop, task)
    assert seen[0].id == jid
    assert seen[0].fields == {"task": "resize"}
    assert seen[0].attempts == 2  # A's delivery + B's


async def test_job_redelivered_too_often_is_dead_lettered_without_running(
    r: aioredis.Redis,
) -> None:
    """A job whose consumers keep dying while running it (delivery count > max_attempts)."""
    q = JobQueue(r, stream_name(), "workers", max_attempts=2, claim_idle_ms=100)
    await q.ensure_group()
    jid = await q.enqueue({"task": "kills-workers"})
    await r.xreadgroup("workers", "A", {q.stream: ">"}, count=1)
    await asyncio.sleep(0.15)
    await r.xautoclaim(q.stream, "workers", "B", 100, "0-0")  # delivery 2; B dies too
    ran: list[Job] = []

    async def handler(job: Job) -> None:
        ran.append(job)

    stop = asyncio.Event()
    task = asyncio.create_task(q.run("C", handler, stop=stop, block_ms=50))
    await wait_for(lambda: _depth_is(q, dead=1, pending=0, length=0))
    await stop_and_join(stop, task)
    assert ran == []
    [dead] = await q.dead_letters()
    assert dead.fields["original_id"] == jid
    assert dead.fields["attempts"] == "2"
    assert "without being acknowledged" in str(dead.fields["error"])


async def test_long_job_is_not_stolen_from_a_live_consumer(r: aioredis.Redis) -> None:
    # A claim window wide enough that a loaded 2-core machine (a JVM and two
    # test workers beside it) never stalls the heartbeat past it: at 300 ms a
    # 200 ms stall of the event loop let B steal a job A was still running.
    q = JobQueue(r, stream_name(), "workers", claim_idle_ms=1500)
    await q.enqueue({"task": "transcode"})
    runs: list[tuple[str, int]] = []
    release = asyncio.Event()

    def handler_for(name: str) -> Callable[[Job], Awaitable[None]]:
        async def handler(job: Job) -> None:
            runs.append((name, job.attempts))
            await release.wait()

        return handler

    stop = asyncio.Event()
    a = asyncio.create_task(q.run("A", handler_for("A"), stop=stop, block_ms=50))
    await wait_for(lambda: len(runs) == 1)
    b = asyncio.create_task(q.run("B", handler_for("B"), stop=stop, block_ms=50))
    await asyncio.sleep(5.0)  # several claim_idle_ms periods while A works
    release.set()
    await wait_for(lambda: _depth_is(q, pending=0, length=0))
    await stop_and_join(stop, a, b)
    assert runs == [("A", 1)]


async def test_cancelled_consumer_leaves_its_job_for_another(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers", claim_idle_ms=200)
    jid = await q.enqueue({"task": "slow"})
    started = asyncio.Event()

    async def hang(job: Job) -> None:
        started.set()
        await asyncio.Event().wait()

    stop = asyncio.Event()
    a = asyncio.create_task(q.run("A", hang, stop=stop, block_ms=50))
    await asyncio.wait_for(started.wait(), 30)
    a.cancel()
    await asyncio.wait([a], timeout=30)
    assert a.cancelled()
    assert (await q.depth())["pending"] == 1  # not acked, not lost

    seen: list[Job] = []

    async def ok(job: Job) -> None:
        seen.append(job)

    b = asyncio.create_task(q.run("B", ok, stop=stop, block_ms=50))
    await wait_for(lambda: _depth_is(q, pending=0, length=0))
    await stop_and_join(stop, b)
    assert [(j.id, j.attempts) for j in seen] == [(jid, 2)]


async def test_concurrent_consumers_process_each_job_once(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers")
    n = 300
    ids = [await q.enqueue({"i": i}) for i in range(n)]
    counts: Counter[str] = Counter()
    by_consumer: Counter[str] = Counter()

    def handler_for(name: str) -> Callable[[Job], Awaitable[None]]:
        async def handler(job: Job) -> None:
            await asyncio.sleep(0.001)
            counts[job.id] += 1
            by_consumer[name] += 1

        return handler

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            q.run(f"c{k}", handler_for(f"c{k}"), stop=stop, block_ms=50, concurrency=4, batch=8)
        )
        for k in range(4)
    ]
    await wait_for(lambda: sum(counts.values()) >= n)
    await wait_for(lambda: _depth_is(q, length=0, pending=0))
    await stop_and_join(stop, *tasks)
    assert set(counts) == set(ids)
    assert all(c == 1 for c in counts.values())
    assert len(by_consumer) > 1  # the work was shared


async def test_depth_numbers(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers", max_attempts=1)
    assert await q.depth() == {"length": 0, "pending": 0, "lag": 0, "dead": 0}  # no stream yet
    await q.ensure_group()
    for i in range(5):
        await q.enqueue({"i": i})
    assert await q.depth() == {"length": 5, "pending": 0, "lag": 5, "dead": 0}
    await r.xreadgroup("workers", "A", {q.stream: ">"}, count=2)  # in flight at A
    assert await q.depth() == {"length": 5, "pending": 2, "lag": 3, "dead": 0}

    async def handler(job: Job) -> None:
        if job.fields["i"] == "4":
            raise ValueError("bad input")

    stop = asyncio.Event()
    task = asyncio.create_task(q.run("B", handler, stop=stop, block_ms=50))
    await wait_for(lambda: _depth_is(q, length=2, dead=1))
    await stop_and_join(stop, task)
    assert await q.depth() == {"length": 2, "pending": 2, "lag": 0, "dead": 1}


async def test_maxlen_trims_the_stream(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers", maxlen=10)
    for i in range(1000):
        await q.enqueue({"i": i})
    length = (await q.depth())["length"]
    assert 10 <= length < 1000  # approximate trimming


async def test_run_stops_promptly_with_nothing_to_do(r: aioredis.Redis) -> None:
    q = JobQueue(r, stream_name(), "workers")
    stop = asyncio.Event()

    async def handler(job: Job) -> None:  # pragma: no cover - never called
        raise AssertionError

    task = asyncio.create_task(q.run("c", handler, stop=stop, block_ms=100))
    await asyncio.sleep(0.3)
    await stop_and_join(stop, task)
    assert task.done() and task.exception() is None


# --------------------------------------------------------------------------- worker-id lease


def lease_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def test_two_leases_get_distinct_ids_and_release_frees(r: aioredis.Redis) -> None:
    prefix = lease_prefix()
    a = await lease_worker_id(r, prefix=prefix, ttl_seconds=30)
    b = await lease_worker_id(r, prefix=prefix, ttl_seconds=30)
    assert a.worker_id != b.worker_id
    assert 0 <= a.worker_id < LEASABLE_WORKER_IDS and 0 <= b.worker_id < LEASABLE_WORKER_IDS
    assert TOOL_WORKER_ID not in (a.worker_id, b.worker_id)
    assert await r.get(a.key) == a.token.encode()
    assert 0 < await r.ttl(a.key) <= 30

    assert await a.refresh() is True
    assert await a.release() is True
    assert await r.exists(a.key) == 0
    assert await b.refresh() is True
    await b.release()


async def test_released_id_can_be_leased_again(r: aioredis.Redis) -> None:
    prefix = lease_prefix()
    # Take all ids but one, so the next lease must get exactly that one.
    async with r.pipeline(transaction=False) as pipe:
        for n in range(LEASABLE_WORKER_IDS):
            if n != 17:
                pipe.set(f"{prefix}:worker:{n}", "other", ex=30)
        await pipe.execute()
    lease = await lease_worker_id(r, prefix=prefix)
    assert lease.worker_id == 17
    with pytest.raises(WorkerIdsExhausted):
        await lease_worker_id(r, prefix=prefix)
    await lease.release()
    again = await lease_worker_id(r, prefix=prefix)
    assert again.worker_id == 17
    await again.release()


async def test_refresh_of_stolen_lease_reports_loss(r: aioredis.Redis) -> None:
    prefix = lease_prefix()
    lease = await lease_worker_id(r, prefix=prefix, ttl_seconds=30)
    await r.set(lease.key, "someone-else", ex=30)  # expired and re-leased elsewhere
    assert await lease.refresh() is False
    assert lease.lost.is_set()
    assert await lease.release() is False
    assert await r.get(lease.key) == b"someone-else"  # the other owner's key survives


async def test_refresh_loop_keeps_lease_and_reports_loss(r: aioredis.Redis) -> None:
    prefix = lease_prefix()
    lease = await lease_worker_id(r, prefix=prefix, ttl_seconds=3)  # refresh every 1 s
    lost: list[int] = []
    lease.start_refreshing(on_lost=lambda lz: lost.append(lz.worker_id))
    lowest = [await r.pttl(lease.key)]

    async def refreshed() -> bool:  # the TTL only goes up when a refresh extends it
        ttl = await r.pttl(lease.key)
        lowest[0] = min(lowest[0], ttl)
        return ttl > lowest[0] + 100

    await wait_for(refreshed)
    await r.set(lease.key, "thief")
    await asyncio.wait_for(lease.lost.wait(), 10)
    assert lost == [lease.worker_id]
    await lease.release()
    assert await r.get(lease.key) == b"thief"


async def test_lease_context_manager_releases(r: aioredis.Redis) -> None:
    prefix = lease_prefix()
    async with await lease_worker_id(r, prefix=prefix) as lease:
        assert await r.exists(lease.key) == 1
    assert await r.exists(lease.key) == 0
