"""Rate limiting on Redis: fixed window, sliding window counter and token bucket (GCRA).

One library for every limit in sysdesign: the Envoy-compatible rate limit
service (servers/ratelimit/) calls it for each descriptor, and any system can
call it for its own limits.

    limiter = RateLimiter(redis)
    [d] = await limiter.check([Check("user:42:create", Rule(100, 60, Algorithm.SLIDING_WINDOW))])
    if not d.allowed: raise ResourceExhausted(..., retry_after_seconds=d.retry_after_s)

How it works:

- **One script call, atomic.** Every check is one Lua script run on Redis:
  read the key's state, decide, write, all in one atomic step, so replicas
  sharing a Redis never admit more than the limit between them. The checks of
  one call whose keys share a Redis Cluster slot (all of them on a single
  server) go in one script call; checks of other slots are pipelined beside it
  in the same round trip.
- **Redis's clock.** The script reads ``TIME`` on the server, never a
  client's clock, so replicas with skewed clocks still agree. (``now_us`` can
  be given instead, for tests and replays of the same script.)
- **Cluster-safe keys.** Each check owns one key, ``{rl:<name>}:<algorithm>``,
  hash-tagged by its name; names longer than 200 bytes are hashed.
- **Bounded.** A call gives up after ``timeout_s`` and raises
  ``RateLimitBackendError``; the caller picks its failure mode (allow or deny).
- **Concurrent calls share a round trip.** While a script call is on its way
  (at most ``max_inflight`` at once), the checks of every other call wait and
  then go together, in order, in the next one (``_Coalescer``): one call alone
  goes at once, and under load one round trip and one script run decide
  hundreds of requests. Redis runs the script atomically, so a batch decides
  exactly as the same calls one after another would.
- **Over-limit keys stay local.** A key found over its limit is remembered in
  process until Redis said it could pass again (``OverLimitCache``), so a
  flood of denied calls costs Redis nothing.

The algorithms (``Rule.algorithm``):

- ``fixed_window`` (envoyproxy/ratelimit's): a counter per aligned window of
  ``window_s`` seconds; every hit counts, admitted or not, as Envoy's does.
  Cheap and exact within a window, but a client can spend its limit at the end
  of one window and again at the start of the next: up to 2x the limit in any
  ``window_s`` span across a boundary.
- ``sliding_window`` (Cloudflare's sliding window counter): the previous
  window's count weighted by how much of it still overlaps the sliding window,
  plus the current count: ``prev * (window - elapsed) / window + cur``, the
  weighted share rounded to the nearest whole request. A request that would
  exceed the limit is refused and not counted. Two numbers per key; its error
  is that the previous window's hits are assumed evenly spread. Under a steady
  flood every window admits exactly the limit, spread evenly over the window.
- ``token_bucket`` (GCRA, the generic cell rate algorithm): a bucket of
  ``burst`` tokens (default: ``requests``) refilled at ``requests`` per
  ``window_s``, stored as one number, the theoretical arrival time. Smooth:
  after a burst the client gets one request every ``window_s / requests``.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from servers.storage.redis_conn import is_cluster, key, queue_evalsha


class Algorithm(enum.Enum):
    FIXED_WINDOW = "fixed_window"
    SLIDING_WINDOW = "sliding_window"
    TOKEN_BUCKET = "token_bucket"


_CODE = {Algorithm.FIXED_WINDOW: 1, Algorithm.SLIDING_WINDOW: 2, Algorithm.TOKEN_BUCKET: 3}
_SHORT = {Algorithm.FIXED_WINDOW: "fw", Algorithm.SLIDING_WINDOW: "sw", Algorithm.TOKEN_BUCKET: "tb"}

# Counts are kept exactly in Lua's doubles up to 2^53; a single call's hits are
# bounded far below that so a sum never loses precision.
MAX_HITS = 2**32 - 1
MAX_REQUESTS = 2**32 - 1
_NAME_MAX = 200

# A limit's unit in seconds: envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit's
# names, which both the rate limit service's config and the API limits use.
UNIT_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400, "WEEK": 7 * 86400,
                "MONTH": 30 * 86400, "YEAR": 365 * 86400}


@dataclass(frozen=True, slots=True)
class Rule:
    """``requests`` per ``window_s`` seconds, by ``algorithm``.

    ``burst`` is the token bucket's capacity (0: ``requests``); the windows
    ignore it. ``requests == 0`` refuses every request that counts a hit.
    """

    requests: int
    window_s: int
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    burst: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"requests must be 0..{MAX_REQUESTS}")
        if self.window_s <= 0:
            raise ValueError("window_s must be positive")
        if self.burst < 0 or (self.burst and self.algorithm is not Algorithm.TOKEN_BUCKET):
            raise ValueError("burst is a token bucket's capacity (>= 1)")

    @property
    def capacity(self) -> int:
        return self.burst or self.requests


@dataclass(frozen=True, slots=True)
class Check:
    """One limit to check: ``name`` identifies the counter (e.g. ``"api_user_42"``)."""

    name: str
    rule: Rule
    hits: int = 1


@dataclass(frozen=True, slots=True)
class Decision:
    """What Redis decided for one check.

    ``remaining``: hits still admitted now. ``reset_after_s``: until the
    window ends (fixed, sliding) or the bucket is full again (token).
    ``retry_after_s``: when refused, until a retry of the same hits can pass
    (0 when admitted). ``before`` / ``after``: the count the limit is compared
    with, before and after this call (for near-limit statistics).
    ``local``: answered from the over-limit cache, without Redis.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after_s: float
    retry_after_s: float
    before: int
    after: int
    local: bool = False


class RateLimitBackendError(Exception):
    """Redis did not answer in time (or at all): the caller applies its failure mode."""


# One script for every algorithm and any number of checks. ARGV[1] is the
# time in microseconds ('' = the server's TIME); then 5 values per key:
# algorithm, limit, window (us), hits, capacity. Returns 6 integers per key:
# allowed, before, after, remaining, reset (us), retry (us).
_LUA = r"""
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.0f', x) end
local function down(x) return math.floor(x + 1e-6) end
local out = {}
for i = 1, #KEYS do
  local k = KEYS[i]
  local base = 1 + (i - 1) * 5
  local alg = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local win = tonumber(ARGV[base + 3])
  local hits = tonumber(ARGV[base + 4])
  local cap = tonumber(ARGV[base + 5])
  local allowed, before, after, remaining, reset, retry
  if alg == 1 then
    -- fixed window: every hit counts, as envoyproxy/ratelimit's INCRBY
    local ws = math.floor(now / win) * win
    local st = redis.call('HMGET', k, 'w', 'c')
    local c = 0
    if tonumber(st[1]) == ws then c = tonumber(st[2]) or 0 end
    before = c
    c = c + hits
    after = c
    if hits > 0 then
      redis.call('HSET', k, 'w', fmt(ws), 'c', fmt(c))
      redis.call('PEXPIREAT', k, fmt(math.floor((ws + win) / 1000) + 1000))
    end
    reset = ws + win - now
    if c <= limit then
      allowed = 1; retry = 0
    else
      allowed = 0; retry = reset
    end
    remaining = math.max(0, limit - c)
  elseif alg == 2 then
    -- sliding window counter: prev * (win - elapsed) / win + cur
    local ws = math.floor(now / win) * win
    local st = redis.call('HMGET', k, 'w', 'c', 'p')
    local w = tonumber(st[1])
    local c = tonumber(st[2]) or 0
    local p = tonumber(st[3]) or 0
    if w ~= ws then
      if w == ws - win then p = c else p = 0 end
      c = 0
    end
    local left = win - (now - ws)
    -- the previous window's share in whole requests, rounded to the nearest:
    -- under a steady flood every window then admits exactly the limit (the
    -- exact share refuses the last request of each window: a limit of 5 would
    -- admit 4), and a burst at a window's end gains at most half a request
    local function share(l) return math.floor(p * l / win + 0.5) end
    local est = share(left) + c
    before = est
    if est + hits <= limit then
      allowed = 1; retry = 0
      c = c + hits
    else
      allowed = 0
      -- still in this window: wait until the previous window's share is at most room,
      -- i.e. p * (left - t) / win < room + 1/2
      local room = limit - hits - c
      retry = -1
      if room >= 0 and p > 0 then
        local t = math.floor(left - (2 * room + 1) * win / (2 * p)) + 1
        if t < 0 then t = 0 end
        if t < left then retry = t end
      end
      if retry < 0 then
        -- in the next window this one's count becomes the weighted one
        if hits > limit then
          retry = left + win
        elseif c > 0 then
          local s = math.floor(win - (2 * (limit - hits) + 1) * win / (2 * c)) + 1
          if s < 0 then s = 0 end
          retry = left + s
        else
          retry = left
        end
      end
    end
    after = share(left) + c
    if hits > 0 or w ~= ws then
      redis.call('HSET', k, 'w', fmt(ws), 'c', fmt(c), 'p', fmt(p))
      redis.call('PEXPIREAT', k, fmt(math.floor((ws + 2 * win) / 1000) + 1000))
    end
    remaining = math.max(0, limit - after)
    reset = left
  else
    -- token bucket as GCRA: the theoretical arrival time of the next request
    if limit <= 0 then
      allowed = (hits == 0) and 1 or 0
      before = 0; after = 0; remaining = 0; reset = win; retry = allowed == 1 and 0 or win
    else
      local T = win / limit
      local tau = cap * T
      local tat = tonumber(redis.call('HGET', k, 't'))
      if not tat or tat < now then tat = now end
      local new_tat = tat + hits * T
      before = (tat - now) / T
      if new_tat - now <= tau + 1e-6 then
        allowed = 1; retry = 0
        tat = new_tat
        if hits > 0 then
          redis.call('HSET', k, 't', fmt(tat))
          redis.call('PEXPIREAT', k, fmt(math.floor(tat / 1000) + 1000))
        end
      else
        allowed = 0
        retry = math.ceil(new_tat - tau - now)
        if hits > cap then retry = math.ceil(tat - now + win) end
      end
      after = (tat - now) / T
      remaining = math.max(0, down((tau - (tat - now)) / T))
      before = math.ceil(before - 1e-6); after = math.ceil(after - 1e-6)
      reset = math.ceil(tat - now)
    end
  end
  out[#out + 1] = allowed
  out[#out + 1] = before
  out[#out + 1] = after
  out[#out + 1] = remaining
  out[#out + 1] = math.floor(reset)
  out[#out + 1] = math.floor(retry)
end
return out
"""


def redis_key(name: str, algorithm: Algorithm, prefix: str = "") -> str:
    """The check's key: ``{rl:<name>}:<fw|sw|tb>``, one hash slot per name."""
    tag = prefix + "rl:" + name
    if len(tag.encode()) > _NAME_MAX or "{" in tag or "}" in tag:
        tag = prefix + "rl:h:" + hashlib.sha256(name.encode()).hexdigest()[:40]
    return key(tag, _SHORT[algorithm])


class OverLimitCache:
    """Keys known to be over their limit, until Redis said a retry could pass.

    As envoyproxy/ratelimit's local cache (freecache of over-limit keys for
    the rest of their window), bounded to ``max_entries`` (oldest dropped).
    Per process: other replicas learn from Redis on their own first refusal.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: OrderedDict[str, tuple[float, float, int]] = OrderedDict()

    def get(self, k: str) -> tuple[float, float, int] | None:
        """(seconds until retry, seconds until reset, limit) while the key is cached."""
        item = self._until.get(k)
        if item is None:
            return None
        now = time.monotonic()
        until, reset_at, limit = item
        if now >= until:
            del self._until[k]
            return None
        return until - now, max(0.0, reset_at - now), limit

    def put(self, k: str, retry_after_s: float, reset_after_s: float, limit: int,
            *, asked_at: float | None = None) -> None:
        """Remember ``k`` for ``retry_after_s`` from ``asked_at`` (``time.monotonic()``).

        Redis decided somewhere between asking and answering, so the times
        count from when it was asked: a reply that waited in a busy event loop
        must not keep the key refused past the moment Redis would admit it
        (under a flood a sliding window frees room continuously, and every
        millisecond held too long near a window's end is admissions lost).
        """
        if retry_after_s <= 0 or self.max_entries <= 0:
            return
        now = time.monotonic() if asked_at is None else asked_at
        self._until[k] = (now + retry_after_s, now + max(reset_after_s, retry_after_s), limit)
        self._until.move_to_end(k)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def clear(self) -> None:
        self._until.clear()

    def __len__(self) -> int:
        return len(self._until)


_Result = list[int]
_Run = Any  # (keys, checks, now_us) -> awaitable list of results


class _Coalescer:
    """Checks from concurrent calls, sent together: one script call per batch.

    A call's checks join the pending batch; a batch goes as soon as fewer than
    ``max_inflight`` are on their way (so a lone call waits for nothing), at
    most ``max_batch`` checks, whole calls, in arrival order.
    """

    def __init__(self, run: _Run, *, max_batch: int = 512, max_inflight: int = 2) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._pending: list[tuple[list[str], list[Check], asyncio.Future[list[_Result]]]] = []
        self._inflight = 0
        self._kick_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.checks = 0

    async def submit(self, keys: list[str], checks: list[Check]) -> list[_Result]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[_Result]] = loop.create_future()
        self._pending.append((keys, checks, fut))
        if not self._kick_scheduled and self._inflight < self.max_inflight:
            # after the callbacks already ready: calls arriving in the same turn of the loop go together
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return await fut

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._pending and self._inflight < self.max_inflight:
            batch: list[tuple[list[str], list[Check], asyncio.Future[list[_Result]]]] = []
            n = 0
            while self._pending and (not batch or n + len(self._pending[0][1]) <= self.max_batch):
                item = self._pending.pop(0)
                if not item[2].done():  # its caller gave up (timeout): not sent
                    batch.append(item)
                    n += len(item[1])
            if not batch:
                continue
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[str], list[Check], asyncio.Future[list[_Result]]]]) -> None:
        keys = [k for item in batch for k in item[0]]
        checks = [c for item in batch for c in item[1]]
        try:
            results = await self._run(keys, checks, None)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self.batches += 1
            self.checks += len(checks)
            at = 0
            for item_keys, _, fut in batch:
                if not fut.done():
                    fut.set_result(results[at:at + len(item_keys)])
                at += len(item_keys)
        finally:
            self._inflight -= 1
            if self._pending:
                self._kick()


class RateLimiter:
    """Checks limits on one Redis (a server or a cluster); see the module docstring."""

    def __init__(self, redis: Any, *, prefix: str = "", timeout_s: float = 0.25,
                 local_cache: OverLimitCache | None = None, coalesce: bool = True,
                 max_batch: int = 512, max_inflight: int = 2) -> None:
        self.redis = redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.local_cache = local_cache
        self._script = redis.register_script(_LUA)
        self._cluster = is_cluster(redis)
        self.coalescer = (_Coalescer(self._run, max_batch=max_batch, max_inflight=max_inflight)
                          if coalesce else None)

    async def check(self, checks: Sequence[Check], *, now_us: int | None = None) -> list[Decision]:
        """Decide every check; raises RateLimitBackendError when Redis fails or is too slow.

        Checks on Redis's clock (``now_us`` None) share round trips with
        concurrent calls (``coalesce``); a given clock runs a call of its own.
        """
        decisions: list[Decision | None] = [None] * len(checks)
        keys: list[str] = []
        todo: list[int] = []
        for i, c in enumerate(checks):
            if not 0 <= c.hits <= MAX_HITS:
                raise ValueError(f"hits must be 0..{MAX_HITS}")
            k = redis_key(c.name, c.rule.algorithm, self.prefix)
            keys.append(k)
            cached = self.local_cache.get(k) if self.local_cache is not None and c.hits > 0 else None
            if cached is not None:
                retry, reset, limit = cached
                decisions[i] = Decision(False, c.rule.requests, 0, reset, retry, limit, limit, local=True)
            else:
                todo.append(i)
        if todo:
            asked_at = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout_s):
                    todo_keys, todo_checks = [keys[i] for i in todo], [checks[i] for i in todo]
                    if self.coalescer is not None and now_us is None:
                        results = await self.coalescer.submit(todo_keys, todo_checks)
                    else:
                        results = await self._run(todo_keys, todo_checks, now_us)
            except (RedisError, OSError, TimeoutError) as exc:
                raise RateLimitBackendError(repr(exc)) from exc
            for i, r in zip(todo, results, strict=True):
                c = checks[i]
                d = Decision(
                    allowed=bool(r[0]), limit=c.rule.requests, remaining=int(r[3]),
                    reset_after_s=max(0, int(r[4])) / 1e6, retry_after_s=max(0, int(r[5])) / 1e6,
                    before=int(r[1]), after=int(r[2]),
                )
                decisions[i] = d
                if not d.allowed and self.local_cache is not None and c.hits > 0:
                    self.local_cache.put(keys[i], d.retry_after_s, d.reset_after_s, c.rule.requests,
                                         asked_at=asked_at)
        return [d for d in decisions if d is not None]

    @staticmethod
    def _args(c: Check) -> list[Any]:
        r = c.rule
        return [_CODE[r.algorithm], r.requests, r.window_s * 1_000_000, c.hits, r.capacity]

    async def _run(self, keys: list[str], checks: list[Check], now_us: int | None) -> list[list[int]]:
        clock = "" if now_us is None else str(int(now_us))
        if not self._cluster or len(keys) == 1:
            groups = [list(range(len(keys)))]
        else:
            by_slot: dict[int, list[int]] = {}
            for i, k in enumerate(keys):
                by_slot.setdefault(key_slot(k.encode()), []).append(i)
            groups = list(by_slot.values())
        out: list[list[int]] = [[] for _ in keys]

        def args_of(group: list[int]) -> list[Any]:
            args: list[Any] = [clock]
            for i in group:
                args += self._args(checks[i])
            return args

        def spread(group: list[int], flat: list[Any]) -> None:
            for j, i in enumerate(group):
                out[i] = [int(x) for x in flat[j * 6:(j + 1) * 6]]

        if len(groups) == 1:
            g = groups[0]
            spread(g, await self._script(keys=[keys[i] for i in g], args=args_of(g)))
            return out
        pending = groups
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for g in pending:
                gk = [keys[i] for i in g]
                queue_evalsha(pipe, self._script.sha, len(gk), *gk, *args_of(g))
            results = await pipe.execute(raise_on_error=False)
            failed = []
            for g, r in zip(pending, results, strict=True):
                if isinstance(r, NoScriptError) and attempt == 0:
                    failed.append(g)  # the script never ran: retrying cannot count twice
                elif isinstance(r, Exception):
                    raise r
                else:
                    spread(g, r)
            if not failed:
                break
            await self.redis.script_load(_LUA)
            pending = failed
        return out


def ceil_seconds(s: float) -> int:
    """Whole seconds for headers (Retry-After, RateLimit t=): never 0 while waiting."""
    return max(0, math.ceil(s - 1e-9))
