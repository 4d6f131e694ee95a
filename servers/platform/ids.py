"""Identifiers: Snowflake ids, Base62, unguessable short codes, leased worker ids.

Snowflake ids
    64-bit, always positive (the sign bit is 0)::

        | 0 | 41 bits: ms since 2024-01-01T00:00:00Z | 10 bits: worker | 12 bits: sequence |

    Time-ordered (k-sorted across workers, strictly increasing per generator),
    so they work as clustering keys, as page tokens and as partition buckets
    (``bucket_of``). The 41-bit timestamp lasts until 2093. Every public
    helper speaks Unix milliseconds; the custom epoch is an internal detail.

    Uniqueness across processes rests on the worker id: each process leases
    one from Redis (``lease_worker_id``) or is given one
    (``SYSDESIGN_WORKER_ID``). Within a process, ``Snowflake.next_id`` never
    returns a smaller or equal id, even when the wall clock steps backwards.

Base62
    ``0-9A-Za-z``, so that code order equals number order for equal widths.

CodePermutation
    A keyed bijection on ``[0, 62**width)``: feed it consecutive counter values
    and it hands out short codes that look random, never collide and cannot be
    enumerated without the key (format-preserving encryption: a balanced
    Feistel network with a keyed BLAKE2b round function, cycle-walked into the
    domain).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog

log = structlog.get_logger()

# --------------------------------------------------------------------------- Snowflake

EPOCH_MS = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000)  # 1704067200000

TIMESTAMP_BITS = 41
WORKER_BITS = 10
SEQUENCE_BITS = 12

MAX_WORKER_ID = (1 << WORKER_BITS) - 1  # 1023
WORKER_IDS = 1 << WORKER_BITS  # 1024
# The last worker id is kept for tools that mint ids outside a server (the
# `sysdesign token` command registering a user); servers lease the others.
TOOL_WORKER_ID = WORKER_IDS - 1
LEASABLE_WORKER_IDS = WORKER_IDS - 1
MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1  # 4095
MAX_TIMESTAMP = (1 << TIMESTAMP_BITS) - 1  # offset from EPOCH_MS, in ms
MAX_ID = (1 << (TIMESTAMP_BITS + WORKER_BITS + SEQUENCE_BITS)) - 1  # 2**63 - 1

_WORKER_SHIFT = SEQUENCE_BITS
_TIMESTAMP_SHIFT = SEQUENCE_BITS + WORKER_BITS


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Snowflake:
    """A thread-safe generator of Snowflake ids for one worker id.

    ``clock`` returns Unix milliseconds; it is injectable for tests.

    - Up to 4096 ids per millisecond; the 4097th waits for the clock to tick.
    - If the clock steps backwards, ids keep coming from the last timestamp
      seen (sequence keeps counting); if that sequence runs out while the clock
      is still behind, the generator borrows the next millisecond rather than
      stalling until the clock catches up. Either way an id is never smaller
      than or equal to one already issued.
    """

    def __init__(self, worker_id: int, *, clock: Callable[[], int] = _now_ms) -> None:
        if not 0 <= worker_id <= MAX_WORKER_ID:
            raise ValueError(f"worker_id must be in [0, {MAX_WORKER_ID}], got {worker_id}")
        self.worker_id = worker_id
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1  # offset from EPOCH_MS of the last id issued
        self._seq = 0

    def _offset_now(self) -> int:
        offset = self._clock() - EPOCH_MS
        if offset < 0:
            raise RuntimeError("system clock is before the Snowflake epoch (2024-01-01)")
        return offset

    def next_id(self) -> int:
        with self._lock:
            now = self._offset_now()
            if now > self._last_ms:
                self._last_ms = now
                self._seq = 0
            else:
                # Same millisecond, or the clock went backwards: keep issuing
                # from the last timestamp.
                self._seq += 1
                if self._seq > MAX_SEQUENCE:
                    while now == self._last_ms:  # wait for the next millisecond
                        time.sleep(0)
                        now = self._offset_now()
                    # Ticked forward: use it. Behind (clock stepped back): borrow.
                    self._last_ms = now if now > self._last_ms else self._last_ms + 1
                    self._seq = 0
            if self._last_ms > MAX_TIMESTAMP:
                raise RuntimeError("Snowflake timestamp overflow (past year 2093)")
            return (
                (self._last_ms << _TIMESTAMP_SHIFT) | (self.worker_id << _WORKER_SHIFT) | self._seq
            )


def _check_id(id_: int) -> None:
    if not 0 <= id_ <= MAX_ID:
        raise ValueError(f"not a Snowflake id: {id_}")


def id_timestamp_ms(id_: int) -> int:
    """Unix milliseconds at which the id was issued."""
    _check_id(id_)
    return (id_ >> _TIMESTAMP_SHIFT) + EPOCH_MS


def id_worker(id_: int) -> int:
    """The worker id that issued the id."""
    _check_id(id_)
    return (id_ >> _WORKER_SHIFT) & MAX_WORKER_ID


def id_sequence(id_: int) -> int:
    """The per-millisecond sequence number of the id."""
    _check_id(id_)
    return id_ & MAX_SEQUENCE


def id_for_time(ms: int) -> int:
    """The smallest id that any worker can issue at Unix millisecond ``ms``.

    A range bound: ids issued in ``[t0, t1)`` are exactly those with
    ``id_for_time(t0) <= id < id_for_time(t1)``. Times before the epoch
    clamp to 0.
    """
    offset = ms - EPOCH_MS
    if offset < 0:
        return 0
    if offset > MAX_TIMESTAMP:
        raise ValueError(f"time {ms} is past the Snowflake range")
    return offset << _TIMESTAMP_SHIFT


def bucket_of(id_: int, bucket_ms: int) -> int:
    """The time bucket of an id: ``unix_ms // bucket_ms``.

    Buckets are aligned on the Unix epoch, so with ``bucket_ms=86_400_000``
    a bucket is one UTC day. Used to split large partitions, e.g. messages
    by ``(conversation_id, bucket)``.
    """
    if bucket_ms <= 0:
        raise ValueError("bucket_ms must be positive")
    return id_timestamp_ms(id_) // bucket_ms


def bucket_bounds(bucket: int, bucket_ms: int) -> tuple[int, int]:
    """The id range ``[lo, hi)`` of a bucket (``hi`` may exceed ``MAX_ID`` by one)."""
    if bucket_ms <= 0:
        raise ValueError("bucket_ms must be positive")
    start = bucket * bucket_ms
    end = start + bucket_ms
    lo = id_for_time(start)
    hi = MAX_ID + 1 if end - EPOCH_MS > MAX_TIMESTAMP else id_for_time(end)
    return lo, hi


# --------------------------------------------------------------------------- Base62

B62_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_INDEX = {c: i for i, c in enumerate(B62_ALPHABET)}


def b62encode(n: int, width: int | None = None) -> str:
    """Base62 of a non-negative int, left-padded with '0' to ``width``.

    A number that needs more than ``width`` digits is not truncated.
    """
    if n < 0:
        raise ValueError("b62encode needs a non-negative integer")
    digits: list[str] = []
    while True:
        n, r = divmod(n, 62)
        digits.append(B62_ALPHABET[r])
        if n == 0:
            break
    s = "".join(reversed(digits))
    if width is not None and len(s) < width:
        s = "0" * (width - len(s)) + s
    return s


def b62decode(s: str) -> int:
    """The int of a Base62 string; ValueError on an empty string or a bad character."""
    if not s:
        raise ValueError("empty Base62 string")
    n = 0
    for c in s:
        d = _B62_INDEX.get(c)
        if d is None:
            raise ValueError(f"invalid Base62 character {c!r} in {s!r}")
        n = n * 62 + d
    return n


def is_base62(s: str) -> bool:
    """True for a non-empty string of Base62 characters only."""
    return bool(s) and all(c in _B62_INDEX for c in s)


# --------------------------------------------------------------------------- CodePermutation


class CodePermutation:
    """A keyed bijection on ``[0, 62**width)`` (format-preserving encryption).

    A balanced Feistel network over the smallest even number of bits that
    covers the domain, with BLAKE2b keyed by ``key`` (personalised by the
    width and the round number) as the round function; values that land
    outside the domain are encrypted again (cycle-walking) until they fall
    inside, which keeps it a bijection on exactly the domain. With at least
    four rounds of a pseudo-random function this is a strong pseudo-random
    permutation (Luby-Rackoff): outputs of consecutive inputs look unrelated,
    and without the key the next code cannot be predicted.

    ``encode(counter)`` gives the code number (``b62encode(..., width)`` makes
    it a string); ``decode`` inverts it.
    """

    def __init__(self, key: bytes, width: int = 7, *, rounds: int = 4) -> None:
        if not key:
            raise ValueError("CodePermutation needs a non-empty key")
        if width < 1:
            raise ValueError("width must be at least 1")
        if rounds < 4:
            raise ValueError("use at least 4 Feistel rounds")
        if len(key) > 64:  # BLAKE2b keys are at most 64 bytes
            key = hashlib.blake2b(key, digest_size=64).digest()
        self.width = width
        self.size = 62**width
        bits = (self.size - 1).bit_length()
        bits += bits & 1
        self._half = max(bits // 2, 1)
        self._mask = (1 << self._half) - 1
        self._half_bytes = (self._half + 7) // 8
        # One keyed hasher per round; .copy() skips the key setup on each call.
        self._rounds = [
            hashlib.blake2b(key=key, digest_size=8, person=f"sd-cp-w{width}-r{i}".encode()[:16])
            for i in range(rounds)
        ]

    def _f(self, i: int, x: int) -> int:
        h = self._rounds[i].copy()
        h.update(x.to_bytes(self._half_bytes, "big"))
        return int.from_bytes(h.digest(), "big") & self._mask

    def _forward(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for i in range(len(self._rounds)):
            left, right = right, left ^ self._f(i, right)
        return (left << self._half) | right

    def _backward(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for i in reversed(range(len(self._rounds))):
            left, right = right ^ self._f(i, left), left
        return (left << self._half) | right

    def _check(self, n: int) -> None:
        if not 0 <= n < self.size:
            raise ValueError(f"{n} is outside [0, 62**{self.width})")

    def encode(self, n: int) -> int:
        self._check(n)
        x = self._forward(n)
        while x >= self.size:
            x = self._forward(x)
        return x

    def decode(self, m: int) -> int:
        self._check(m)
        x = self._backward(m)
        while x >= self.size:
            x = self._backward(x)
        return x


# --------------------------------------------------------------------------- worker-id lease

# Extend the TTL only if the key still holds our token.
_REFRESH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Delete only if the key still holds our token.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class WorkerIdsExhausted(RuntimeError):
    """All 1024 worker ids are leased."""


class WorkerLease:
    """A worker id held in Redis as ``<prefix>:worker:<n>`` = random token, with a TTL.

    Keep it alive with ``start_refreshing()`` (or ``async with lease:``). If a
    refresh finds the key gone or holding someone else's token (the process
    stalled past the TTL and another one took the id) the lease is lost:
    ``lost`` is set and ``on_lost`` is called. A process that lost its lease
    must stop issuing ids with that worker id.
    """

    def __init__(self, redis: Any, worker_id: int, key: str, token: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.key = key
        self.token = token
        self.ttl_seconds = ttl_seconds
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        return f"WorkerLease(worker_id={self.worker_id}, key={self.key!r})"

    async def refresh(self) -> bool:
        """Extend the TTL if the id is still ours. False (and ``lost`` set) if it is not."""
        ok = await self.redis.eval(_REFRESH_LUA, 1, self.key, self.token, self.ttl_seconds * 1000)
        if not ok:
            self.lost.set()
            return False
        return True

    async def release(self) -> bool:
        """Stop refreshing and give the id back, only if it is still ours."""
        await self.stop_refreshing()
        deleted = await self.redis.eval(_RELEASE_LUA, 1, self.key, self.token)
        return bool(deleted)

    async def refresh_forever(
        self, on_lost: Callable[[WorkerLease], Awaitable[None] | None] | None = None
    ) -> None:
        """Refresh every ttl/3 until cancelled or the lease is lost.

        A Redis error is logged and retried at the next tick: the key survives
        two missed refreshes.
        """
        interval = self.ttl_seconds / 3
        while not self._stopping:
            await asyncio.sleep(interval)
            if self._stopping:
                return
            ok: bool | None = None
            try:
                ok = await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("worker_lease_refresh_failed", worker_id=self.worker_id, error=str(exc))
            task = asyncio.current_task()
            if self._stopping or (task is not None and task.cancelling()):
                # Python 3.11's wait_for (inside redis-py) can swallow a cancel
                # that lands as the call completes: stop anyway.
                return
            if ok is False:
                log.error("worker_lease_lost", worker_id=self.worker_id, key=self.key)
                if on_lost is not None:
                    result = on_lost(self)
                    if asyncio.iscoroutine(result):
                        await result
                return

    def start_refreshing(
        self, on_lost: Callable[[WorkerLease], Awaitable[None] | None] | None = None
    ) -> asyncio.Task[None]:
        """Run ``refresh_forever`` as a task (idempotent); ``release()`` stops it."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(
                self.refresh_forever(on_lost), name=f"worker-lease-{self.worker_id}"
            )
        return self._task

    async def stop_refreshing(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> WorkerLease:
        self.start_refreshing()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def lease_worker_id(
    redis: Any, *, prefix: str = "sysdesign", ttl_seconds: int = 60
) -> WorkerLease:
    """Claim a free worker id in [0, 1023) with ``SET <prefix>:worker:<n> <token> NX EX ttl``.

    Id 1023 (``TOOL_WORKER_ID``) is never leased: it is kept for CLI tools.

    Probing starts at a random id so that processes starting together do not
    race for the same keys. Each key is on its own (no multi-key command), so
    this works on Redis Cluster as is.
    """
    if ttl_seconds < 3:
        raise ValueError("ttl_seconds must be at least 3")
    token = secrets.token_hex(16)
    start = random.randrange(LEASABLE_WORKER_IDS)
    for i in range(LEASABLE_WORKER_IDS):
        n = (start + i) % LEASABLE_WORKER_IDS
        key = f"{prefix}:worker:{n}"
        if await redis.set(key, token, nx=True, ex=ttl_seconds):
            log.info("worker_id_leased", worker_id=n, key=key, ttl_seconds=ttl_seconds)
            return WorkerLease(redis, n, key, token, ttl_seconds)
    raise WorkerIdsExhausted(
        f"all {LEASABLE_WORKER_IDS} worker ids under {prefix}:worker:* are leased; "
        "stop some processes or set SYSDESIGN_WORKER_ID"
    )
