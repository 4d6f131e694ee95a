"""Posts: stored once by id, cached as serialized messages, hydrated in one round trip.

Write path (CreatePost): validate (:mod:`servers.feed.text`), resolve
@mentions through the identity tables, shorten URLs through the URL
shortener's domain code (``ShortenerCore``, in-process, against the same
backends, so it works under ``sysdesign up`` and as its own Deployment),
then write the post row, the author's timeline row and the author's own home
timeline row, and hand the post to the fan-out worker unless the author is a
celebrity.

Read path (hydration): ``BatchGetPosts`` and every timeline turn ids into
posts with one pipelined Redis round trip (one ``HMGET {p:<id>}:n v like
reply repost`` per post: the post and its counters share one hash) and, for
misses, one concurrent batch of table reads (the SQLite adapter runs them in
one batch on its thread). The cached ``v`` is the serialized ``Post``
without its counts; the counts are appended to it as encoded fields (a later
scalar field wins when protobuf parses), so a timeline page is assembled as
bytes and parsed once.

Deleting a post never touches follower timelines: the row stays as a
tombstone (``deleted``), the cache entry is overwritten with ``-``, and every
read drops ids that hydrate to nothing. Counts (likes, replies, reposts) are
Redis counters over the ``feed_likes`` / ``feed_replies`` / ``feed_reposts``
partitions, rebuilt from them when missing (:mod:`servers.feed.counters`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.feed.v1 import feed_pb2 as pb

from servers.feed import text as txt
from servers.feed.counters import Counters, EdgeLock, count_partition
from servers.feed.nearcache import FeedNearCache
from servers.feed.tables import LIKES, POSTS, REPLIES, REPOSTS
from servers.feed.timelines import AUTHOR, HOME, Timelines
from servers.identity.tables import USERNAMES
from servers.platform.errors import InvalidArgument, NotFound, PermissionDenied, Violations
from servers.platform.metrics import CACHE_LOOKUPS
from servers.storage.table import TableStore

TOMBSTONE = b"-"
COUNT_FIELDS = ["like", "reply", "repost"]
HASH_FIELDS = ["v", *COUNT_FIELDS]


def post_tag(post_id: int) -> str:
    return f"p:{post_id}"


def post_key(post_id: int) -> str:
    """The post's hash: ``v`` (the serialized post, or ``-`` once deleted) and its counters."""
    return "{" + post_tag(post_id) + "}:n"


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: ten bytes, as protobuf encodes it
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Post.like_count = 11, reply_count = 12, repost_count = 13 (varints).
_COUNT_TAGS = (bytes([11 << 3]), bytes([12 << 3]), bytes([13 << 3]))


def with_counts(value: bytes, counts: tuple[int, int, int]) -> bytes:
    """A cached post's bytes with its counts set (appended fields override)."""
    return value + b"".join(t + _varint(c) for t, c in zip(_COUNT_TAGS, counts, strict=True) if c)


def length_delimited(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def parse_post_id(raw: str, field: str, v: Violations) -> int | None:
    if not raw:
        v.add(field, "is required")
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) <= 0 \
            or int(raw) >= 1 << 63:
        v.add(field, "must be a post id (a positive decimal integer)")
        return None
    return int(raw)


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def post_message(row: dict[str, Any]) -> pb.Post:
    """The cached form: everything but the counts."""
    ent = json.loads(row["entities"] or "{}")
    media = json.loads(row["media"] or "[]")
    return pb.Post(
        post_id=str(row["post_id"]),
        author_id=str(row["author_id"]),
        author_username=row["author_username"] or "",
        text=row["text"] or "",
        create_time=_ts(row["create_ms"]),
        reply_to_post_id=str(row["reply_to"]) if row["reply_to"] else "",
        repost_of_post_id=str(row["repost_of"]) if row["repost_of"] else "",
        media=[pb.MediaRef(media_id=m[0], type=m[1]) for m in media],  # type: ignore[arg-type]
        mentions=[pb.Mention(user_id=str(m[0]), username=m[1], start=m[2], end=m[3])
                  for m in ent.get("mentions", [])],
        urls=[pb.UrlEntity(url=u[0], short_url=u[1], start=u[2], end=u[3])
              for u in ent.get("urls", [])],
    )


class PostCore:
    def __init__(self, rt: Any, timelines: Timelines, graph: Any, enqueue_fanout: Any,
                 near: FeedNearCache | None = None) -> None:
        self.rt = rt
        self.near = near or FeedNearCache(rt.redis)
        self.redis = rt.redis
        self.tables: TableStore = rt.tables
        self.timelines = timelines
        self.graph = graph
        self.enqueue_fanout = enqueue_fanout
        self.counters = Counters(rt.redis, rt.config.cache_ttl_seconds)
        self.ttl = rt.config.cache_ttl_seconds

    # -- create -------------------------------------------------------------------

    async def create(self, author_id: int, author_username: str, text: str, *,
                     reply_to: str = "", repost_of: str = "",
                     media: list[tuple[str, int]] | None = None) -> pb.Post:
        media = media or []
        text = txt.normalize(text)
        v = Violations()
        txt.check_text(text, v, allow_empty=bool(repost_of))
        reply_id = parse_post_id(reply_to, "reply_to_post_id", v) if reply_to else None
        repost_id = parse_post_id(repost_of, "repost_of_post_id", v) if repost_of else None
        txt.check_media(media, v)
        v.raise_if_any()
        parents = await asyncio.gather(*(self._live_row(p) if p else _none()
                                         for p in (reply_id, repost_id)))
        if reply_id and parents[0] is None:
            v.add("reply_to_post_id", f"no post {reply_id} (unknown or deleted)")
        if repost_id and parents[1] is None:
            v.add("repost_of_post_id", f"no post {repost_id} (unknown or deleted)")
        v.raise_if_any()

        mentions, urls = await asyncio.gather(self._mentions(text), self._shorten(author_id, text))
        post_id = self.rt.snowflake.next_id()
        row: dict[str, Any] = {
            "post_id": post_id,
            "author_id": author_id,
            "author_username": author_username,
            "text": text,
            "reply_to": reply_id or 0,
            "repost_of": repost_id or 0,
            "media": json.dumps([[m, t] for m, t in media], separators=(",", ":")),
            "entities": json.dumps({"mentions": mentions, "urls": urls}, separators=(",", ":"),
                                   ensure_ascii=False),
            "create_ms": int(time.time() * 1000),
            "deleted": False,
        }
        entry = [(post_id, author_id)]
        writes = [
            self.tables.put(POSTS, row),
            self.timelines.persist(AUTHOR, [author_id], entry),
            self.timelines.persist(HOME, [author_id], entry),
        ]
        if reply_id:
            writes.append(self.tables.put(REPLIES, {"post_id": reply_id, "reply_id": post_id}))
        if repost_id:
            writes.append(self.tables.put(REPOSTS, {"post_id": repost_id, "repost_id": post_id}))
        await asyncio.gather(*writes)

        msg = post_message(row)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(post_key(post_id), mapping={"v": msg.SerializeToString(),
                                              **{f: 0 for f in COUNT_FIELDS}})
        pipe.expire(post_key(post_id), self.ttl)
        self.timelines.push(pipe, AUTHOR, author_id, entry)
        self.timelines.push(pipe, HOME, author_id, entry)
        if reply_id:
            self.counters.bump(pipe, post_tag(reply_id), "reply", 1)
        if repost_id:
            self.counters.bump(pipe, post_tag(repost_id), "repost", 1)
        await pipe.execute()
        await self.near.invalidate_author(author_id)
        for parent in (reply_id, repost_id):
            if parent:
                await self.near.invalidate_post(parent)
        if not await self.graph.is_celebrity(author_id):
            await self.enqueue_fanout(post_id, author_id)
        return msg

    async def _mentions(self, text: str) -> list[list[Any]]:
        spans = txt.find_mentions(text)
        rows = await asyncio.gather(*(self.tables.get(USERNAMES, {"username": s.value})
                                      for s in spans))
        return [[r["user_id"], r["username"], s.start, s.end]
                for s, r in zip(spans, rows, strict=True) if r is not None]

    async def _shorten(self, owner_id: int, text: str) -> list[list[Any]]:
        spans = txt.find_urls(text)
        if not spans:
            return []
        from servers.shortener.core import ShortenerCore

        core = ShortenerCore.for_runtime(self.rt)

        async def one(s: txt.Span) -> list[Any] | None:
            try:
                link = await core.create(owner_id, s.value)
            except InvalidArgument:
                return None  # not a URL the shortener accepts (or one of its own): plain text
            return [s.value, f"{core.edge_base}/{link['code']}", s.start, s.end]

        return [u for u in await asyncio.gather(*(one(s) for s in spans)) if u is not None]

    # -- read ---------------------------------------------------------------------

    async def _live_row(self, post_id: int) -> dict[str, Any] | None:
        row = await self.tables.get(POSTS, {"post_id": post_id})
        return None if row is None or row["deleted"] else row

    async def get(self, post_id: int) -> pb.Post:
        found = await self.hydrate([post_id])
        if post_id not in found:
            raise NotFound(f"no post {post_id}", reason="POST_NOT_FOUND",
                           metadata={"post_id": str(post_id)})
        return found[post_id]

    async def hydrate(self, ids: list[int]) -> dict[int, pb.Post]:
        """Live posts by id (unknown and deleted ids are left out)."""
        return {i: pb.Post.FromString(raw) for i, raw in (await self.hydrate_raw(ids)).items()}

    async def hydrate_raw(self, ids: list[int]) -> dict[int, bytes]:
        """Serialized live posts (counts included) by id, in one Redis round trip on hits."""
        if not ids:
            return {}
        generation = self.near.generation
        near, ids = self.near.get_posts(list(dict.fromkeys(ids)))
        if not ids:
            return near
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(post_key(i), HASH_FIELDS)
        res = await pipe.execute()
        out: dict[int, bytes] = {}
        misses: list[int] = []
        values: dict[int, bytes] = {}
        for i, (value, like, reply, repost) in zip(ids, res, strict=True):
            if value is None:
                misses.append(i)
            elif value == TOMBSTONE:
                continue
            elif like is None or reply is None or repost is None:
                values[i] = value
            else:
                out[i] = with_counts(value, (int(like), int(reply), int(repost)))
        if misses:
            CACHE_LOOKUPS.labels("feed_post", "miss").inc(len(misses))
            filled = await asyncio.gather(*(self._fill(i) for i in misses))
            values.update({i: v for i, v in zip(misses, filled, strict=True) if v is not None})
        if values:
            counted = await asyncio.gather(*(self.counts(i) for i in values))
            for (i, value), c in zip(values.items(), counted, strict=True):
                out[i] = with_counts(value, (c["like"], c["reply"], c["repost"]))
        self.near.put_posts(out, generation)
        return {**near, **out}

    async def _fill(self, post_id: int) -> bytes | None:
        row = await self.tables.get(POSTS, {"post_id": post_id})
        if row is None:
            return None
        key = post_key(post_id)
        pipe = self.redis.pipeline(transaction=False)
        value = TOMBSTONE if row["deleted"] else post_message(row).SerializeToString()
        # HSETNX: a delete's tombstone written meanwhile wins over this fill.
        pipe.hsetnx(key, "v", value)
        pipe.expire(key, self.ttl, nx=True)
        await pipe.execute()
        return None if row["deleted"] else value

    async def counts(self, post_id: int) -> dict[str, int]:
        async def recount() -> dict[str, int]:
            likes, replies, reposts = await asyncio.gather(
                count_partition(self.tables, LIKES, {"post_id": post_id}),
                count_partition(self.tables, REPLIES, {"post_id": post_id}),
                count_partition(self.tables, REPOSTS, {"post_id": post_id}),
            )
            return {"like": likes, "reply": replies, "repost": reposts}

        return await self.counters.read(post_tag(post_id), COUNT_FIELDS, recount)

    # -- delete, like ---------------------------------------------------------------

    async def delete(self, post_id: int, caller_id: int) -> None:
        row = await self._live_row(post_id)
        if row is None:
            raise NotFound(f"no post {post_id}", reason="POST_NOT_FOUND",
                           metadata={"post_id": str(post_id)})
        if row["author_id"] != caller_id:
            raise PermissionDenied("this post belongs to another user", reason="NOT_AUTHOR",
                                   metadata={"post_id": str(post_id)})
        await self.tables.put(POSTS, {"post_id": post_id, "deleted": True})
        await self.timelines.remove(AUTHOR, caller_id, [(post_id, caller_id)])
        await self.near.invalidate_author(caller_id)
        pipe = self.redis.pipeline(transaction=False)
        # Overwrite (not NX): a racing fill can never resurrect the post.
        pipe.hset(post_key(post_id), "v", TOMBSTONE)
        pipe.expire(post_key(post_id), self.ttl)
        if row["reply_to"]:
            await self.tables.delete(REPLIES, {"post_id": row["reply_to"], "reply_id": post_id})
            self.counters.bump(pipe, post_tag(row["reply_to"]), "reply", -1)
        if row["repost_of"]:
            await self.tables.delete(REPOSTS, {"post_id": row["repost_of"], "repost_id": post_id})
            self.counters.bump(pipe, post_tag(row["repost_of"]), "repost", -1)
        await pipe.execute()
        for p in (post_id, row["reply_to"], row["repost_of"]):
            if p:
                await self.near.invalidate_post(p)

    async def like(self, post_id: int, user_id: int, like: bool) -> tuple[bool, int]:
        if await self._live_row(post_id) is None:
            raise NotFound(f"no post {post_id}", reason="POST_NOT_FOUND",
                           metadata={"post_id": str(post_id)})
        key = {"post_id": post_id, "user_id": user_id}
        changed = False
        async with EdgeLock(self.redis, "{" + f"l:{post_id}:{user_id}" + "}:lock"):
            exists = await self.tables.get(LIKES, key) is not None
            if like and not exists:
                await self.tables.put(LIKES, {**key, "create_ms": int(time.time() * 1000)})
                changed = True
            elif not like and exists:
                await self.tables.delete(LIKES, key)
                changed = True
            if changed:
                pipe = self.redis.pipeline(transaction=False)
                self.counters.bump(pipe, post_tag(post_id), "like", 1 if like else -1)
                await pipe.execute()
                await self.near.invalidate_post(post_id)
        return changed, (await self.counts(post_id))["like"]


async def _none() -> None:
    return None
