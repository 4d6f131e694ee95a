"""servers/platform/ratelimit.py on a real Valkey: the three algorithms, exactly.

The script reads Redis's TIME in production; here every call passes
``now_us``, so the same script runs on a clock the test moves (no sleeping,
no timing assertions).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from servers.platform.ratelimit import (
    Algorithm,
    Check,
    OverLimitCache,
    RateLimiter,
    Rule,
    redis_key,
)
from servers.storage import redis_conn

pytestmark = [pytest.mark.redis_cluster]

S = 1_000_000  # microseconds
T0 = 1_800_000_040 * S  # a minute boundary + 40 s


@pytest.fixture
async def limiter(valkey_url: str) -> AsyncIterator[RateLimiter]:
    r = redis_conn.connect(valkey_url)
    yield RateLimiter(r, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_s=5)
    await r.aclose()


def name() -> str:
    return "k" + uuid.uuid4().hex[:10]


async def admitted(lim: RateLimiter, n: str, rule: Rule, at_us: int, tries: int) -> int:
    ok = 0
    for _ in range(tries):
        [d] = await lim.check([Check(n, rule)], now_us=at_us)
        ok += d.allowed
    return ok


async def test_fixed_window_counts_every_hit_and_resets_on_the_boundary(limiter: RateLimiter) -> None:
    n, rule = name(), Rule(5, 60)
    ds = [(await limiter.check([Check(n, rule)], now_us=T0))[0] for _ in range(7)]
    assert [d.allowed for d in ds] == [True] * 5 + [False] * 2
    assert [d.remaining for d in ds] == [4, 3, 2, 1, 0, 0, 0]
    assert ds[0].reset_after_s == pytest.approx(20)  # the window ends at T0 + 20 s
    assert ds[6].retry_after_s == pytest.approx(20)
    # as envoyproxy/ratelimit's INCRBY: refused hits count too
    assert (ds[5].before, ds[5].after, ds[6].after) == (5, 6, 7)
    [d] = await limiter.check([Check(n, rule)], now_us=T0 + 20 * S)
    assert d.allowed and d.remaining == 4


async def test_fixed_window_admits_twice_the_limit_across_a_boundary(limiter: RateLimiter) -> None:
    """Its known weakness: 5 at the end of one window, 5 at the start of the next."""
    n, rule = name(), Rule(5, 60)
    before = await admitted(limiter, n, rule, T0 + 19 * S, 10)
    after = await admitted(limiter, n, rule, T0 + 21 * S, 10)
    assert before + after == 10  # 10 within 2 seconds under a limit of 5 per minute


async def test_sliding_window_weights_the_previous_window(limiter: RateLimiter) -> None:
    n, rule = name(), Rule(10, 60, Algorithm.SLIDING_WINDOW)
    w0 = T0 - 40 * S  # window start
    assert await admitted(limiter, n, rule, w0 + 50 * S, 12) == 10
    # 18 s into the next window: 10 * 42/60 = 7 of the previous still count
    [d] = await limiter.check([Check(n, rule)], now_us=w0 + 78 * S)
    assert d.allowed and d.before == 7 and d.after == 8 and d.remaining == 2
    assert await admitted(limiter, n, rule, w0 + 78 * S, 2) == 2
    [d] = await limiter.check([Check(n, rule)], now_us=w0 + 78 * S)
    assert not d.allowed and d.after == 10  # refused, not counted
    # room for one once the previous share rounds to 6: below 6.5, just after 81 s
    assert d.retry_after_s == pytest.approx(3, abs=1e-5) and d.retry_after_s > 3
    assert await admitted(limiter, n, rule, w0 + 81 * S, 1) == 0  # 6.5 rounds to 7
    assert await admitted(limiter, n, rule, w0 + 81 * S + 1, 2) == 1


@pytest.mark.parametrize("limit", [5, 100])
async def test_sliding_window_admits_exactly_the_limit_per_window_under_a_flood(
        limiter: RateLimiter, limit: int) -> None:
    """A request every 2 ms for 4 windows: each window after the first holds the limit, evenly spread."""
    n, rule = name(), Rule(limit, 1, Algorithm.SLIDING_WINDOW)
    per: dict[int, list[int]] = {}
    for t in range(T0, T0 + 4 * S, 2000):
        [d] = await limiter.check([Check(n, rule)], now_us=t)
        if d.allowed:
            per.setdefault((t - T0) // S, []).append(t)
    assert [len(per[w]) for w in range(4)] == [limit] * 4
    # after the first window's burst, no sliding 1-s span holds more than the limit
    steady = sorted(t for w in (1, 2, 3) for t in per[w])
    assert max(sum(1 for u in steady if t <= u < t + S) for t in steady) == limit


async def test_sliding_window_refuses_the_boundary_burst(limiter: RateLimiter) -> None:
    """The boundary burst that fixed windows allow is refused here."""
    n, rule = name(), Rule(5, 60, Algorithm.SLIDING_WINDOW)
    before = await admitted(limiter, n, rule, T0 + 19 * S, 10)
    after = await admitted(limiter, n, rule, T0 + 21 * S, 10)
    assert (before, after) == (5, 0)  # 5 * 59/60 = 4.9 rounds to 5: still counts
    # a whole window later the previous count is gone
    assert await admitted(limiter, n, rule, T0 + 80 * S, 10) == 5


async def test_sliding_window_forgets_a_window_older_than_the_previous(limiter: RateLimiter) -> None:
    n, rule = name(), Rule(3, 10, Algorithm.SLIDING_WINDOW)
    assert await admitted(limiter, n, rule, T0, 3) == 3
    assert await admitted(limiter, n, rule, T0 + 25 * S, 5) == 3


async def test_token_bucket_bursts_then_refills_at_the_rate(limiter: RateLimiter) -> None:
    n, rule = name(), Rule(10, 60, Algorithm.TOKEN_BUCKET, burst=5)  # one token every 6 s
    ds = [(await limiter.check([Check(n, rule)], now_us=T0))[0] for _ in range(6)]
    assert [d.allowed for d in ds] == [True] * 5 + [False]
    assert [d.remaining for d in ds[:5]] == [4, 3, 2, 1, 0]
    assert ds[5].retry_after_s == pytest.approx(6, abs=1e-3)
    assert ds[4].reset_after_s == pytest.approx(30, abs=1e-3)  # 5 tokens to refill
    assert await admitted(limiter, n, rule, T0 + 5 * S, 3) == 0
    assert await admitted(limiter, n, rule, T0 + 6 * S, 3) == 1
    assert await admitted(limiter, n, rule, T0 + 18 * S, 5) == 2
    # after a long pause the bucket is full again, never fuller
    assert await admitted(limiter, n, rule, T0 + 1000 * S, 10) == 5


async def test_token_bucket_default_burst_is_the_rate(limiter: RateLimiter) -> None:
    n, rule = name(), Rule(4, 1, Algorithm.TOKEN_BUCKET)
    assert await admitted(limiter, n, rule, T0, 10) == 4
    assert await admitted(limiter, n, rule, T0 + S // 4, 10) == 1


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_hits_addend_counts_several_and_zero_only_checks(limiter: RateLimiter,
                                                              algorithm: Algorithm) -> None:
    n, rule = name(), Rule(10, 60, algorithm)
    [d] = await limiter.check([Check(n, rule, hits=7)], now_us=T0)
    assert d.allowed and d.remaining == 3
    [d] = await limiter.check([Check(n, rule, hits=0)], now_us=T0)
    assert d.allowed and d.remaining == 3
    [d] = await limiter.check([Check(n, rule, hits=4)], now_us=T0)
    assert not d.allowed
    [d] = await limiter.check([Check(n, rule, hits=3)], now_us=T0)
    assert d.allowed == (algorithm is not Algorithm.FIXED_WINDOW)  # fixed counted the refused 4


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_a_limit_of_zero_refuses_everything(limiter: RateLimiter, algorithm: Algorithm) -> None:
    [d] = await limiter.check([Check(name(), Rule(0, 1, algorithm))], now_us=T0)
    assert not d.allowed and d.remaining == 0 and d.retry_after_s > 0


async def test_many_checks_in_one_call_are_independent(limiter: RateLimiter) -> None:
    a, b, c = name(), name(), name()
    checks = [Check(a, Rule(1, 60)), Check(b, Rule(2, 60, Algorithm.SLIDING_WINDOW)),
              Check(c, Rule(3, 60, Algorithm.TOKEN_BUCKET))]
    rounds = [[d.allowed for d in await limiter.check(checks, now_us=T0)] for _ in range(3)]
    assert rounds == [[True, True, True], [False, True, True], [False, False, True]]


async def test_concurrent_calls_share_round_trips_and_decide_as_one_after_another(valkey_url: str) -> None:
    r = redis_conn.connect(valkey_url)
    lim = RateLimiter(r, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_s=5)
    try:
        a, b = name(), name()  # on a cluster, two slots: pipelined beside each other
        ra, rb = Rule(50, 3600), Rule(30, 3600, Algorithm.SLIDING_WINDOW)
        calls = await asyncio.gather(*(lim.check([Check(a, ra), Check(b, rb)]) for _ in range(200)))
        # in the order the calls were made, as if one after another
        assert [ds[0].allowed for ds in calls] == [True] * 50 + [False] * 150
        assert [ds[1].allowed for ds in calls] == [True] * 30 + [False] * 170
        assert [ds[0].remaining for ds in calls[:50]] == list(range(49, -1, -1))
        assert lim.coalescer is not None and lim.coalescer.checks == 400
        assert lim.coalescer.batches <= 2  # not 200 round trips
        # a lone call is not held back for company
        [d] = await lim.check([Check(name(), ra)])
        assert d.allowed and lim.coalescer.checks == 401
    finally:
        await r.aclose()


async def test_over_limit_keys_are_answered_locally(valkey_url: str) -> None:
    r = redis_conn.connect(valkey_url)
    cache = OverLimitCache()
    lim = RateLimiter(r, prefix=f"t{uuid.uuid4().hex[:8]}:", timeout_s=5, local_cache=cache)
    try:
        n, rule = name(), Rule(2, 3600)
        ds = [(await lim.check([Check(n, rule)]))[0] for _ in range(3)]
        assert [d.allowed for d in ds] == [True, True, False] and not ds[2].local
        assert len(cache) == 1
        # Redis's counter stops moving: the next refusals never reach it
        k = redis_key(n, rule.algorithm, lim.prefix)
        count = await r.hget(k, "c")
        for _ in range(20):
            [d] = await lim.check([Check(n, rule)])
            assert not d.allowed and d.local and d.retry_after_s > 0
        assert await r.hget(k, "c") == count == b"3"
    finally:
        await r.aclose()


def test_the_over_limit_cache_counts_from_when_redis_was_asked() -> None:
    """A reply that waited in a busy process must not keep a key refused past its retry time."""
    cache = OverLimitCache()
    now = time.monotonic()
    cache.put("late", 0.5, 0.5, 10, asked_at=now - 1.0)  # asked 1 s ago, retry in 0.5 s: over
    cache.put("fresh", 30.0, 60.0, 10, asked_at=now)
    assert cache.get("late") is None
    hit = cache.get("fresh")
    assert hit is not None and 29 < hit[0] <= 30 and 59 < hit[1] <= 60 and hit[2] == 10


def test_keys_share_a_slot_per_name_and_long_names_are_hashed() -> None:
    from redis.crc import key_slot

    k = redis_key("api_user_42", Algorithm.SLIDING_WINDOW)
    assert k == "{rl:api_user_42}:sw"
    assert key_slot(k.encode()) == key_slot(b"{rl:api_user_42}:fw")
    long = redis_key("x" * 10_000, Algorithm.FIXED_WINDOW)
    assert len(long) < 100 and long.startswith("{rl:h:")
    assert redis_key("a}b", Algorithm.FIXED_WINDOW).startswith("{rl:h:")


def test_rules_refuse_nonsense() -> None:
    for bad in (dict(requests=-1, window_s=1), dict(requests=1, window_s=0),
                dict(requests=1, window_s=1, burst=3)):
        with pytest.raises(ValueError):
            Rule(**bad)  # type: ignore[arg-type]
