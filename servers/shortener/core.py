"""The shortener's domain logic, shared by the gRPC servicer and the HTTP edge.

Read path (ResolveShortUrl, edge redirects): cache-aside in Redis. One Lua
script, on keys that share the code's hash tag, reads the cached link, checks
expiry and the visit limit, counts the click (total, HyperLogLog of visitors,
per-day hash, referrer sorted set) and answers, in one round trip. On a miss
the link is read from the table store and put in the cache; a miss in the
table store is cached too (negative caching), briefly.

Cache coherence: create and delete *overwrite* the cache entry (delete writes a
tombstone), while a read-path fill only writes when the key is absent (SET NX),
so a slow fill can never resurrect a deleted link or hide a new one.

Retired codes: delete keeps a tombstone row in ``short_urls`` (the code,
``deleted_ms``, no target), forever. Every copy of a link that was printed,
shared or bookmarked keeps naming its code, so a code that once led somewhere
must never lead anywhere else: the ``IF NOT EXISTS`` insert of a new link
fails on the tombstone like on a live row, and a custom alias is refused with
FAILED_PRECONDITION (ALIAS_RETIRED). A row costs a few dozen bytes; the code
space (Base62) is not the scarce resource, trust in old links is. Custom
aliases are also refused when they equal a route prefix of the edge
(:func:`servers.edge.app.route_prefixes`): ``/media/…`` would never reach them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from servers.platform.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Violations,
)
from servers.platform.metrics import CACHE_LOOKUPS
from servers.platform.runtime import Runtime
from servers.shortener import validation as val
from servers.shortener.codes import CodeAllocator
from servers.shortener.nearcache import CachedLink, NearCache
from servers.shortener.tables import SHORT_URLS, SHORT_URLS_BY_OWNER
from servers.storage.redis_conn import key
from servers.storage.table import InvalidPageToken

REDIRECT_PERMANENT = 1
REDIRECT_FOUND = 2
NEGATIVE_TTL_SECONDS = 30
TOMBSTONE = b"-"

# KEYS: link, visits, uv, daily, refs. ARGV: visitor, day, referrer, now_ms, count (1/0).
# Returns {0} miss, {1} negative, {2, v} expired, {3, v, n} exhausted, {4, v, n} counted.
_RESOLVE_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return {0} end
if v == '-' then return {1} end
local maxv, exp = string.match(v, '^(%d+)|(%d+)|')
maxv = tonumber(maxv)
exp = tonumber(exp)
if exp > 0 and tonumber(ARGV[4]) >= exp then return {2, v} end
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
if maxv > 0 and n >= maxv then return {3, v, n} end
if ARGV[5] == '0' then return {4, v, n} end
n = redis.call('INCR', KEYS[2])
redis.call('PFADD', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
redis.call('ZINCRBY', KEYS[5], 1, ARGV[3])
return {4, v, n}
"""


def link_keys(code: str) -> list[str]:
    tag = f"l:{code}"
    return [key(tag, "link"), key(tag, "visits"), key(tag, "uv"), key(tag, "daily"), key(tag, "refs")]


def encode_cached(row: dict[str, Any]) -> bytes:
    return (f"{row['max_visits'] or 0}|{row['expire_ms'] or 0}|{row['redirect_type'] or 0}|"
            f"{row['long_url']}").encode()


@dataclass
class Resolved:
    long_url: str
    redirect_type: int
    visit_count: int
    expire_ms: int = 0
    max_visits: int = 0


def _decode_cached(v: bytes) -> tuple[int, int, int, str]:
    maxv, exp, redirect, url = v.decode().split("|", 3)
    return int(maxv), int(exp), int(redirect), url


def referrer_host(referrer: str) -> str:
    if not referrer:
        return "(direct)"
    try:
        host = urlsplit(referrer).hostname
    except ValueError:
        host = None
    return (host or "(other)")[:255]


_DAY_MS = 86_400_000
_day_cache: tuple[int, str] = (-1, "")


def utc_day(ms: int) -> str:
    global _day_cache
    day = ms // _DAY_MS
    if _day_cache[0] != day:
        _day_cache = (day, datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d"))
    return _day_cache[1]


class ShortenerCore:
    @classmethod
    def for_runtime(cls, rt: Runtime) -> ShortenerCore:
        """The process's one instance: the servicer and the edge share its caches."""
        return rt.singleton("shortener.core", lambda: cls(rt))

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.redis = rt.redis
        self.tables = rt.tables
        self.codes = CodeAllocator(rt.redis, rt.tables, counter="shorturl", secret=rt.config.secret())
        self._resolve = rt.redis.register_script(_RESOLVE_LUA)
        self.cache_ttl = rt.config.cache_ttl_seconds
        self.near = NearCache(rt.redis)
        rt.closers.append(self.near.close)
        self.edge_base = rt.config.edge_base_url
        self._route_prefixes: frozenset[str] | None = None

    @property
    def route_prefixes(self) -> frozenset[str]:
        """The edge's own route prefixes (lower case), read once from its route table."""
        if self._route_prefixes is None:
            from servers.edge.app import route_prefixes

            self._route_prefixes = route_prefixes(self.rt)
        return self._route_prefixes

    # -- create ------------------------------------------------------------

    def validate_create(self, long_url: str, alias: str, expire_ms: int | None, max_visits: int,
                        redirect_type: int) -> None:
        v = Violations()
        val.check_long_url(long_url, v, edge_base=self.edge_base)
        if alias:
            val.check_alias(alias, v)
            if not v and alias.lower() in self.route_prefixes:
                v.add("custom_alias", f"{alias!r} is reserved: the edge routes "
                                      f"{self.edge_base}/{alias.lower()}/… itself")
        val.check_future(expire_ms, v, "expire_time")
        if max_visits < 0:
            v.add("max_visits", "must be 0 (unlimited) or positive")
        if redirect_type not in (0, REDIRECT_PERMANENT, REDIRECT_FOUND):
            v.add("redirect_type", "must be REDIRECT_TYPE_PERMANENT or REDIRECT_TYPE_FOUND")
        v.raise_if_any()

    async def create(self, owner_id: int, long_url: str, *, alias: str = "", expire_ms: int | None = None,
                     max_visits: int = 0, redirect_type: int = 0) -> dict[str, Any]:
        self.validate_create(long_url, alias, expire_ms, max_visits, redirect_type)
        long_url = val.to_ascii_url(long_url)
        now = int(time.time() * 1000)
        row: dict[str, Any] = {
            "link_id": self.rt.snowflake.next_id(),
            "long_url": long_url,
            "owner_id": owner_id,
            "create_ms": now,
            "expire_ms": expire_ms or 0,
            "max_visits": max_visits,
            "redirect_type": redirect_type or REDIRECT_FOUND,
            "custom_alias": bool(alias),
        }
        for _attempt in range(8):
            row["code"] = alias or await self.codes.next_code()
            if not alias and row["code"].lower() in self.route_prefixes:
                continue  # a generated "healthz" would never be reached either
            if await self.tables.put(SHORT_URLS, row, if_not_exists=True):
                break
            if alias:
                taken = await self.tables.get(SHORT_URLS, {"code": alias})
                if taken is not None and taken.get("deleted_ms"):
                    raise FailedPrecondition(
                        f"the alias {alias!r} belonged to a deleted link and stays retired, so "
                        "copies of the old link never lead somewhere else; choose another alias",
                        reason="ALIAS_RETIRED", subject=f"shorturls/{alias}", kind="ALIAS_RETIRED")
                raise AlreadyExists(f"the alias {alias!r} is taken", reason="ALIAS_TAKEN",
                                    metadata={"custom_alias": alias})
            # A generated code that a custom alias already took: take the next one.
        else:
            raise Unavailable("could not allocate a free code; try again")
        index_row = {k: row[k] for k in SHORT_URLS_BY_OWNER.columns}
        try:
            await self.tables.put(SHORT_URLS_BY_OWNER, index_row)
        except BaseException:
            await self.tables.delete(SHORT_URLS, {"code": row["code"]})
            raise
        # Overwrites a negative entry or a delete's tombstone. A re-created alias
        # starts with fresh analytics: delete removed the old counters.
        await self.redis.set(link_keys(row["code"])[0], encode_cached(row), ex=self.cache_ttl)
        return row

    # -- resolve -----------------------------------------------------------

    async def resolve(self, code: str, *, referrer: str = "", user_agent: str = "",
                      client_ip: str = "", count: bool = True) -> Resolved:
        """The link's target; with ``count`` the click is counted (HEAD requests are not)."""
        v = Violations()
        val.check_code(code, v)
        v.raise_if_any()
        now = int(time.time() * 1000)
        visitor = hashlib.blake2b(f"{client_ip}|{user_agent}".encode(), digest_size=12).hexdigest()
        near = self.near.get(code)
        if near is not None:
            CACHE_LOOKUPS.labels("shorturl_near", "hit").inc()
            if near.expire_ms and now >= near.expire_ms:
                raise FailedPrecondition(f"the short URL {code!r} has expired",
                                         reason="SHORT_URL_EXPIRED", subject=f"shorturls/{code}")
            n = (self.near.count(code, near, visitor, utc_day(now), referrer_host(referrer))
                 if count else near.visits)
            return Resolved(near.long_url, near.redirect_type, n, near.expire_ms, 0)
        generation = self.near.generation
        keys = link_keys(code)
        args = [visitor, utc_day(now), referrer_host(referrer), now, 1 if count else 0]
        res = await self._resolve(keys=keys, args=args)
        if res[0] == 0:
            CACHE_LOOKUPS.labels("shorturl", "miss").inc()
            row = await self.tables.get(SHORT_URLS, {"code": code})
            if row is None or row.get("deleted_ms"):
                await self.redis.set(keys[0], TOMBSTONE, ex=NEGATIVE_TTL_SECONDS, nx=True)
                raise NotFound(f"no short URL {code!r}", reason="SHORT_URL_NOT_FOUND")
            await self.redis.set(keys[0], encode_cached(row), ex=self.cache_ttl, nx=True)
            res = await self._resolve(keys=keys, args=args)
            if res[0] == 0:  # evicted in between: answer from the row, uncounted
                return Resolved(row["long_url"], row["redirect_type"], 0,
                                row["expire_ms"] or 0, row["max_visits"] or 0)
        else:
            CACHE_LOOKUPS.labels("shorturl", "negative_hit" if res[0] == 1 else "hit").inc()
        status = res[0]
        if status == 1:
            raise NotFound(f"no short URL {code!r}", reason="SHORT_URL_NOT_FOUND")
        maxv, exp, redirect, url = _decode_cached(res[1])
        if status == 2:
            raise FailedPrecondition(f"the short URL {code!r} has expired", reason="SHORT_URL_EXPIRED",
                                     subject=f"shorturls/{code}")
        if status == 3:
            raise FailedPrecondition(f"the short URL {code!r} has reached its {maxv} visits",
                                     reason="SHORT_URL_VISITS_EXHAUSTED", subject=f"shorturls/{code}")
        if not maxv:  # links with a visit limit are counted in Redis every time
            self.near.put(code, CachedLink(url, redirect, exp, int(res[2]), time.monotonic()), generation)
        return Resolved(url, redirect, int(res[2]), exp, maxv)

    # -- owner operations ----------------------------------------------------

    async def get_owned(self, code: str, owner_id: int) -> dict[str, Any]:
        v = Violations()
        val.check_code(code, v)
        v.raise_if_any()
        row = await self.tables.get(SHORT_URLS, {"code": code})
        if row is None or row.get("deleted_ms"):
            raise NotFound(f"no short URL {code!r}", reason="SHORT_URL_NOT_FOUND")
        if row["owner_id"] != owner_id:
            raise PermissionDenied("this short URL belongs to another user", reason="NOT_OWNER")
        return row

    async def delete(self, code: str, owner_id: int) -> None:
        row = await self.get_owned(code, owner_id)
        await self.tables.delete(SHORT_URLS_BY_OWNER, {"owner_id": owner_id, "link_id": row["link_id"]})
        # The tombstone: the code stays taken (module docstring), the target is forgotten.
        await self.tables.put(SHORT_URLS, {
            "code": code, "link_id": row["link_id"], "long_url": "", "owner_id": owner_id,
            "create_ms": row["create_ms"], "expire_ms": 0, "max_visits": 0, "redirect_type": 0,
            "custom_alias": row["custom_alias"], "deleted_ms": int(time.time() * 1000)})
        keys = link_keys(code)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys[0], TOMBSTONE, ex=max(self.cache_ttl, NEGATIVE_TTL_SECONDS))
        pipe.delete(*keys[1:])
        await pipe.execute()
        await self.near.invalidate(code)

    async def list(self, owner_id: int, page_size: int, page_token: str) -> tuple[list[dict[str, Any]], str]:
        v = Violations()
        if page_size < 0 or page_size > 1000:
            v.add("page_size", "must be 0-1000 (0 means the default of 50)")
        v.raise_if_any()
        try:
            page = await self.tables.slice(SHORT_URLS_BY_OWNER, {"owner_id": owner_id},
                                           limit=page_size or 50, page_token=page_token)
        except InvalidPageToken as exc:
            raise InvalidArgument([("page_token", "is not a token from a previous ListShortUrls")]) from exc
        return page.rows, page.next_page_token

    async def stats(self, code: str, owner_id: int, *, days: int = 30, top: int = 10) -> dict[str, Any]:
        v = Violations()
        if days < 0 or days > 365:
            v.add("days", "must be 0-365 (0 means the default of 30)")
        if top < 0 or top > 100:
            v.add("top_referrers", "must be 0-100 (0 means the default of 10)")
        v.raise_if_any()
        row = await self.get_owned(code, owner_id)
        await self.near.flush()  # this process's buffered clicks first
        days = days or 30
        top = top or 10
        keys = link_keys(code)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys[1])
        pipe.execute_command("PFCOUNT", keys[2])  # the cluster pipeline refuses pfcount() by name
        pipe.hgetall(keys[3])
        pipe.zrevrange(keys[4], 0, top - 1, withscores=True)
        visits, uniques, daily, refs = await pipe.execute()
        today = datetime.now(UTC).date()
        created = datetime.fromtimestamp(row["create_ms"] / 1000, UTC).date()
        per_day = {k.decode(): int(n) for k, n in daily.items()}
        series = []
        for i in range(days):
            d = today - timedelta(days=i)
            if d < created:
                break
            day = d.strftime("%Y-%m-%d")
            series.append((day, per_day.get(day, 0)))
        return {
            "code": code,
            "total_clicks": int(visits or 0),
            "unique_visitors": int(uniques or 0),
            "daily": series,
            "referrers": [(r.decode(), int(s)) for r, s in refs],
        }
