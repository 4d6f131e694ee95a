"""The hot path of a redirect: a small in-process cache in front of Redis, and
clicks counted in batches.

A popular link is resolved thousands of times a second. Asking Redis each
time costs a round trip per click; instead each process keeps the links it
served recently (at most ``ttl`` seconds, ``max_entries`` links) and counts
their clicks locally, flushing the counts to Redis every ``flush_interval``
seconds in one pipeline: INCRBY on the total, PFADD of the visitors,
HINCRBY of the day, ZINCRBY of the referrers — the same keys the resolve
script writes.

What stays exact:

- links with a visit limit are never cached here: their limit is checked and
  their click counted atomically in Redis, every time;
- expiry is checked on every hit (the expiry time is cached with the link);
- a delete drops the link from this process at once and publishes the code
  on a Redis channel that every process listens to; a process that loses its
  subscription empties its cache when it resubscribes, and ``ttl`` bounds how
  long any missed message could matter.

What is approximate: ``visit_count`` of a cached hit is the count seen when
the link was cached plus this process's clicks since, and clicks of the last
``flush_interval`` are lost if the process is killed (a graceful stop flushes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import NoScriptError

from servers.storage.redis_conn import key, listen_for_invalidations, publish, queue_evalsha

log = structlog.get_logger("sysdesign.shortener.nearcache")

INVALIDATION_CHANNEL = "sysdesign:shortener:invalidate"

# KEYS: visits, uv, daily, refs (one link's, one hash tag).
# ARGV: count, ndays, (day, n)*ndays, nrefs, (referrer, n)*nrefs, visitor...
_ADD_CLICKS_LUA = """
redis.call('INCRBY', KEYS[1], ARGV[1])
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local nrefs = tonumber(ARGV[i])
i = i + 1
for _ = 1, nrefs do
  redis.call('ZINCRBY', KEYS[4], ARGV[i + 1], ARGV[i])
  i = i + 2
end
while i <= #ARGV do
  local last = math.min(i + 999, #ARGV)
  redis.call('PFADD', KEYS[2], unpack(ARGV, i, last))
  i = last + 1
end
return 1
"""
ADD_CLICKS_SHA = hashlib.sha1(_ADD_CLICKS_LUA.encode()).hexdigest()


@dataclass
class CachedLink:
    long_url: str
    redirect_type: int
    expire_ms: int
    visits: int  # as counted in Redis when cached, plus this process's clicks since
    cached_at: float


@dataclass
class _Clicks:
    count: int = 0
    visitors: set[str] = field(default_factory=set)
    days: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    referrers: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class NearCache:
    def __init__(self, redis: Any, *, ttl: float = 10.0, max_entries: int = 100_000,
                 flush_interval: float = 0.05) -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_entries = max_entries
        self.flush_interval = flush_interval
        self._links: OrderedDict[str, CachedLink] = OrderedDict()
        self._clicks: dict[str, _Clicks] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False
        self._flush_lock = asyncio.Lock()
        # Bumped by every invalidation: a link read from Redis before an
        # invalidation must not be cached after it.
        self.generation = 0
        self._add_sha = ADD_CLICKS_SHA

    # -- links -----------------------------------------------------------

    def get(self, code: str) -> CachedLink | None:
        link = self._links.get(code)
        if link is None:
            return None
        if time.monotonic() - link.cached_at > self.ttl:
            del self._links[code]
            return None
        return link

    def put(self, code: str, link: CachedLink, generation: int) -> None:
        self._ensure_listener()
        if generation != self.generation:
            return
        self._links[code] = link
        self._links.move_to_end(code)
        while len(self._links) > self.max_entries:
            self._links.popitem(last=False)

    def drop(self, code: str) -> None:
        self.generation += 1
        self._links.pop(code, None)
        self._clicks.pop(code, None)

    async def invalidate(self, code: str) -> None:
        """Drop a link here and in every other process."""
        self.drop(code)
        await publish(self.redis, INVALIDATION_CHANNEL, code)

    # -- clicks ----------------------------------------------------------

    def count(self, code: str, link: CachedLink, visitor: str, day: str, referrer: str) -> int:
        c = self._clicks.get(code)
        if c is None:
            c = self._clicks[code] = _Clicks()
        c.count += 1
        c.visitors.add(visitor)
        c.days[day] += 1
        c.referrers[referrer] += 1
        link.visits += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_soon())
        return link.visits

    async def _flush_soon(self) -> None:
        # Clicks counted while a flush is out land in the next buffer and find this
        # task still running, so it goes on until a flush leaves nothing behind
        # (backing off while Redis is away).
        delay = self.flush_interval
        while True:
            await asyncio.sleep(delay)
            ok = await self.flush()
            if not self._clicks:
                return
            delay = self.flush_interval if ok else min(max(delay * 2, 0.5), 5.0)

    async def flush(self) -> bool:
        """Write the buffered clicks to Redis: one script call per link, in one pipeline.
        False when some could not be written (they wait for the next flush)."""
        async with self._flush_lock:
            clicks, self._clicks = self._clicks, {}
            if not clicks:
                return True
            unwritten: dict[str, Exception | None] = dict.fromkeys(clicks)
            try:
                unwritten = dict(await self._send(clicks))
                if any(isinstance(r, NoScriptError) for r in unwritten.values()):  # Redis restarted
                    await self.redis.script_load(_ADD_CLICKS_LUA)
                    unwritten = dict(await self._send({code: clicks[code] for code in unwritten}))
                for error in unwritten.values():
                    raise error or RuntimeError("click flush failed")
            except Exception as exc:  # Redis away: keep what was not written for the next flush
                log.warning("click_flush_failed", error=repr(exc), codes=len(unwritten))
                self._requeue({code: clicks[code] for code in unwritten})
                return False
            return True

    async def _send(self, clicks: dict[str, _Clicks]) -> dict[str, Exception]:
        """Send, and return the links whose call failed (a script call is all or nothing)."""
        pipe = self.redis.pipeline(transaction=False)
        for code, c in clicks.items():
            tag = f"l:{code}"
            args: list[Any] = [c.count, len(c.days)]
            for day, n in c.days.items():
                args += (day, n)
            args.append(len(c.referrers))
            for ref, n in c.referrers.items():
                args += (ref, n)
            args += c.visitors
            # one call per link: its keys share a hash tag (Redis Cluster-safe)
            queue_evalsha(pipe, self._add_sha, 4, key(tag, "visits"), key(tag, "uv"),
                          key(tag, "daily"), key(tag, "refs"), *args)
        results = await pipe.execute(raise_on_error=False)
        return {code: r for code, r in zip(clicks, results, strict=True) if isinstance(r, Exception)}

    def _requeue(self, clicks: dict[str, _Clicks]) -> None:
        for code, c in clicks.items():
            mine = self._clicks.setdefault(code, _Clicks())
            mine.count += c.count
            mine.visitors |= c.visitors
            for day, n in c.days.items():
                mine.days[day] += n
            for ref, n in c.referrers.items():
                mine.referrers[ref] += n

    # -- invalidation across processes -------------------------------------

    def _ensure_listener(self) -> None:
        if self._listener is None and not self._stopping:
            self._listener = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        await listen_for_invalidations(self.redis, INVALIDATION_CHANNEL, on_message=self.drop, on_reset=self._clear,
                                       stopping=lambda: self._stopping)

    def _clear(self) -> None:
        self.generation += 1
        self._links.clear()

    async def close(self) -> None:
        self._stopping = True
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            await self.flush()
        if self._listener is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._listener, timeout=3)
