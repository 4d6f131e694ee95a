"""A per-process near cache for the home-timeline read path.

A home-timeline page hydrates 20 posts and needs the reader's following set;
asking Redis for each costs ~25 commands per page, most of the request's
CPU in a Python server. Hot posts and active readers repeat, so each process
keeps, for ``ttl`` seconds (default 2):

- hydrated posts (their serialized bytes with counts), at most
  ``max_posts``;
- readers' following sets, at most ``max_readers``;
- the newest entries of author timelines (what fan-out on read merges into
  every follower's home timeline: a celebrity's head is read by all their
  followers, so it is the hottest key of the pull path).

What stays exact: a change made through this process (delete, like,
follow...) drops the entry here at once and publishes it on
``sysdesign:feed:invalidate``; every process drops it when the message
arrives. A process that loses its subscription empties the cache when it
resubscribes. An invalidation also bumps a generation number, so a value read
from Redis before the invalidation is not cached after it.

What is approximate: counts (likes, replies, reposts) and following sets
seen by another process may be up to ``ttl`` old if its invalidation message
is late, never more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Any, Generic, TypeVar

from servers.storage.redis_conn import listen_for_invalidations, publish

CHANNEL = "sysdesign:feed:invalidate"
V = TypeVar("V")


class _Lru(Generic[V]):
    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.items: OrderedDict[int, tuple[float, V]] = OrderedDict()

    def get(self, k: int, now: float) -> V | None:
        hit = self.items.get(k)
        if hit is None:
            return None
        if now - hit[0] > self.ttl:
            del self.items[k]
            return None
        return hit[1]

    def put(self, k: int, v: V, now: float) -> None:
        self.items[k] = (now, v)
        self.items.move_to_end(k)
        if len(self.items) > self.max_entries:
            self.items.popitem(last=False)


class FeedNearCache:
    def __init__(self, redis: Any, *, ttl: float = 2.0, max_posts: int = 100_000,
                 max_readers: int = 50_000) -> None:
        self.redis = redis
        self.posts: _Lru[bytes] = _Lru(max_posts, ttl)
        self.following: _Lru[frozenset[int]] = _Lru(max_readers, ttl)
        self.heads: _Lru[tuple[list[bytes], bytes | None]] = _Lru(max_readers, ttl)
        self.generation = 0
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False

    # -- posts -------------------------------------------------------------------

    def get_posts(self, ids: list[int]) -> tuple[dict[int, bytes], list[int]]:
        """(hits, misses)."""
        now = time.monotonic()
        hits: dict[int, bytes] = {}
        misses: list[int] = []
        for i in ids:
            v = self.posts.get(i, now)
            if v is None:
                misses.append(i)
            else:
                hits[i] = v
        return hits, misses

    def put_posts(self, found: dict[int, bytes], generation: int) -> None:
        self._ensure_listener()
        if generation != self.generation:
            return
        now = time.monotonic()
        for i, v in found.items():
            self.posts.put(i, v, now)

    # -- following sets ---------------------------------------------------------------

    def get_following(self, user_id: int) -> frozenset[int] | None:
        return self.following.get(user_id, time.monotonic())

    def put_following(self, user_id: int, members: frozenset[int], generation: int) -> None:
        self._ensure_listener()
        if generation == self.generation:
            self.following.put(user_id, members, time.monotonic())

    # -- author timeline heads ----------------------------------------------------------

    def get_head(self, author: int) -> tuple[list[bytes], bytes | None] | None:
        return self.heads.get(author, time.monotonic())

    def put_head(self, author: int, head: tuple[list[bytes], bytes | None], generation: int) -> None:
        self._ensure_listener()
        if generation == self.generation:
            self.heads.put(author, head, time.monotonic())

    # -- invalidation ---------------------------------------------------------------

    def _drop(self, what: str) -> None:
        self.generation += 1
        kind, _, raw = what.partition(":")
        with contextlib.suppress(ValueError):
            if kind == "p":
                self.posts.items.pop(int(raw), None)
            elif kind == "f":
                self.following.items.pop(int(raw), None)
            elif kind == "a":
                self.heads.items.pop(int(raw), None)

    async def invalidate_post(self, post_id: int) -> None:
        self._drop(f"p:{post_id}")
        await publish(self.redis, CHANNEL, f"p:{post_id}")

    async def invalidate_following(self, user_id: int) -> None:
        self._drop(f"f:{user_id}")
        await publish(self.redis, CHANNEL, f"f:{user_id}")

    async def invalidate_author(self, author_id: int) -> None:
        self._drop(f"a:{author_id}")
        await publish(self.redis, CHANNEL, f"a:{author_id}")

    def _ensure_listener(self) -> None:
        if self._listener is None and not self._stopping:
            self._listener = asyncio.ensure_future(self._listen())

    async def _listen(self) -> None:
        await listen_for_invalidations(self.redis, CHANNEL, on_message=self._drop, on_reset=self._clear,
                                       stopping=lambda: self._stopping)

    def _clear(self) -> None:
        self.generation += 1
        self.posts.items.clear()
        self.following.items.clear()
        self.heads.items.clear()

    async def close(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
