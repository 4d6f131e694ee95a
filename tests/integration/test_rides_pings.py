"""Pings grouped into batches over a real Valkey (or cluster): each ping still gets
its own verdict, and a batch lays drivers out exactly as single pings do."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers.rides.drivers import DriverIndex, PingArgs, PingBatcher, PingRefused
from servers.rides.geo import RidesSettings
from servers.storage.redis_conn import connect
from tests.stack import own_redis

pytestmark = pytest.mark.redis_cluster


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = own_redis(Path(tmp_path_factory.mktemp("valkey")))
    url = server.start()
    yield url
    server.stop()


def test_a_batch_gives_each_ping_its_own_verdict(redis_url: str) -> None:
    async def go() -> None:
        redis = connect(redis_url)
        index = DriverIndex(redis, RidesSettings())
        batcher = PingBatcher(index)
        t0 = 1_800_000_000_000
        try:
            # 300 drivers at once (several batches), along a street in Lisbon.
            first = await asyncio.gather(*(batcher.ping(PingArgs(
                9_000 + i, 38.7223, -9.1393 + i * 1e-4, 90.0, 5.0, t0, t0)) for i in range(300)))
            assert first == ["available"] * 300
            # Then one batch that mixes good pings with one going back in time and one
            # jumping 50 km in a second: only those two are refused.
            results = await asyncio.gather(
                *(batcher.ping(PingArgs(9_000 + i, 38.7224, -9.1393 + i * 1e-4, 90.0, 5.0, t0 + 1000, t0 + 1000))
                  for i in range(2, 300)),
                batcher.ping(PingArgs(9_000, 38.7223, -9.1393, 90.0, 5.0, t0 - 1000, t0 + 1000)),
                batcher.ping(PingArgs(9_001, 39.1723, -9.1392, 90.0, 5.0, t0 + 1000, t0 + 1000)),
                return_exceptions=True)
            assert results[:-2] == ["available"] * 298
            back, jump = results[-2:]
            assert isinstance(back, PingRefused) and back.field == "time"
            assert isinstance(jump, PingRefused) and jump.field == "position"
            near = await index.nearby(38.7223, -9.1393 + 150 * 1e-4, t0 + 1000, count=5, radius_m=500)
            assert len(near) == 5 and all(9_000 <= n.driver_id < 9_300 for n in near)
            # The refused ones kept their last good position.
            v = await index.view(9_001)
            assert v is not None and abs(v.lat - 38.7223) < 1e-9
        finally:
            await batcher.close()
            await redis.aclose()

    asyncio.run(go())


def test_nearby_in_a_dense_cell_is_still_the_nearest(redis_url: str) -> None:
    """Over 4x count drivers in the cell: the script first searches a smaller circle;
    the answer must still be exactly the nearest within the radius."""
    import math
    import random

    async def go() -> None:
        redis = connect(redis_url)
        index = DriverIndex(redis, RidesSettings())
        batcher = PingBatcher(index)
        rng = random.Random(5)
        t0 = 1_800_000_100_000
        lat0, lng0 = 38.7000, -9.1800
        spots = {20_000 + i: (lat0 + rng.uniform(-0.01, 0.01), lng0 + rng.uniform(-0.01, 0.01))
                 for i in range(800)}
        try:
            await asyncio.gather(*(batcher.ping(PingArgs(d, la, ln, 0.0, 0.0, t0, t0))
                                   for d, (la, ln) in spots.items()))

            def dist(la: float, ln: float) -> float:
                return math.hypot((la - lat0) * 111_320, (ln - lng0) * 111_320 * math.cos(math.radians(lat0)))

            want = sorted(spots, key=lambda d: dist(*spots[d]))[:8]
            got = await index.nearby(lat0, lng0, t0, count=8, radius_m=3000)
            assert [n.driver_id for n in got] == want
            # Far out in the same spread, with few drivers within reach: the full radius is used.
            edge = await index.nearby(lat0 + 0.02, lng0, t0, count=8, radius_m=1500)
            assert [n.driver_id for n in edge] == sorted(
                (d for d in spots if math.hypot((spots[d][0] - lat0 - 0.02) * 111_320,
                                                (spots[d][1] - lng0) * 111_320 * math.cos(math.radians(lat0)))
                 <= 1500), key=lambda d: math.hypot((spots[d][0] - lat0 - 0.02) * 111_320, (spots[d][1] - lng0)
                                                    * 111_320 * math.cos(math.radians(lat0))))[:8]
        finally:
            await batcher.close()
            await redis.aclose()

    asyncio.run(go())


def test_the_same_ping_twice_is_accepted_once_a_different_one_at_that_time_is_not(redis_url: str) -> None:
    """A pipeline resent after a lost reply runs its scripts again: the very same ping
    must not then be refused as going back in time."""
    async def go() -> None:
        redis = connect(redis_url)
        index = DriverIndex(redis, RidesSettings())
        t0 = 1_800_000_200_000
        try:
            ping = PingArgs(30_000, 38.71, -9.14, 10.0, 3.0, t0, t0)
            assert await index.ping_many([ping]) == ["available"]
            assert await index.ping_many([ping]) == ["available"]
            moved = PingArgs(30_000, 38.7101, -9.14, 10.0, 3.0, t0, t0 + 5)
            (out,) = await index.ping_many([moved])
            assert isinstance(out, PingRefused) and out.field == "time"
        finally:
            await redis.aclose()

    asyncio.run(go())
