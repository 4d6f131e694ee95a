"""Timelines: a Redis sorted set of recent entries in front of a bucketed table.

Two kinds share this code:

- **home** timelines (``{h:<reader>}:tl``): what the people a reader follows
  posted, pushed by the fan-out worker (and by CreatePost for the author's own
  posts), persisted in ``feed_home_timeline``;
- **author** timelines (``{a:<author>}:tl``): one author's own posts,
  persisted in ``feed_user_posts``. GetUserTimeline reads them, and so does
  GetHomeTimeline for the celebrities the reader follows (fan-out on read).

Entries are pointers, not copies: the member is ``<post id, 19 digits>:<author id>``
and the score is the post id. Snowflake ids use 63 bits and a score is a
double (53-bit mantissa), so neighbouring ids can share a score; members of
equal score sort by their bytes, and the zero-padded id prefix makes that
the id order too. Reads by score bound are therefore inclusive and drop the
ids at or above the cursor themselves.

Each sorted set keeps the newest ``cache_size`` (800) entries; a marker key
beside it (``{h:<reader>}:m``) says whether it is loaded and whether it is
``all`` of the timeline or ``partial`` (older entries live in the table
only). A read of a missing marker rebuilds the set from the table (the union
of what is there and the table's newest entries, so fan-out writing into a
cold set at the same moment loses nothing); a read past the end of a
``partial`` set continues in the table. The marker also keeps an empty but
loaded timeline from being rebuilt on every read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from servers.feed.counters import Lua
from servers.feed.nearcache import FeedNearCache
from servers.feed.tables import HOME_BUCKET_MS, HOME_TIMELINE, USER_POSTS, USER_POSTS_BUCKET_MS
from servers.platform.ids import bucket_of, id_for_time
from servers.storage.table import ClusteringRange, Table, TableStore

Entry = tuple[int, int]  # (post_id, author_id)

# KEYS: zset, marker. ARGV: cap, score1, member1, ... Adds, trims to cap, and
# marks a loaded timeline partial when the trim dropped something.
ADD_LUA = """
local n = redis.call('ZADD', KEYS[1], unpack(ARGV, 2))
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if extra > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('SET', KEYS[2], 'partial') end
end
return n
"""

# KEYS: zset, marker. ARGV: cap, partial (0/1), score1, member1, ... The rebuild:
# union with what fan-out wrote meanwhile, trim, set the marker.
INSTALL_LUA = """
if #ARGV > 2 then redis.call('ZADD', KEYS[1], unpack(ARGV, 3)) end
local partial = ARGV[2] == '1'
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if extra > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  partial = true
end
if partial then redis.call('SET', KEYS[2], 'partial') else redis.call('SET', KEYS[2], 'all') end
return 1
"""

PARTIAL = b"partial"
# Entries of an author timeline's head kept in the near cache.
HEAD_SIZE = 64
# A timeline walks back at most this many buckets (about 10 years of 7-day buckets).
MAX_BUCKET_WALK = 520


def member(post_id: int, author_id: int) -> str:
    return f"{post_id:019d}:{author_id}"


def parse_member(raw: bytes) -> Entry:
    pid, _, author = raw.partition(b":")
    return int(pid), int(author)


@dataclass(frozen=True)
class TimelineKind:
    prefix: str  # hash-tag prefix: "h" (home) or "a" (author)
    table: Table
    owner_col: str
    bucket_ms: int
    with_author: bool  # the table row carries author_id (home) or the owner is the author


HOME = TimelineKind("h", HOME_TIMELINE, "user_id", HOME_BUCKET_MS, True)
AUTHOR = TimelineKind("a", USER_POSTS, "author_id", USER_POSTS_BUCKET_MS, False)


@dataclass
class Slice:
    entries: list[Entry]
    # True when nothing older than the last entry exists (the source is exhausted).
    exhausted: bool


class Timelines:
    def __init__(self, redis: Any, tables: TableStore, cache_size: int,
                 near: FeedNearCache | None = None) -> None:
        self.redis = redis
        self.near = near
        self.tables = tables
        self.cache_size = cache_size
        self._add = Lua(redis, ADD_LUA)
        self._install = Lua(redis, INSTALL_LUA)

    @staticmethod
    def keys(kind: TimelineKind, owner: int) -> list[str]:
        tag = "{" + f"{kind.prefix}:{owner}" + "}"
        return [tag + ":tl", tag + ":m"]

    # -- writes -------------------------------------------------------------

    def row(self, kind: TimelineKind, owner: int, post_id: int, author_id: int) -> dict[str, Any]:
        row: dict[str, Any] = {kind.owner_col: owner, "bucket": bucket_of(post_id, kind.bucket_ms),
                               "post_id": post_id}
        if kind.with_author:
            row["author_id"] = author_id
        return row

    async def persist(self, kind: TimelineKind, owners: Iterable[int], entries: list[Entry]) -> None:
        """Table rows (the truth): every (owner, entry) in one batched write of the table port."""
        await self.tables.put_many(kind.table, [self.row(kind, o, pid, aid)
                                                for o in owners for pid, aid in entries])

    def push(self, pipe: Any, kind: TimelineKind, owner: int, entries: list[Entry]) -> None:
        """Queue the Redis side of an add (ZADD + trim) on a pipeline."""
        args: list[Any] = [self.cache_size]
        for pid, aid in entries:
            args += [float(pid), member(pid, aid)]
        self._add.queue(pipe, self.keys(kind, owner), args)

    async def add(self, kind: TimelineKind, owners: list[int], entries: list[Entry]) -> None:
        """Table rows and cache entries, written concurrently; idempotent (a repeated row or
        ZADD changes nothing), so a caller that fails halfway simply runs it again."""
        if not owners or not entries:
            return
        await asyncio.gather(self.persist(kind, owners, entries), self._push_all(kind, owners, entries))

    async def _push_all(self, kind: TimelineKind, owners: list[int], entries: list[Entry]) -> None:
        """One pipeline of EVALSHA calls (fan-out sends thousands); reloads the script once
        if the server lost it. A re-run is harmless: every call is an idempotent ZADD."""
        args: list[Any] = [self.cache_size]
        for pid, aid in entries:
            args += [float(pid), member(pid, aid)]
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for o in owners:
                self._add.queue_sha(pipe, self.keys(kind, o), args)
            try:
                await pipe.execute()
                return
            except NoScriptError:
                if attempt:
                    raise
                await self._add.load()

    async def remove(self, kind: TimelineKind, owner: int, entries: list[Entry]) -> None:
        if not entries:
            return
        await asyncio.gather(*(self.tables.delete(kind.table, {
            kind.owner_col: owner, "bucket": bucket_of(pid, kind.bucket_ms), "post_id": pid})
            for pid, _ in entries))
        await self.redis.zrem(self.keys(kind, owner)[0], *(member(p, a) for p, a in entries))

    # -- reads --------------------------------------------------------------

    async def pages(self, sources: list[tuple[TimelineKind, int]], before: int | None,
                    count: int) -> list[Slice]:
        """Up to ``count`` entries older than ``before`` from each source, newest first.

        One pipelined round trip for every cached source; cold sources are
        rebuilt, sources that run past a partial cache continue in the table.
        """
        if not sources:
            return []
        raw = await self._read_near(sources, before, count)
        out: list[Slice] = []
        for (kind, owner), (members, marker) in zip(sources, raw, strict=True):
            if marker is None:
                await self.rebuild(kind, owner)
                [(members, marker)] = await self._read([(kind, owner)], before, count)
            entries = self._entries(members, before, count)
            if len(entries) >= count:
                out.append(Slice(entries[:count], False))
                continue
            if marker == PARTIAL:
                # The cache ends before the timeline does: the rest is in the table.
                start = entries[-1][0] if entries else before
                need = count - len(entries)
                older = await self.from_table(kind, owner, start, need)
                out.append(Slice(entries + older, len(older) < need))
                continue
            out.append(Slice(entries, True))
        return out

    async def _read_near(self, sources: list[tuple[TimelineKind, int]], before: int | None,
                         count: int) -> list[tuple[list[bytes], bytes | None]]:
        """Like :meth:`_read`, with first pages of author timelines from the near cache."""
        near = self.near
        if near is None or before is not None:
            return await self._read(sources, before, count)
        generation = near.generation
        out: list[tuple[list[bytes], bytes | None] | None] = []
        todo: list[tuple[TimelineKind, int]] = []
        for kind, owner in sources:
            head = near.get_head(owner) if kind is AUTHOR else None
            if head is not None and (len(head[0]) >= count + 8 or head[1] not in (None, PARTIAL)):
                out.append(head)
            else:
                out.append(None)
                todo.append((kind, owner))
        if todo:
            fetched = iter(await self._read(todo, None, count, HEAD_SIZE))
            for i, (kind, owner) in enumerate(sources):
                if out[i] is None:
                    got = next(fetched)
                    out[i] = got
                    if kind is AUTHOR and got[1] is not None:
                        near.put_head(owner, got, generation)
        return [o for o in out if o is not None]

    async def _read(self, sources: list[tuple[TimelineKind, int]], before: int | None,
                    count: int, head: int = 0) -> list[tuple[list[bytes], bytes | None]]:
        """Members and marker of each source, one pipeline; author sources read at least
        ``head`` entries (what the near cache keeps)."""
        # Ids equal to the cursor's score may sort before it: fetch a few extra.
        want = count + 8
        pipe = self.redis.pipeline(transaction=False)
        for kind, owner in sources:
            zkey, mkey = self.keys(kind, owner)
            n = max(want, head) if kind is AUTHOR else want
            if before is None:
                pipe.zrevrange(zkey, 0, n - 1)
            else:
                pipe.zrevrangebyscore(zkey, float(before), "-inf", start=0, num=n)
            pipe.get(mkey)
        res = await pipe.execute()
        return [(res[i], res[i + 1]) for i in range(0, len(res), 2)]

    @staticmethod
    def _entries(members: list[bytes], before: int | None, count: int) -> list[Entry]:
        """The first ``count`` members older than ``before``, parsed."""
        out: list[Entry] = []
        for m in members:
            e = parse_member(m)
            if before is not None and e[0] >= before:
                continue
            out.append(e)
            if len(out) == count:
                break
        return out

    def _bucket_range(self, kind: TimelineKind, owner: int, before: int | None) -> range:
        # A post minted by a host whose clock runs a little ahead is still found.
        top_id = before if before is not None else id_for_time(int(time.time() * 1000) + 60_000)
        top = bucket_of(top_id, kind.bucket_ms)
        try:
            floor = bucket_of(owner, kind.bucket_ms)  # owners are Snowflake user ids
        except ValueError:
            floor = top - MAX_BUCKET_WALK
        floor = max(min(floor, top), top - MAX_BUCKET_WALK)
        return range(top, floor - 1, -1)

    async def from_table(self, kind: TimelineKind, owner: int, before: int | None,
                         count: int) -> list[Entry]:
        """Entries older than ``before``, newest first, walking the buckets back."""
        out: list[Entry] = []
        for bucket in self._bucket_range(kind, owner, before):
            bounds = ClusteringRange(lt=(before,)) if before is not None else None
            page = await self.tables.slice(kind.table, {kind.owner_col: owner, "bucket": bucket},
                                           limit=count - len(out), bounds=bounds)
            for r in page.rows:
                out.append((r["post_id"], r["author_id"] if kind.with_author else owner))
            if len(out) >= count:
                break
        return out

    async def rebuild(self, kind: TimelineKind, owner: int) -> None:
        """Load the table's newest entries into the cache (union; marker set last)."""
        rows = await self.from_table(kind, owner, None, self.cache_size + 1)
        partial = len(rows) > self.cache_size
        args: list[Any] = [self.cache_size, 1 if partial else 0]
        for pid, aid in rows[: self.cache_size]:
            args += [float(pid), member(pid, aid)]
        await self._install(keys=self.keys(kind, owner), args=args)
