"""The feed's read side and its fan-out: the hybrid the case study describes.

**Fan-out on write** (authors below the celebrity threshold). CreatePost
appends ``{post_id, author_id}`` to the Redis stream ``{q:fanout}``; the
``fanout`` worker (a JobQueue consumer group: at-least-once, reclaimed when a
worker dies) walks the author's followers a page at a time
(``SYSDESIGN_FEED_FANOUT_PAGE_SIZE``, default 1,000) and for each page writes
the home-timeline rows to the table port (concurrently, so the SQLite
adapter commits them as a group), then pushes the pointer into each
follower's Redis sorted set with one pipelined script per follower (ZADD,
trim to 800). After each page the job records the page token under
``{q:fanout}:at:<post_id>``: a job reclaimed from a killed worker resumes at
the first page not yet done. Redoing a page is harmless: a table put of the
same row and a ZADD of the same member change nothing.

**The outbox.** Before the job is queued, CreatePost writes the post to
``feed_fanout_pending`` (table port); the job deletes that row when the
fan-out is done. The worker sweeps the outbox's recent hourly partitions
every ``SYSDESIGN_FEED_OUTBOX_SWEEP_S`` and queues again any post still there
after ``SYSDESIGN_FEED_OUTBOX_MIN_AGE_S`` (at most once per sweep interval
per post), so a job Redis lost (FLUSHALL, a replica lost without its AOF)
still reaches every follower; a job that was merely slow runs twice, which
the idempotent fan-out absorbs.

**Fan-out on read** (celebrities). GetHomeTimeline reads, in one pipelined
round trip, the reader's pushed timeline and the set of users the reader
follows; intersects that with the celebrity set; reads those authors'
timelines in a second round trip; merges everything newest first, drops
posts by users the reader no longer follows, hydrates the ids
(:meth:`PostCore.hydrate`), drops deleted posts, and repeats if filtering
left the page short.

**Cursor.** The page token is the id of the last post returned: the next
page is "older than that", so posts arriving meanwhile (newer ids) never
shift it. Opaque to clients (base64 of ``<kind>:<id>``).

**Follow / unfollow.** Follow copies the followee's newest posts
(``SYSDESIGN_FEED_BACKFILL``, default 100) into the follower's home
timeline; unfollow removes the followee's cached posts from it. Either way
the read-time filter is what makes it correct, so a backfill or removal
racing a fan-out or a rebuild cannot show a post from someone you do not
follow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from typing import Any

from servers.feed.graph import GraphCore
from servers.feed.nearcache import FeedNearCache
from servers.feed.posts import PostCore
from servers.feed.settings import FeedSettings
from servers.feed.tables import FANOUT_PENDING, FANOUT_PENDING_BUCKET_MS, FOLLOWERS, POSTS
from servers.feed.timelines import AUTHOR, HOME, Entry, TimelineKind, Timelines
from servers.platform.errors import InvalidArgument, Violations
from servers.platform.ids import bucket_of, id_for_time
from servers.storage.queue import JobQueue
from servers.storage.redis_conn import key
from servers.storage.table import InvalidPageToken

FANOUT_STREAM = key("q:fanout")
FANOUT_GROUP = "fanout"
PROGRESS_TTL_SECONDS = 7 * 86_400

try:
    from prometheus_client import Counter

    FANOUT_ENTRIES = Counter("sysdesign_feed_fanout_entries_total",
                             "Home-timeline entries written by the fan-out worker")
except ValueError:  # registered twice (module reloaded in one process)
    FANOUT_ENTRIES = None  # type: ignore[assignment]


def fanout_queue(redis: Any) -> JobQueue:
    return JobQueue(redis, FANOUT_STREAM, FANOUT_GROUP, max_attempts=10,
                    claim_idle_ms=FeedSettings().fanout_claim_idle_ms)


def progress_key(post_id: int) -> str:
    return key("q:fanout", "at", post_id)


def encode_token(kind: str, post_id: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{post_id}".encode()).decode().rstrip("=")


def decode_token(kind: str, token: str) -> int | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        k, _, n = raw.partition(":")
        if k != kind or not n.isdigit() or not 0 < int(n) < 1 << 63:
            raise ValueError
        return int(n)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidArgument([("page_token", "is not a token from a previous page of this timeline")]) from exc


def check_page_size(page_size: int, v: Violations, default: int = 20, maximum: int = 100) -> int:
    if page_size < 0 or page_size > maximum:
        v.add("page_size", f"must be 0-{maximum} (0 means the default of {default})")
    return page_size or default


class FeedCore:
    """Graph, posts and timelines of one process (shared by servicers and the worker)."""

    @classmethod
    def for_runtime(cls, rt: Any) -> FeedCore:
        return rt.singleton("feed.core", lambda: cls(rt))  # type: ignore[no-any-return]

    def __init__(self, rt: Any, settings: FeedSettings | None = None) -> None:
        self.rt = rt
        self.redis = rt.redis
        self.tables = rt.tables
        self.settings = settings or FeedSettings()
        self.near = FeedNearCache(rt.redis, ttl=self.settings.near_cache_ms / 1000)
        rt.closers.append(self.near.close)
        self.timelines = Timelines(rt.redis, rt.tables, self.settings.timeline_cache_size,
                                   self.near)
        self.graph = GraphCore(rt.redis, rt.tables, self.settings, self.near)
        self.queue = fanout_queue(rt.redis)
        self.posts = PostCore(rt, self.timelines, self.graph, self._enqueue, self.near)

    async def _enqueue(self, post_id: int, author_id: int) -> None:
        """Outbox row first (the durable record), then the job."""
        await self.tables.put(FANOUT_PENDING, {
            "bucket": bucket_of(post_id, FANOUT_PENDING_BUCKET_MS), "post_id": post_id,
            "author_id": author_id})
        await self.queue.enqueue({"post_id": post_id, "author_id": author_id})

    async def _done(self, post_id: int) -> None:
        await self.tables.delete(FANOUT_PENDING, {
            "bucket": bucket_of(post_id, FANOUT_PENDING_BUCKET_MS), "post_id": post_id})

    async def sweep_outbox(self, now_ms: int | None = None) -> int:
        """Queue again every fan-out still in the outbox after the minimum age; returns how many.

        Reads the partitions of the last ``outbox_window_h`` hours. A post is
        queued again at most once per sweep interval (a Redis marker), so a
        long backlog is not multiplied by every sweep.
        """
        st = self.settings
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        older_than = id_for_time(now_ms - st.outbox_min_age_s * 1000)
        newest = bucket_of(max(older_than - 1, 0), FANOUT_PENDING_BUCKET_MS)
        requeued = 0
        for bucket in range(newest, newest - st.outbox_window_h - 1, -1):
            token = ""
            while True:
                page = await self.tables.slice(FANOUT_PENDING, {"bucket": bucket}, limit=500,
                                               page_token=token)
                for row in page.rows:
                    if row["post_id"] >= older_than:
                        continue
                    marker = key("q:fanout", "requeued", row["post_id"])
                    if await self.redis.set(marker, 1, nx=True, ex=st.outbox_sweep_s):
                        await self.queue.enqueue({"post_id": row["post_id"],
                                                  "author_id": row["author_id"]})
                        requeued += 1
                token = page.next_page_token
                if not token:
                    break
        return requeued

    # -- graph with timeline side effects -------------------------------------------

    async def follow(self, follower: int, followee: int) -> bool:
        changed, _ = await self.graph.follow(follower, followee)
        if changed and self.settings.backfill and not await self.graph.is_celebrity(followee):
            [recent] = await self.timelines.pages([(AUTHOR, followee)], None,
                                                  self.settings.backfill)
            await self.timelines.add(HOME, [follower], recent.entries)
        return changed

    async def unfollow(self, follower: int, followee: int) -> bool:
        changed = await self.graph.unfollow(follower, followee)
        if changed:
            [recent] = await self.timelines.pages([(AUTHOR, followee)], None,
                                                  self.settings.timeline_cache_size)
            await self.timelines.remove(HOME, follower, recent.entries)
        return changed

    # -- fan-out on write ------------------------------------------------------------

    async def fanout(self, post_id: int, author_id: int) -> int:
        """Push one post to every follower's home timeline; resumable, idempotent."""
        pkey = progress_key(post_id)
        row = await self.tables.get(POSTS, {"post_id": post_id})
        if row is None or row["deleted"]:
            await self._done(post_id)
            return 0  # deleted before its fan-out: readers would drop it anyway
        raw = await self.redis.get(pkey)
        token = raw.decode() if raw else ""
        delivered = 0
        entry = [(post_id, author_id)]
        size = self.settings.fanout_page_size
        page = await self.tables.slice(FOLLOWERS, {"user_id": author_id}, limit=size,
                                       page_token=token)
        while True:
            followers = [r["follower_id"] for r in page.rows]
            token = page.next_page_token
            # The next page is read while this one is written.
            write = self.timelines.add(HOME, followers, entry)
            if token:
                _, page = await asyncio.gather(write, self.tables.slice(
                    FOLLOWERS, {"user_id": author_id}, limit=size, page_token=token))
            else:
                await write
            delivered += len(followers)
            if FANOUT_ENTRIES is not None:
                FANOUT_ENTRIES.inc(len(followers))
            if not token:
                break
            # Checkpoint: everything before `token` is delivered.
            await self.redis.set(pkey, token, ex=PROGRESS_TTL_SECONDS)
        await self.redis.delete(pkey)
        await self._done(post_id)
        return delivered

    # -- reads -----------------------------------------------------------------------

    async def home(self, reader: int, page_size: int, page_token: str) -> tuple[list[bytes], str]:
        """A page of the reader's home timeline: serialized posts and the next page token."""
        v = Violations()
        size = check_page_size(page_size, v)
        v.raise_if_any()
        before = decode_token("h", page_token)
        following = await self.graph.following(reader)
        celebs = following & await self.graph.celebrities()
        sources: list[tuple[TimelineKind, int]] = [(HOME, reader)]
        sources += [(AUTHOR, c) for c in sorted(celebs)]

        def accept(e: Entry) -> bool:
            return e[1] == reader or e[1] in following

        posts = await self._assemble(sources, accept, size, before)
        token = encode_token("h", posts[-1][0]) if len(posts) == size else ""
        return [raw for _, raw in posts], token

    async def user_timeline(self, author: int, page_size: int,
                            page_token: str) -> tuple[list[bytes], str]:
        v = Violations()
        size = check_page_size(page_size, v)
        v.raise_if_any()
        before = decode_token("u", page_token)
        posts = await self._assemble([(AUTHOR, author)], lambda e: True, size, before)
        token = encode_token("u", posts[-1][0]) if len(posts) == size else ""
        return [raw for _, raw in posts], token

    async def _assemble(self, sources: list[tuple[TimelineKind, int]],
                        accept: Callable[[Entry], bool], size: int,
                        before: int | None) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        cursor = before
        while len(out) < size:
            need = size - len(out)
            fetch = need + 2  # spare for deleted posts and unfollowed authors; else loop
            try:
                slices = await self.timelines.pages(sources, cursor, fetch)
            except InvalidPageToken as exc:  # pragma: no cover - table tokens are internal
                raise InvalidArgument([("page_token", "is malformed")]) from exc
            merged = sorted({e for s in slices for e in s.entries}, reverse=True)
            truncated = len(merged) > fetch
            merged = merged[:fetch]
            if not merged:
                break
            found = await self.posts.hydrate_raw([pid for pid, aid in merged
                                                  if accept((pid, aid))])
            for pid, aid in merged:
                cursor = pid
                p = found.get(pid)
                if p is not None and accept((pid, aid)):
                    out.append((pid, p))
                    if len(out) == size:
                        break
            if len(out) < size and not truncated and all(s.exhausted for s in slices):
                break
        return out
