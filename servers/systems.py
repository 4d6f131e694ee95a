"""The systems one process can host: `sysdesign serve --services identity,shortener`.

Each entry names its gRPC registration, its public (token-optional) methods,
its tables and its background workers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from servers.chat import service as chat
from servers.drive import service as drive
from servers.feed import service as feed
from servers.identity import service as identity
from servers.media import core as media_core
from servers.media import edge as media_edge
from servers.media import service as media
from servers.media import worker as media_worker
from servers.payments import service as payments
from servers.platform.runtime import Runtime
from servers.ratelimit import service as ratelimit
from servers.rides import service as rides
from servers.shortener import paste
from servers.shortener import service as shortener
from servers.storage.queue import Job, JobQueue
from servers.storage.table import Table


@dataclass(frozen=True)
class Worker:
    name: str
    # The stream it consumes and how it handles a job; None for a worker that
    # only sweeps (e.g. the drive's block collector).
    queue: Callable[[Any], JobQueue] | None
    handler: Callable[[Runtime, Job], Awaitable[None]] | None
    # Periodic work beside the consumer (e.g. re-queueing from an outbox): one
    # pass, returning the seconds to wait before the next.
    sweep: Callable[[Runtime], Awaitable[float]] | None = None
    # Jobs one consumer runs at once (a dispatch mostly waits on a driver).
    concurrency: Callable[[], int] | None = None


@dataclass(frozen=True)
class System:
    name: str
    register: Callable[[grpc.aio.Server, Runtime], list[str]]
    public_methods: set[str]
    tables: list[Table]
    workers: list[Worker] = field(default_factory=list)
    # Routes this system adds to the HTTP edge (media bytes, attachment downloads):
    # called with the aiohttp application and the process's Runtime.
    edge_routes: Callable[[Any, Runtime], None] | None = None
    # Bidirectional streams whose handlers check each message's declared rules
    # themselves, answering a bad one on the stream (servers/platform/validation.py).
    own_stream_checks: set[str] = field(default_factory=set)
    # Client streams of bulk bytes that may run past the 30 s default when the
    # caller's deadline says so (servers/platform/interceptors.py LONG_CALL_SECONDS).
    long_calls: set[str] = field(default_factory=set)
    # Client streams that stay open as long as the caller keeps them (a driver's
    # location pings), bounded only by the caller's deadline.
    open_streams: set[str] = field(default_factory=set)


SYSTEMS: dict[str, System] = {
    "identity": System("identity", identity.register, identity.PUBLIC_METHODS, identity.TABLES),
    "shortener": System(
        "shortener", shortener.register, shortener.PUBLIC_METHODS, shortener.TABLES,
        workers=[Worker("blobgc", paste.blob_gc_queue, paste.handle_blob_gc)],
    ),
    "chat": System("chat", chat.register, chat.PUBLIC_METHODS, chat.TABLES,
                   edge_routes=chat.edge_routes, own_stream_checks={chat.CONNECT_METHOD}),
    # GraphService, PostService and TimelineService, and the fan-out-on-write worker.
    "feed": System(
        "feed", feed.register, feed.PUBLIC_METHODS, feed.TABLES,
        workers=[Worker("fanout", feed.fanout_queue, feed.handle_fanout, sweep=feed.sweep_outbox)],
    ),
    "media": System(
        "media", media.register, media.PUBLIC_METHODS, media.TABLES,
        workers=[Worker("media", media_core.transcode_queue, media_worker.handle_transcode)],
        edge_routes=media_edge.routes,
    ),
    # File sync, and the worker that collects blocks no revision holds any more.
    "drive": System("drive", drive.register, drive.PUBLIC_METHODS, drive.TABLES,
                    workers=[Worker("drivegc", None, None, sweep=drive.sweep)], long_calls=drive.LONG_CALLS),
    # Ride matching, and the dispatcher that offers each ride to drivers in turn (and the surge sweep).
    "rides": System("rides", rides.register, rides.PUBLIC_METHODS, rides.TABLES,
                    workers=[Worker("dispatch", rides.dispatch_queue, rides.handle_dispatch, sweep=rides.sweep,
                                    concurrency=rides.dispatch_concurrency)],
                    own_stream_checks=rides.OWN_STREAM_CHECKS, open_streams=rides.OPEN_STREAMS,
                    edge_routes=rides.edge_routes),
    # Payment intents and the ledger, the reconciler that finishes what a crash left open,
    # and the processor's webhooks on the edge.
    "payments": System("payments", payments.register, payments.PUBLIC_METHODS, payments.TABLES,
                       workers=[Worker("reconciler", None, None, sweep=payments.sweep)],
                       edge_routes=payments.edge_routes),
    # Envoy's envoy.service.ratelimit.v3.RateLimitService (protos/envoy/service/ratelimit/v3).
    "ratelimit": System("ratelimit", ratelimit.register, ratelimit.PUBLIC_METHODS, ratelimit.TABLES),
}

WORKERS: dict[str, Worker] = {w.name: w for s in SYSTEMS.values() for w in s.workers}


def all_tables() -> list[Table]:
    seen: dict[str, Table] = {}
    for s in SYSTEMS.values():
        for t in s.tables:
            seen[t.name] = t
    return list(seen.values())


def select(names: list[str]) -> list[System]:
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown services {unknown}; choose from {sorted(SYSTEMS)}")
    return [SYSTEMS[n] for n in names]
