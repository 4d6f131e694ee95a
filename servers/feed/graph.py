"""The social graph: follow edges in both directions, counts, celebrities.

Storage: ``feed_following`` (whom X follows) and ``feed_followers`` (who
follows X) in the table port, written together; each edge change runs under
a per-edge Redis lock (``{e:<follower>:<followee>}:lock``) so that repeated
and concurrent follows/unfollows of one pair change the counters exactly once
(see :mod:`servers.feed.counters`).

Redis holds, per user ``{u:<id>}``:

- ``:n`` counts (``followers``, ``following``), rebuilt by counting the two
  partitions when missing;
- ``:fw`` the set of users followed, the read path's filter ("posts by users
  the reader no longer follows" are dropped) and its source of celebrities.

**Celebrities.** An author whose follower count reaches the threshold
(``SYSDESIGN_FEED_CELEBRITY_THRESHOLD``, default 10,000) joins
``feed_celebrities`` (cached as ``{feed}:celebs``): CreatePost stops pushing
their posts to followers, and GetHomeTimeline pulls them from the author's
timeline instead. Membership is sticky: posts written while an author was a
celebrity were never pushed, so their followers must keep pulling that author
even if the count later drops; an author near the threshold costs one extra
(cached) read per home timeline, never a missing post. Readers cache the
celebrity set for one second, so a post written in the second after a
promotion can reach them that much later.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from servers.feed.counters import SENTINEL, CachedSets, Counters, EdgeLock, count_partition
from servers.feed.nearcache import FeedNearCache
from servers.feed.settings import FeedSettings
from servers.feed.tables import CELEBRITIES, FOLLOWERS, FOLLOWING
from servers.identity.tables import USERNAMES, USERS
from servers.platform.errors import FailedPrecondition, InvalidArgument, NotFound
from servers.storage.table import InvalidPageToken, TableStore

CELEBS_KEY = "{feed}:celebs"
CELEB_CACHE_SECONDS = 1.0


def user_tag(user_id: int) -> str:
    return f"u:{user_id}"


class GraphCore:
    def __init__(self, redis: Any, tables: TableStore, settings: FeedSettings,
                 near: FeedNearCache | None = None) -> None:
        self.redis = redis
        self.near = near or FeedNearCache(redis)
        self.tables = tables
        self.settings = settings
        self.counters = Counters(redis)
        self.following_sets = CachedSets(redis, "fw")
        self._celebs: set[int] = set()
        self._celebs_at = -1e9

    # -- users ------------------------------------------------------------------

    async def lookup(self, *, user_id: int | None = None, username: str = "",
                     field: str = "user") -> tuple[int, str]:
        """(user id, username) of a registered user; NOT_FOUND otherwise."""
        if user_id is not None:
            row = await self.tables.get(USERS, {"user_id": user_id})
            if row is not None:
                return int(row["user_id"]), str(row["username"])
            raise NotFound(f"no user with id {user_id}", reason="USER_NOT_FOUND",
                           metadata={"field": f"{field}.user_id", "user_id": str(user_id)})
        row = await self.tables.get(USERNAMES, {"username": username})
        if row is not None:
            return int(row["user_id"]), str(row["username"])
        raise NotFound(f"no user named {username!r}", reason="USER_NOT_FOUND",
                       metadata={"field": f"{field}.username", "username": username})

    async def usernames(self, ids: list[int]) -> dict[int, str]:
        rows = await asyncio.gather(*(self.tables.get(USERS, {"user_id": i}) for i in ids))
        return {i: r["username"] for i, r in zip(ids, rows, strict=True) if r is not None}

    # -- edges ------------------------------------------------------------------

    async def follow(self, follower: int, followee: int) -> tuple[bool, int | None]:
        """(changed, the followee's follower count when known)."""
        if follower == followee:
            raise InvalidArgument([("user", "you cannot follow yourself")])
        async with EdgeLock(self.redis, "{" + f"e:{follower}:{followee}" + "}:lock"):
            key = {"user_id": follower, "followee_id": followee}
            if await self.tables.get(FOLLOWING, key) is not None:
                return False, None
            if (await self.counts(follower))["following"] >= self.settings.following_limit:
                raise FailedPrecondition(
                    f"you follow {self.settings.following_limit} users, the most allowed",
                    reason="FOLLOWING_LIMIT", subject=f"users/{follower}/following")
            now = int(time.time() * 1000)
            await asyncio.gather(
                self.tables.put(FOLLOWING, {**key, "create_ms": now}),
                self.tables.put(FOLLOWERS, {"user_id": followee, "follower_id": follower,
                                            "create_ms": now}),
            )
            res = await self._bump_edge(follower, followee, +1)
        await self.near.invalidate_following(follower)
        followers = int(res[1]) if res[1] is not None else None
        await self.maybe_promote(followee, followers)
        return True, followers

    async def unfollow(self, follower: int, followee: int) -> bool:
        if follower == followee:
            raise InvalidArgument([("user", "you cannot unfollow yourself")])
        async with EdgeLock(self.redis, "{" + f"e:{follower}:{followee}" + "}:lock"):
            key = {"user_id": follower, "followee_id": followee}
            if await self.tables.get(FOLLOWING, key) is None:
                return False
            await asyncio.gather(
                self.tables.delete(FOLLOWING, key),
                self.tables.delete(FOLLOWERS, {"user_id": followee, "follower_id": follower}),
            )
            await self._bump_edge(follower, followee, -1)
        await self.near.invalidate_following(follower)
        return True

    async def _bump_edge(self, follower: int, followee: int, delta: int) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        self.counters.bump(pipe, user_tag(follower), "following", delta)
        self.counters.bump(pipe, user_tag(followee), "followers", delta)
        self.following_sets.change(pipe, user_tag(follower), "add" if delta > 0 else "rem", followee)
        return list(await pipe.execute())

    async def is_following(self, follower: int, followee: int) -> bool:
        return await self.tables.get(FOLLOWING, {"user_id": follower, "followee_id": followee}) \
            is not None

    # -- counts and sets ----------------------------------------------------------

    async def counts(self, user_id: int) -> dict[str, int]:
        async def recount() -> dict[str, int]:
            followers, following = await asyncio.gather(
                count_partition(self.tables, FOLLOWERS, {"user_id": user_id}),
                count_partition(self.tables, FOLLOWING, {"user_id": user_id}),
            )
            return {"followers": followers, "following": following}

        return await self.counters.read(user_tag(user_id), ["followers", "following"], recount)

    async def following(self, user_id: int) -> frozenset[int]:
        """Everyone ``user_id`` follows: near cache, else the Redis set, else the table."""
        cached = self.near.get_following(user_id)
        if cached is not None:
            return cached
        generation = self.near.generation
        raw = await self.redis.smembers(self.following_sets.keys(user_tag(user_id))[0])
        members = frozenset(CachedSets.decode(raw) if raw else await self.rebuild_following(user_id))
        self.near.put_following(user_id, members, generation)
        return members

    async def rebuild_following(self, user_id: int) -> set[int]:
        async def load() -> list[int]:
            out: list[int] = []
            token = ""
            while True:
                page = await self.tables.slice(FOLLOWING, {"user_id": user_id}, limit=5000,
                                               page_token=token)
                out += [r["followee_id"] for r in page.rows]
                token = page.next_page_token
                if not token:
                    return out

        return await self.following_sets.rebuild(user_tag(user_id), load)

    async def page(self, which: str, user_id: int, page_size: int,
                   page_token: str) -> tuple[list[dict[str, Any]], str]:
        table, col = (FOLLOWERS, "follower_id") if which == "followers" else (FOLLOWING, "followee_id")
        try:
            page = await self.tables.slice(table, {"user_id": user_id}, limit=page_size,
                                           page_token=page_token)
        except InvalidPageToken as exc:
            raise InvalidArgument([("page_token", f"is not a token from a previous List{which.title()}")]) from exc
        names = await self.usernames([r[col] for r in page.rows])
        rows = [{"user_id": r[col], "username": names.get(r[col], ""), "create_ms": r["create_ms"]}
                for r in page.rows]
        return rows, page.next_page_token

    # -- celebrities --------------------------------------------------------------

    async def _load_celebs(self) -> list[int]:
        out: list[int] = []
        token = ""
        while True:
            page = await self.tables.slice(CELEBRITIES, {"shard": 0}, limit=10_000, page_token=token)
            out += [r["user_id"] for r in page.rows]
            token = page.next_page_token
            if not token:
                return out

    async def _rebuild_celebs(self) -> set[int]:
        # Members are only ever added, so a union with what was added meanwhile is exact.
        ids = await self._load_celebs()
        await self.redis.sadd(CELEBS_KEY, SENTINEL, *ids)
        return set(ids)

    async def is_celebrity(self, user_id: int) -> bool:
        """Fresh (not the per-process cache): decides push or pull at post time."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.sismember(CELEBS_KEY, user_id)
        pipe.exists(CELEBS_KEY)
        member, exists = await pipe.execute()
        if exists:
            return bool(member)
        return user_id in await self._rebuild_celebs()

    async def celebrities(self) -> set[int]:
        """The celebrity set as this process saw it at most a second ago (the read path)."""
        now = time.monotonic()
        if now - self._celebs_at > CELEB_CACHE_SECONDS:
            raw = await self.redis.smembers(CELEBS_KEY)
            self._celebs = CachedSets.decode(raw) if raw else await self._rebuild_celebs()
            self._celebs_at = now
        return self._celebs

    async def maybe_promote(self, user_id: int, followers: int | None) -> bool:
        if followers is None:
            followers = (await self.counts(user_id))["followers"]
        if followers < self.settings.celebrity_threshold or await self.is_celebrity(user_id):
            return False
        await self.tables.put(CELEBRITIES, {"shard": 0, "user_id": user_id,
                                            "since_ms": int(time.time() * 1000)})
        await self.redis.sadd(CELEBS_KEY, SENTINEL, user_id)
        self._celebs_at = -1e9
        return True

    # -- bulk loading (the generator and the benchmark) ------------------------------

    async def bulk_follow(self, edges: list[tuple[int, int]], *, concurrency: int = 2048) -> None:
        """Write follow edges straight to the tables, in concurrent batches (group commit).

        For loading synthetic graphs into a fresh store: no locks, no
        backfill, and no counter bumps. Call :meth:`finish_bulk` for every
        touched user afterwards, which drops the cached counts and sets (they
        are rebuilt from the tables on the next read) and promotes new
        celebrities. Idempotent: writing an existing edge again changes nothing,
        and the counts are recounted from the tables.
        """
        now = int(time.time() * 1000)
        for start in range(0, len(edges), concurrency):
            chunk = edges[start:start + concurrency]
            await asyncio.gather(
                self.tables.put_many(FOLLOWING, [{"user_id": a, "followee_id": b, "create_ms": now}
                                                 for a, b in chunk]),
                self.tables.put_many(FOLLOWERS, [{"user_id": b, "follower_id": a, "create_ms": now}
                                                 for a, b in chunk]),
            )

    async def finish_bulk(self, users: list[int], followers: dict[int, int]) -> None:
        """Invalidate cached counts/sets of ``users`` (generation bumped) and promote celebrities."""
        for start in range(0, len(users), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for u in users[start:start + 1000]:
                n, ngen = self.counters.keys(user_tag(u))
                fw, fwgen = self.following_sets.keys(user_tag(u))
                pipe.delete(n, fw)
                pipe.incr(ngen)
                pipe.incr(fwgen)
            await pipe.execute()
        for u, count in followers.items():
            if count >= self.settings.celebrity_threshold:
                await self.maybe_promote(u, count)
