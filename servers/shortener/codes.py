"""Short code generation: a counter reserved in blocks, permuted, Base62.

Each server reserves a block of counter values from Redis with one INCRBY
(no Redis round trip per create) and hands them out locally. Every value goes
through a keyed Feistel permutation of [0, 62**width), so consecutive creates
give unrelated codes and the next code cannot be guessed from the last, while
distinct counter values still give distinct codes: a code is never reused.

The end of every block is also recorded in the table store (CODE_BLOCKS); if
Redis ever loses the counter (a flushed or replaced cache) the next
reservation notices it is below the highest block handed out and jumps past it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

from servers.platform.ids import CodePermutation, b62encode
from servers.shortener.tables import CODE_BLOCKS
from servers.storage.redis_conn import key
from servers.storage.table import TableStore

# Raise the counter to at least ARGV[1]; returns the new value.
_RAISE_TO = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then redis.call('SET', KEYS[1], floor) return floor end
return cur
"""


class CodeAllocator:
    def __init__(self, redis: Any, tables: TableStore, *, counter: str, secret: bytes,
                 width: int = 7, block_size: int = 1000) -> None:
        self.redis = redis
        self.tables = tables
        self.counter = counter
        self.width = width
        self.block_size = block_size
        perm_key = hmac.new(secret, f"code-permutation:{counter}".encode(), hashlib.sha256).digest()
        self.permutation = CodePermutation(perm_key, width=width)
        self._redis_key = key(f"ctr:{counter}")
        self._next = 0
        self._end = 0
        self._lock = asyncio.Lock()
        self._raise_to = redis.register_script(_RAISE_TO)

    async def next_code(self) -> str:
        if self._next >= self._end:
            async with self._lock:
                if self._next >= self._end:
                    await self._reserve()
        n = self._next
        self._next += 1
        return b62encode(self.permutation.encode(n), width=self.width)

    async def _reserve(self) -> None:
        page = await self.tables.slice(CODE_BLOCKS, {"counter": self.counter}, limit=1)
        high_water = page.rows[0]["block_end"] if page.rows else 0
        end = int(await self.redis.incrby(self._redis_key, self.block_size))
        if end - self.block_size < high_water:
            # Redis lost the counter: continue above every block ever reserved.
            await self._raise_to(keys=[self._redis_key], args=[high_water])
            end = int(await self.redis.incrby(self._redis_key, self.block_size))
        if end > 62 ** self.width:
            raise RuntimeError(f"code space of counter {self.counter!r} is exhausted")
        await self.tables.put(CODE_BLOCKS, {"counter": self.counter, "block_end": end,
                                            "reserved_ms": int(time.time() * 1000)})
        self._next, self._end = end - self.block_size, end
