"""Counts and membership sets in Redis that the table port can always rebuild.

The edge tables (followers, following, likes, replies, reposts) are the
truth; Redis holds what reads need fast: counters (a hash per subject) and
the set of users someone follows. Both are caches with one hard rule: after
a restart, an eviction or FLUSHALL they are rebuilt from the tables and come
back exact.

Two races make that harder than "read the table, write Redis":

- **idempotent, concurrent edge changes.** Two ``FollowUser`` calls for the
  same pair, or a follow racing an unfollow, must change a counter once or
  not at all. Each edge change runs under a short per-edge lock in Redis
  (:class:`EdgeLock`): read the edge row, write or delete it, then bump the
  counters only if the edge really changed.
- **a rebuild racing a change.** A rebuild reads the table (a snapshot),
  then installs the result. A change landing between the two would be lost
  (an increment on a missing hash is skipped) or undone (a removed member
  re-added from the snapshot). Every change therefore bumps a generation
  counter next to the cache, in the same script, and a rebuild installs
  only when the generation it read before its snapshot is unchanged and
  nothing was installed meanwhile; otherwise it retries, and after a few
  tries answers from its snapshot without caching it.

Keys of one subject share a hash tag (``{u:42}:n``, ``{u:42}:ngen``,
``{u:42}:fw``...), so each script touches one slot (Redis Cluster safe).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from servers.platform.errors import Unavailable
from servers.storage.redis_conn import queue_evalsha
from servers.storage.table import Table, TableStore

# KEYS: hash, gen. ARGV: field, delta. Bumps the generation; the counter only when
# cached. Counters are installed together, so one field present means all are (the
# hash may hold other fields too: a post's hash also caches the post itself).
BUMP_LUA = """
redis.call('INCR', KEYS[2])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
end
return false
"""

# KEYS: hash, gen. ARGV: gen seen before the snapshot, field1, value1, ...
# 1 installed, 0 generation moved (retry), 2 someone else installed first.
INSTALL_HASH_LUA = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# KEYS: set, gen. ARGV: op ('add' / 'rem'), member. The set holds a '-' sentinel
# when it is loaded, so an empty-but-loaded set still exists.
SET_CHANGE_LUA = """
redis.call('INCR', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[1] == 'add' then return redis.call('SADD', KEYS[1], ARGV[2]) end
  return redis.call('SREM', KEYS[1], ARGV[2])
end
return false
"""

# KEYS: set, gen. ARGV: gen seen, member1, ... (always with the '-' sentinel).
INSTALL_SET_LUA = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
redis.call('SADD', KEYS[1], unpack(ARGV, 2))
return 1
"""

UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SENTINEL = b"-"
INSTALL_TRIES = 3


class Lua:
    """A script run alone (EVALSHA, loaded on first use) or queued on a pipeline.

    On a pipeline it is queued as EVAL with its source: the server caches the
    compiled script by its hash, and the pipeline needs no SCRIPT EXISTS round
    trip before it runs (what redis-py does for registered scripts).
    """

    def __init__(self, redis: Any, source: str) -> None:
        self.source = source
        self.script = redis.register_script(source)

    def queue(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        pipe.eval(self.source, len(keys), *keys, *args)

    def queue_sha(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        """Queue as EVALSHA: for pipelines of thousands of calls, where sending and
        hashing the source each time costs more than the script. The caller runs
        ``load()`` and the pipeline again on NoScriptError (after a restart or a
        SCRIPT FLUSH of the server), so the queued work must be idempotent."""
        queue_evalsha(pipe, self.script.sha, len(keys), *keys, *args)

    async def load(self) -> None:
        await self.script.registered_client.script_load(self.source)

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        return await self.script(keys=keys, args=args)


class EdgeLock:
    """A short lock on one edge (follower→followee, user→post), so changes of it serialize.

    ``SET key token NX PX ttl``, released only by its owner. Waits up to
    ``wait_s`` (the caller's deadline bounds it too) and answers UNAVAILABLE
    beyond: a lock held that long means a stuck peer, and the TTL frees it.
    """

    def __init__(self, redis: Any, key: str, *, ttl_ms: int = 10_000, wait_s: float = 5.0) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.wait_s = wait_s
        self.token = secrets.token_hex(8)

    async def __aenter__(self) -> EdgeLock:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        delay = 0.002
        while not await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            if loop.time() > deadline:
                raise Unavailable("this edge is being changed by another request; retry")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.eval(UNLOCK_LUA, 1, self.key, self.token)


async def count_partition(tables: TableStore, table: Table, partition: Mapping[str, Any],
                          page: int = 10_000) -> int:
    """Rows in one partition, paged (a rebuild path: O(rows), never on a hot read)."""
    total, token = 0, ""
    while True:
        p = await tables.slice(table, partition, limit=page, page_token=token)
        total += len(p.rows)
        token = p.next_page_token
        if not token:
            return total


class Counters:
    """Counter hashes (``{tag}:n``) with a generation (``{tag}:ngen``), rebuilt on a miss."""

    def __init__(self, redis: Any, ttl_seconds: int | None = None) -> None:
        self.redis = redis
        self.ttl = ttl_seconds
        self._bump = Lua(redis, BUMP_LUA)
        self._install = Lua(redis, INSTALL_HASH_LUA)

    @staticmethod
    def keys(tag: str) -> list[str]:
        return ["{" + tag + "}:n", "{" + tag + "}:ngen"]

    def bump(self, pipe: Any, tag: str, field: str, delta: int) -> None:
        """Queue a bump on a pipeline."""
        self._bump.queue(pipe, self.keys(tag), [field, delta])

    async def read(self, tag: str, fields: list[str],
                   recount: Callable[[], Awaitable[dict[str, int]]]) -> dict[str, int]:
        """The counts; a miss rebuilds them from ``recount`` (guarded by the generation)."""
        vals = await self.redis.hmget(self.keys(tag)[0], fields)
        if all(v is not None for v in vals):
            return {f: int(v) for f, v in zip(fields, vals, strict=True)}
        return await self.rebuild(tag, fields, recount)

    async def rebuild(self, tag: str, fields: list[str],
                      recount: Callable[[], Awaitable[dict[str, int]]]) -> dict[str, int]:
        h, gen = self.keys(tag)
        counts: dict[str, int] = {}
        for _ in range(INSTALL_TRIES):
            seen = await self.redis.get(gen)
            counts = await recount()
            args: list[Any] = [(seen or b"0").decode()]
            for f in fields:
                args += [f, counts.get(f, 0)]
            res = await self._install(keys=[h, gen], args=args)
            if res == 1:
                if self.ttl:
                    await self.redis.expire(h, self.ttl, nx=True)
                return {f: counts.get(f, 0) for f in fields}
            if res == 2:  # installed by a concurrent rebuild: read it
                vals = await self.redis.hmget(h, fields)
                if all(v is not None for v in vals):
                    return {f: int(v) for f, v in zip(fields, vals, strict=True)}
        return {f: counts.get(f, 0) for f in fields}


class CachedSets:
    """Membership sets (``{tag}:<name>``, with a ``-`` sentinel) rebuilt from a table partition."""

    def __init__(self, redis: Any, name: str) -> None:
        self.redis = redis
        self.name = name
        self._change = Lua(redis, SET_CHANGE_LUA)
        self._install = Lua(redis, INSTALL_SET_LUA)

    def keys(self, tag: str) -> list[str]:
        return ["{" + tag + "}:" + self.name, "{" + tag + "}:" + self.name + "gen"]

    def change(self, pipe: Any, tag: str, op: str, member: int) -> None:
        self._change.queue(pipe, self.keys(tag), [op, member])

    @staticmethod
    def decode(raw: Iterable[bytes]) -> set[int]:
        return {int(m) for m in raw if m != SENTINEL}

    async def rebuild(self, tag: str, load: Callable[[], Awaitable[list[int]]]) -> set[int]:
        key, gen = self.keys(tag)
        members: list[int] = []
        for _ in range(INSTALL_TRIES):
            seen = await self.redis.get(gen)
            members = await load()
            res = await self._install(keys=[key, gen],
                                      args=[(seen or b"0").decode(), SENTINEL, *members])
            if res == 1:
                return set(members)
            if res == 2:
                raw = await self.redis.smembers(key)
                if raw:
                    return self.decode(raw)
        return set(members)
