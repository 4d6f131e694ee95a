"""The shortener's near cache writes every buffered click to the real Valkey, whenever it was counted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from servers.shortener.nearcache import CachedLink, NearCache
from servers.storage.redis_conn import connect, key

pytestmark = pytest.mark.redis_cluster


@pytest.fixture
async def r(valkey_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(valkey_url)
    yield client
    await client.aclose()


def link() -> CachedLink:
    return CachedLink(long_url="https://example.com/", redirect_type=302, expire_ms=0, visits=0,
                      cached_at=time.monotonic())


async def visits(r: aioredis.Redis, code: str) -> int:
    return int(await r.get(key(f"l:{code}", "visits")) or 0)


async def test_a_click_counted_while_a_flush_is_out_is_written_without_another_click(r: aioredis.Redis) -> None:
    near = NearCache(r, flush_interval=0.02)
    code = "t" + uuid.uuid4().hex[:10]
    in_flight = asyncio.Event()
    release = asyncio.Event()
    send = near._send

    async def slow_send(clicks: dict[str, Any]) -> dict[str, Exception]:
        in_flight.set()
        await release.wait()  # hold the first flush open while the next click is counted
        return await send(clicks)

    near._send = slow_send  # type: ignore[method-assign]
    try:
        near.count(code, link(), "v1", "2026-12-04", "(direct)")
        await asyncio.wait_for(in_flight.wait(), 10)
        near.count(code, link(), "v2", "2026-12-04", "(direct)")  # lands in the next buffer
        release.set()
        for _ in range(500):  # up to 10 s
            if await visits(r, code) >= 2:
                break
            await asyncio.sleep(0.02)
        # No third click and no explicit flush: the second one must still reach Redis.
        assert await visits(r, code) == 2
        assert int(await r.pfcount(key(f"l:{code}", "uv"))) == 2
    finally:
        await near.close()
