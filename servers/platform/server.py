"""Process bootstrap: one grpc.aio server hosting any subset of the systems,
optionally with their workers and the HTTP edge, and graceful shutdown.

Shutdown on SIGTERM/SIGINT: every health status goes NOT_SERVING (so load
balancers and Kubernetes readiness stop sending), the edge stops accepting,
the gRPC server drains in-flight calls within the grace period, workers finish
their current job, then the backends close (the embedded Valkey last, with
its AOF flushed).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from servers import systems
from servers.platform import limits
from servers.platform.config import Config
from servers.platform.interceptors import PlatformInterceptor
from servers.platform.logs import access_log
from servers.platform.metrics import BACKEND_UP, QUEUE_DEPTH, serve_metrics
from servers.platform.reflection import enable_reflection
from servers.platform.runtime import Runtime
from servers.storage.cassandra_table import CassandraTableStore

log = structlog.get_logger("sysdesign.server")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Receive windows of a fixed 1 MiB per stream instead of BDP probing, which on a fast link
    # grows them until a busy server buffers hundreds of MiB of client-streamed bytes (drive
    # block uploads) it has not read yet; 1 MiB a round trip still fills a WAN link.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1024 * 1024),
]


@dataclass
class Stack:
    config: Config
    services: list[str]
    edge: bool = False
    workers: list[str] = field(default_factory=list)
    grpc_enabled: bool = True

    rt: Runtime | None = None
    server: grpc.aio.Server | None = None
    health: health.aio.HealthServicer | None = None  # type: ignore[name-defined]
    service_names: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None
    grpc_port: int = 0
    _serving: bool = field(default=True, init=False)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def start(self) -> None:
        selected = systems.select(self.services)
        limits.load()  # a bad limits file stops the start before any backend opens
        tables = systems.all_tables()  # every table, so a later `serve` of another subset finds them
        self.rt = rt = await Runtime.open(self.config, tables=tables)
        if isinstance(rt.tables, CassandraTableStore):
            rt.tables.expect_tables(tables)
        public: set[str] = set()
        own_checks: set[str] = set()
        long_calls: set[str] = set()
        open_streams: set[str] = set()
        for s in selected:
            public |= s.public_methods
            own_checks |= s.own_stream_checks
            long_calls |= s.long_calls
            open_streams |= s.open_streams

        if self.grpc_enabled:
            self.server = grpc.aio.server(options=GRPC_OPTIONS)
            platform = PlatformInterceptor(rt.signer, public, access_log=self.config.access_log,
                                          own_stream_checks=own_checks, limits=rt.api_limits,
                                          long_calls=long_calls, open_streams=open_streams)
            registrar = platform.registrar(self.server)
            for s in selected:
                self.service_names += s.register(registrar, rt)  # type: ignore[arg-type]
            self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
            # The servicer starts with the overall status SERVING: hold it back until
            # the backends answer and every service's own status is set (_set_health).
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            enable_reflection(
                [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                self.server,
            )
            host, port = self.config.grpc_host_port
            self.grpc_port = self.server.add_insecure_port(f"{host}:{port}")
            if self.grpc_port == 0:
                raise RuntimeError(f"could not bind gRPC to {host}:{port}")
            await self.server.start()
            log.info("grpc_listening", addr=f"{host}:{self.grpc_port}", services=self.service_names)

        if self.edge:
            from servers.edge.app import build_app

            self.runner = web.AppRunner(build_app(rt), access_log=None, handle_signals=False)
            await self.runner.setup()
            host, port = self.config.http_host_port
            await web.TCPSite(self.runner, host, port, reuse_address=True).start()
            log.info("edge_listening", addr=f"http://{host}:{port}")

        if self.grpc_enabled:
            # SERVING only once every backend answers (on Cassandra: once the
            # schema Job has created the tables) and the edge listens too, so a
            # readiness probe holds traffic back until the whole process is up.
            self._serving = await self._backends_ok()
            await self._set_health(self._serving)

        for name in self.workers:
            w = systems.WORKERS[name]
            self.tasks.append(asyncio.create_task(self._run_worker(w), name=f"worker-{name}"))
            log.info("worker_started", worker=name)

        if mh := self.config.metrics_host_port:
            try:
                serve_metrics(*mh)
                log.info("metrics_listening", addr=f"http://{mh[0]}:{mh[1]}/metrics")
            except OSError as exc:
                log.warning("metrics_port_unavailable", addr=self.config.metrics_addr, error=str(exc))
        self.tasks.append(asyncio.create_task(self._monitor(), name="health-monitor"))
        # Everything allocated so far lives for the whole process: keep it out of
        # the collector's way, and collect the young generation less often (the
        # request path allocates many short-lived objects, few cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)

    async def _run_worker(self, w: systems.Worker) -> None:
        assert self.rt is not None
        rt = self.rt
        if w.queue is None or w.handler is None:
            await self._sweep(w)
            return
        queue = w.queue(rt.redis)
        handler = w.handler
        await queue.ensure_group()
        consumer = f"{w.name}-{rt.snowflake.worker_id}"

        async def handle(job: Any) -> None:
            await handler(rt, job)

        sweeper = asyncio.create_task(self._sweep(w), name=f"sweep-{w.name}") if w.sweep else None
        try:
            await queue.run(consumer, handle, stop=self.stop_event,
                            concurrency=w.concurrency() if w.concurrency else 1)
        finally:
            if sweeper is not None:
                with contextlib.suppress(BaseException):
                    await sweeper

    async def _sweep(self, w: systems.Worker) -> None:
        assert self.rt is not None and w.sweep is not None
        while not self.stop_event.is_set():
            try:
                delay = await w.sweep(self.rt)
            except Exception as exc:
                log.warning("sweep_failed", worker=w.name, error=repr(exc))
                delay = 5.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)

    async def _set_health(self, serving: bool) -> None:
        if self.health is None:
            return
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        # The overall status ("") goes SERVING last and NOT_SERVING first, so whoever
        # waits for it never finds a service whose own status is not set yet.
        names = [*self.service_names, ""] if serving else ["", *self.service_names]
        for name in names:
            await self.health.set(name, status)

    async def _drain(self) -> None:
        if self.rt is None:
            return
        for drainer in self.rt.drainers:
            try:
                await drainer()
            except Exception as exc:
                log.warning("drainer_failed", error=repr(exc))

    async def _backends_ok(self) -> bool:
        assert self.rt is not None
        rt = self.rt
        ok = True
        for name, ping in (("redis", rt.redis.ping), ("tables", rt.tables.ping),
                           ("blobs", rt.blobs.ping)):
            try:
                await asyncio.wait_for(ping(), timeout=2)
                BACKEND_UP.labels(name).set(1)
            except Exception as exc:
                BACKEND_UP.labels(name).set(0)
                ok = False
                log.warning("backend_unreachable", backend=name, error=str(exc))
        return ok

    async def _monitor(self) -> None:
        """NOT_SERVING while a backend is unreachable; queue depths as metrics."""
        assert self.rt is not None
        rt = self.rt
        serving = self._serving
        while not self.stop_event.is_set():
            ok = await self._backends_ok()
            if ok != serving:
                serving = ok
                await self._set_health(ok)
                log.info("health_changed", serving=ok)
            if ok:
                for wname in self.workers:
                    make_queue = systems.WORKERS[wname].queue
                    if make_queue is None:
                        continue
                    with contextlib.suppress(Exception):
                        depth = await make_queue(rt.redis).depth()
                        for state, n in depth.items():
                            QUEUE_DEPTH.labels(wname, state).set(n)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=2)

    async def stop(self) -> None:
        grace = self.config.shutdown_grace_seconds
        log.info("shutting_down", grace_seconds=grace)
        await self._set_health(False)
        self.stop_event.set()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.server is not None:
            # stop() refuses new calls at once and then waits up to `grace` for the
            # calls in flight; the drainers end the streams that would never finish.
            stopping = asyncio.create_task(self.server.stop(grace))
            await asyncio.sleep(0)
            await self._drain()
            await stopping
        else:
            await self._drain()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, timeout=grace)
        if self.rt is not None:
            await self.rt.close()
        access_log.flush()
        log.info("stopped")


async def run_stack(stack: Stack, ready: Any = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.start()
        if ready is not None:
            ready(stack)
        await stop.wait()
    finally:
        await stack.stop()
