"""The hiredis command packer sends the same bytes as redis-py's own, and works end to end."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from servers.storage.redis_conn import HiredisPackingConnection, connect

CASES = [
    ("GET", "k"),
    ("SET", b"{u:1}:k", "héllo ✓", "PX", 1500),
    ("ZADD", "{h:9}:tl", float(1903123456789123456), "0001903123456789123456:7"),
    ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 2, "a", "b", 800, -3, 0.1, 1.5),
    ("CONFIG GET", "maxmemory"),  # a two-word command name is split, as redis-py does
    ("SET", "k", bytearray(b"\x00\xffbin"), "EX", 10),
    ("SET", "k", memoryview(b"view")),
    ("XADD", "{q:x}", "*", "data", b"x" * 100_000),  # above redis-py's buffer cutoff
]


@pytest.mark.parametrize("args", CASES, ids=[c[0] for c in CASES])
def test_same_bytes_as_redis_py(args: tuple) -> None:
    ours = b"".join(HiredisPackingConnection().pack_command(*args))
    theirs = b"".join(bytes(c) for c in aioredis.Connection().pack_command(*args))
    assert ours == theirs


def test_unpackable_argument_is_a_data_error() -> None:
    with pytest.raises(DataError):
        HiredisPackingConnection().pack_command("SET", "k", {"not": "encodable"})


async def test_round_trip_through_a_real_server(valkey_url: str) -> None:
    r = connect(valkey_url)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(500):
            pipe.zadd("{t:pack}:z", {f"m{i}": float(i) + 0.5})
        pipe.zrange("{t:pack}:z", 0, 2, withscores=True)
        out = await pipe.execute()
        assert out[-1] == [(b"m0", 0.5), (b"m1", 1.5), (b"m2", 2.5)]
        await r.set("{t:pack}:s", "héllo ✓".encode())
        assert (await r.get("{t:pack}:s")).decode() == "héllo ✓"
        conn = await r.connection_pool.get_connection()
        try:
            assert isinstance(conn, HiredisPackingConnection)
        finally:
            await r.connection_pool.release(conn)
    finally:
        await r.delete("{t:pack}:z", "{t:pack}:s")
        await r.aclose()
