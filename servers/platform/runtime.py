"""What a process holds: configuration, backends, id generator, token signer.

Every system's servicer is built from one Runtime, so the same code runs in
`sysdesign up` (everything in one process on embedded backends) and in
`sysdesign serve --services X` (one Deployment per service on Kubernetes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from servers.platform import limits
from servers.platform.auth import TokenSigner
from servers.platform.config import Config
from servers.platform.ids import Snowflake, WorkerLease, lease_worker_id
from servers.platform.limits import ApiLimiter
from servers.storage import redis_conn
from servers.storage.backends import open_blob_store, open_table_store
from servers.storage.blob import BlobStore
from servers.storage.table import Table, TableStore

log = structlog.get_logger("sysdesign.runtime")
T = TypeVar("T")


@dataclass
class Runtime:
    config: Config
    redis: Any
    tables: TableStore
    blobs: BlobStore
    snowflake: Snowflake
    signer: TokenSigner
    embedded_valkey: redis_conn.EmbeddedValkey | None = None
    worker_lease: WorkerLease | None = None
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    # Per-process singletons shared by the servicers, the edge and the workers
    # (e.g. one ShortenerCore, so its caches and counters are shared), and what
    # must run before the backends close (flushing buffers).
    shared: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What must run when shutdown starts, once new calls are refused: long-lived
    # streams end here (telling their clients to reconnect elsewhere) instead of
    # holding the drain open for the whole grace period.
    drainers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def singleton(self, name: str, factory: Callable[[], T]) -> T:
        if name not in self.shared:
            self.shared[name] = factory()
        return self.shared[name]  # type: ignore[no-any-return]

    @property
    def api_limits(self) -> ApiLimiter | None:
        """The process's tiered API limits (servers/platform/limits.py), None when turned off."""
        if "api_limits" not in self.shared:
            found = limits.load()
            self.shared["api_limits"] = None if found is None else ApiLimiter.create(found, self.redis)
        return self.shared["api_limits"]  # type: ignore[no-any-return]

    @classmethod
    async def open(cls, config: Config, *, tables: list[Table], start_embedded: bool = True) -> Runtime:
        embedded = None
        url = config.redis_url
        if not url:
            if not start_embedded:
                url = redis_conn.redis_url(config)
            else:
                embedded = redis_conn.EmbeddedValkey(config.valkey_dir)
                url = await asyncio.to_thread(embedded.start)
                log.info("embedded_valkey_started", url=url, dir=str(config.valkey_dir))
        redis = redis_conn.connect(url, cluster=config.redis_cluster and embedded is None)
        table_store = open_table_store(config)
        if not config.cassandra_hosts:
            # Embedded tables are created on start; on Cassandra `sysdesign migrate --apply`
            # (the Kubernetes schema Job) owns the schema.
            await table_store.create_tables(tables)
        blob_store = open_blob_store(config)
        lease = None
        if config.worker_id is not None:
            worker_id = config.worker_id
        else:
            lease = await lease_worker_id(redis)
            worker_id = lease.worker_id
        rt = cls(
            config=config,
            redis=redis,
            tables=table_store,
            blobs=blob_store,
            snowflake=Snowflake(worker_id),
            signer=TokenSigner(config.secret(), config.token_ttl_seconds),
            embedded_valkey=embedded,
            worker_lease=lease,
        )
        if lease is not None:
            rt.background.append(asyncio.create_task(lease.refresh_forever()))
        return rt

    async def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception as exc:
                log.warning("closer_failed", error=repr(exc))
        for t in self.background:
            t.cancel()
        for t in self.background:
            with contextlib.suppress(BaseException):
                await t
        if self.worker_lease is not None:
            with contextlib.suppress(Exception):
                await self.worker_lease.release()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        with contextlib.suppress(Exception):
            await self.tables.close()
        with contextlib.suppress(Exception):
            await self.blobs.close()
        if self.embedded_valkey is not None:
            await asyncio.to_thread(self.embedded_valkey.stop)
