"""The rides wake-up signals over a real Valkey (or cluster): keyed waiters, the FIFO
"a driver came free" wake, and the timeout that covers a lost signal."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers.rides.signals import WAKE_PER_FREE, Signals
from servers.storage.redis_conn import connect
from tests.stack import own_redis

pytestmark = pytest.mark.redis_cluster


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = own_redis(Path(tmp_path_factory.mktemp("valkey")))
    url = server.start()
    yield url
    server.stop()


async def _settle(signals: Signals) -> None:
    # The listener subscribes on first use; until then a signal is lost (and waiters
    # would fall back on their timeout), so the tests publish once it is subscribed.
    for _ in range(100):
        with signals.on("d", 0) as w:
            await signals.publish("d:0")
            if await w.wait(0.1):
                return
    raise AssertionError("the signals listener never subscribed")


def test_a_keyed_waiter_wakes_on_its_own_subject_only(redis_url: str) -> None:
    async def go() -> None:
        redis = connect(redis_url)
        here, there = Signals(redis), Signals(redis)  # two processes' worth
        try:
            await _settle(here)
            with here.on("o", 41) as mine, here.on("o", 42) as other:
                await there.publish("o:41")
                assert await mine.wait(10.0)
                assert not await other.wait(0.3)  # nobody signalled 42: its timeout ends the wait
            with here.on("r", 7) as ride:
                assert not await ride.wait(0.2)
                await there.publish("r:7")
                assert await ride.wait(10.0)
        finally:
            await here.close()
            await there.close()
            await redis.aclose()

    asyncio.run(go())


def test_a_free_driver_wakes_the_oldest_waiters_near_that_cell(redis_url: str) -> None:
    async def go() -> None:
        redis = connect(redis_url)
        s = Signals(redis)
        try:
            await _settle(s)
            n = WAKE_PER_FREE + 2
            with s.on_free({"cellB"}) as far:
                waiters = [s.on_free({"cellA", "cellX"}) for _ in range(n)]
                wakes = [w.__enter__() for w in waiters]
                try:
                    await s.publish("f:cellA")
                    results = await asyncio.gather(*(w.wait(2.0) for w in wakes))
                    assert results == [True] * WAKE_PER_FREE + [False] * (n - WAKE_PER_FREE)
                    assert not await far.wait(0.1)
                finally:
                    for w in waiters:
                        w.__exit__(None, None, None)
        finally:
            await s.close()
            await redis.aclose()

    asyncio.run(go())
