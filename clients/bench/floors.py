"""Floor servers: the least a server of each kind can do, measured in the same run.

Run as separate processes (``python -m clients.bench.floors echo|http301``) so
they cost what a real server costs: their own interpreter, their own event
loop, the same loopback. Each binds 127.0.0.1 (port 0 by default: the kernel
picks a free one), prints one JSON line ``{"port": N, "pid": P}`` on stdout
once it accepts connections, and runs until SIGTERM/SIGINT.

- ``echo``: a grpc.aio server with one generic unary handler
  (``grpc.method_handlers_generic_handler``) that returns the request bytes;
  no interceptors, no (de)serializers, no health, no reflection.
  ``--delay-ms`` sleeps in the handler; ``--serial`` serializes the handler
  behind one lock (capacity ``1000/delay_ms`` per second), used by tests to
  build queues on purpose.
- ``http301``: an aiohttp server whose one route answers every GET with a
  fixed 301 and a Location header; no access log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys

ECHO_SERVICE = "sysdesign.bench.v1.EchoService"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
FLOOR_LOCATION = "https://example.com/a/fairly/typical/long/url?with=query&and=params"


def _announce(port: int) -> None:
    sys.stdout.write(json.dumps({"port": port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_echo(host: str, port: int, delay_ms: float, serial: bool) -> None:
    import grpc

    lock = asyncio.Lock()
    delay = delay_ms / 1000.0

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def echo_delayed(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(delay)
        return request

    async def echo_serial(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with lock:
            await asyncio.sleep(delay)
        return request

    handler = echo_serial if serial else (echo_delayed if delay > 0 else echo)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    _announce(bound)
    await _wait_for_signal()
    await server.stop(grace=1.0)


async def serve_http301(host: str, port: int) -> None:
    from aiohttp import web

    headers = {"Location": FLOOR_LOCATION}

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=301, headers=headers)

    app = web.Application()
    app.router.add_get("/{code}", redirect)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock, backlog=1024)
    await site.start()
    _announce(sock.getsockname()[1])
    try:
        await _wait_for_signal()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.floors")
    sub = parser.add_subparsers(dest="kind", required=True)
    echo = sub.add_parser("echo", help="bare grpc.aio echo server")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=0)
    echo.add_argument("--delay-ms", type=float, default=0.0)
    echo.add_argument("--serial", action="store_true")
    http = sub.add_parser("http301", help="bare aiohttp server answering 301")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "echo":
        asyncio.run(serve_echo(args.host, args.port, args.delay_ms, args.serial))
    else:
        asyncio.run(serve_http301(args.host, args.port))


if __name__ == "__main__":
    main()
