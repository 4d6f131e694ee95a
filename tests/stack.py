"""Starts the real stack (`sysdesign up`) as a subprocess on free loopback ports."""

from __future__ import annotations

import atexit
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.loopback import free_port

ROOT = Path(__file__).resolve().parent.parent

# Which table adapter the stacks of this test run use: "sqlite" (a file under
# each stack's data dir) or "cassandra" (a keyspace of its own per data dir on
# the node that `scripts/cassandra.py run` started; `pytest --tables=cassandra`).
TABLES_ENV = "SYSDESIGN_TEST_TABLES"


def table_engine() -> str:
    return os.environ.get(TABLES_ENV, "sqlite") or "sqlite"


def cassandra_env(data_dir: str) -> dict[str, str]:
    """The variables that put a stack on the test node, in a keyspace named after its data dir.

    Processes that share a data dir (replicas of one deployment) share the
    keyspace, as they would share the SQLite file.
    """
    hosts = os.environ.get("SYSDESIGN_TEST_CASSANDRA_HOSTS", "")
    if not hosts:
        raise RuntimeError("--tables=cassandra needs the test node: run the tests through "
                           "`scripts/cassandra.py run -- ...` (what `make test` does)")
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return {
        "SYSDESIGN_CASSANDRA_HOSTS": hosts,
        "SYSDESIGN_CASSANDRA_PORT": os.environ.get("SYSDESIGN_TEST_CASSANDRA_PORT", "9042"),
        "SYSDESIGN_CASSANDRA_LOCAL_DC": os.environ.get("SYSDESIGN_TEST_CASSANDRA_LOCAL_DC", ""),
        "SYSDESIGN_CASSANDRA_KEYSPACE": "t_" + digest,
    }


_MIGRATED: set[str] = set()

# Which Redis the stacks use: "standalone" (each stack's own embedded Valkey) or
# "cluster" (`pytest --redis=cluster`): each data dir gets a 3-master Valkey
# cluster of its own, started on first use and stopped at the end of the
# session (stop_stack_clusters), so processes of one deployment (same data dir)
# share it, as they would share the embedded Valkey, and no two deployments
# share queues: one stack's media or fan-out worker would take another's jobs.
# A cluster named in REDIS_CLUSTER_URL_ENV (yours) is used by every stack instead.
REDIS_ENV = "SYSDESIGN_TEST_REDIS"
REDIS_CLUSTER_URL_ENV = "SYSDESIGN_TEST_REDIS_CLUSTER_URL"
REDIS_CLUSTER_GIVEN_ENV = "SYSDESIGN_TEST_REDIS_CLUSTER_GIVEN"

_STACK_CLUSTERS: dict[Path, Any] = {}


def redis_engine() -> str:
    return os.environ.get(REDIS_ENV, "standalone") or "standalone"


def redis_cluster_url(data_dir: str | Path) -> str:
    """The cluster of a data dir's stacks (started on first use)."""
    if os.environ.get(REDIS_CLUSTER_GIVEN_ENV):
        return os.environ[REDIS_CLUSTER_URL_ENV]
    from servers.storage.redis_conn import EmbeddedValkeyCluster

    root = Path(data_dir).resolve()
    cluster = _STACK_CLUSTERS.get(root)
    if cluster is None:
        cluster = EmbeddedValkeyCluster(root.parent / f"{root.name}-valkey-cluster")
        cluster.start()
        if not _STACK_CLUSTERS:
            atexit.register(stop_stack_clusters)  # also if the session fixture never ends
        _STACK_CLUSTERS[root] = cluster
    return str(cluster.url)


def stop_stack_clusters() -> None:
    while _STACK_CLUSTERS:
        _, cluster = _STACK_CLUSTERS.popitem()
        cluster.stop()


def own_redis(data_dir: Path) -> Any:
    """A Redis of a test's own (for tests that FLUSHALL or count keys), not started:
    an embedded Valkey, or under --redis=cluster a 3-master cluster of its own.
    ``url = server.start()``, ``server.stop()``."""
    from servers.storage.redis_conn import EmbeddedValkey, EmbeddedValkeyCluster

    return EmbeddedValkeyCluster(data_dir) if redis_engine() == "cluster" else EmbeddedValkey(data_dir)


def sync_redis(url: str) -> Any:
    """A synchronous client for keyed commands: redis.Redis, or redis.RedisCluster for
    a cluster URL (several seeds)."""
    import redis

    from servers.storage.redis_conn import is_cluster_url, seed_nodes

    if is_cluster_url(url):
        return redis.RedisCluster(startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in seed_nodes(url)])
    return redis.Redis.from_url(url)


def flushall(url: str) -> None:
    """FLUSHALL and SCRIPT FLUSH on every master (as after losing Redis's data and restarting)."""
    from servers.storage.redis_conn import primaries

    for node in primaries(url):
        node.flushall()
        node.script_flush()
        node.close()


def keys(url: str, pattern: str) -> list[bytes]:
    """KEYS on every master."""
    from servers.storage.redis_conn import primaries

    out: list[bytes] = []
    for node in primaries(url):
        out += node.keys(pattern)
        node.close()
    return out



@dataclass
class StackProcess:
    data_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
        env.update({
            "SYSDESIGN_DATA_DIR": str(self.data_dir),
            "SYSDESIGN_GRPC_ADDR": self.grpc_addr,
            "SYSDESIGN_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
            "SYSDESIGN_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
            "SYSDESIGN_SHUTDOWN_GRACE_SECONDS": "5",
            # Tests make calls by the hundred from one address and a few users:
            # the API limits are off but where a test turns them on
            # (tests/integration/test_api_limits.py).
            "SYSDESIGN_API_LIMITS": "off",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")]),
        })
        env.update(self.extra_env)
        if table_engine() == "cassandra" and "SYSDESIGN_CASSANDRA_HOSTS" not in self.extra_env:
            env.update(cassandra_env(env["SYSDESIGN_DATA_DIR"]))
        if redis_engine() == "cluster" and "SYSDESIGN_REDIS_URL" not in self.extra_env:
            env["SYSDESIGN_REDIS_URL"] = redis_cluster_url(env["SYSDESIGN_DATA_DIR"])
            env["SYSDESIGN_REDIS_CLUSTER"] = "1"
        return env

    @property
    def redis_url(self) -> str:
        """The stack's Redis: the configured URL, or the one its embedded Valkey wrote."""
        return self.env().get("SYSDESIGN_REDIS_URL") or (
            self.data_dir / "valkey" / "url").read_text().strip()

    def migrate(self) -> None:
        """On Cassandra the schema is the migration's job (as on Kubernetes): once per keyspace."""
        env = self.env()
        keyspace = env.get("SYSDESIGN_CASSANDRA_KEYSPACE", "")
        if not env.get("SYSDESIGN_CASSANDRA_HOSTS") or keyspace in _MIGRATED:
            return
        out = subprocess.run([sys.executable, "-m", "clients.cli", "migrate", "--apply"], env=env,
                             capture_output=True, cwd=str(ROOT), timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"migrate --apply into {keyspace} failed ({out.returncode}):\n"
                               f"{out.stdout.decode()[-3000:]}{out.stderr.decode()[-3000:]}")
        _MIGRATED.add(keyspace)

    def start(self, args: list[str] | None = None, timeout: float = 120) -> StackProcess:
        cmd = [sys.executable, "-m", "clients.cli", *(args or ["up"])]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.migrate()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT))
        log.close()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"stack exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with grpc.insecure_channel(self.grpc_addr) as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"stack not serving after {timeout}s ({last}):\n{self.logs()}")

    def logs(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def config(self, **overrides: Any) -> Any:
        """The servers' Config as this stack's processes see it (same data dir and engines)."""
        from servers.platform.config import Config

        env, saved = self.env(), dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            return Config(**overrides)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def scan_column(self, table: str, column: str) -> set[object]:
        """Every value of one column of a whole table, read behind the servers' backs.

        A test-only full scan (the table port has none) to assert what was, or
        was not, stored: the stack's SQLite file read-only, or its Cassandra
        keyspace.
        """
        env = self.env()
        if env.get("SYSDESIGN_CASSANDRA_HOSTS"):
            from cassandra.cluster import Cluster

            cluster = Cluster(env["SYSDESIGN_CASSANDRA_HOSTS"].split(","),
                              port=int(env["SYSDESIGN_CASSANDRA_PORT"]))
            try:
                session = cluster.connect()
                ks = env["SYSDESIGN_CASSANDRA_KEYSPACE"]
                return {r[0] for r in session.execute(f"SELECT {column} FROM {ks}.{table}",
                                                      timeout=30)}
            finally:
                cluster.shutdown()
        import sqlite3

        db = sqlite3.connect(f"file:{self.data_dir / 'tables.sqlite3'}?mode=ro", uri=True,
                             timeout=10)
        try:
            return {r[0] for r in db.execute(f"SELECT {column} FROM {table}")}
        finally:
            db.close()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_addr)

    def token(self, username: str) -> str:
        out = subprocess.run([sys.executable, "-m", "clients.cli", "token", username],
                             env=self.env(), capture_output=True, cwd=str(ROOT), timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sysdesign token {username} failed ({out.returncode}):\n"
                               f"{out.stderr.decode()[-3000:]}")
        return out.stdout.decode().strip()
