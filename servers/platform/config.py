"""Configuration from environment variables (12-factor).

Every backend has an embedded default; setting its variable switches to the
scale-out adapter:

| variable                         | default                         |
|----------------------------------|---------------------------------|
| SYSDESIGN_DATA_DIR               | ./data                          |
| SYSDESIGN_GRPC_ADDR              | 127.0.0.1:50051                 |
| SYSDESIGN_HTTP_ADDR              | 127.0.0.1:8080                  |
| SYSDESIGN_METRICS_ADDR           | 127.0.0.1:9464 (empty: off)     |
| SYSDESIGN_PUBLIC_URL             | http://<HTTP_ADDR>              |
| SYSDESIGN_REDIS_URL              | embedded Valkey under DATA_DIR  |
|                                  | (comma-separated seed nodes: a  |
|                                  | Redis Cluster)                  |
| SYSDESIGN_REDIS_CLUSTER          | 0 (1: the URL is a cluster seed)|
| SYSDESIGN_CASSANDRA_HOSTS        | SQLite file under DATA_DIR (or  |
|                                  | the local node of `sysdesign up |
|                                  | --cassandra`, see below)        |
| SYSDESIGN_CASSANDRA_KEYSPACE     | sysdesign                       |
| SYSDESIGN_CASSANDRA_PORT         | 9042                            |
| SYSDESIGN_CASSANDRA_LOCAL_DC     | (driver default)                |
| SYSDESIGN_S3_ENDPOINT            | filesystem under DATA_DIR       |
| SYSDESIGN_S3_BUCKET              | sysdesign                       |
| SYSDESIGN_S3_REGION              | us-east-1                       |
| SYSDESIGN_TOKEN_SECRET           | generated once into DATA_DIR    |
| SYSDESIGN_TOKEN_TTL_SECONDS      | 3600                            |
| SYSDESIGN_WORKER_ID              | leased from Redis               |
| SYSDESIGN_LOG_LEVEL              | info                            |
| SYSDESIGN_ACCESS_LOG             | 1 (one JSON line per RPC)       |
| SYSDESIGN_SHUTDOWN_GRACE_SECONDS | 10                              |
| SYSDESIGN_CACHE_TTL_SECONDS      | 3600                            |
| SYSDESIGN_TRUSTED_PROXIES        | 127.0.0.1,::1 (X-Forwarded-For) |
| SYSDESIGN_API_LIMITS             | on (off: no API rate limits)    |
| SYSDESIGN_API_LIMITS_FILE        | the defaults of limits.py       |

A data dir that `sysdesign up --cassandra` has used keeps its tables on that
local Cassandra node (``DATA_DIR/cassandra/node.json`` names its port): every
later command with that data dir (``up``, ``token``, ``migrate``) uses the node
too, so the data never silently splits between two engines.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An integer setting from the environment: ``default`` when unset, ValueError below ``minimum``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


def local_cassandra_node(data_dir: Path) -> dict[str, object] | None:
    """The local node a data dir's tables live on (``sysdesign up --cassandra``), if any."""
    try:
        node = json.loads((data_dir / "cassandra" / "node.json").read_text())
    except (OSError, ValueError):
        return None
    return node if isinstance(node, dict) and isinstance(node.get("native_port"), int) else None


@dataclass
class Config:
    data_dir: Path = field(default_factory=lambda: Path(_env("SYSDESIGN_DATA_DIR", "data")).resolve())
    grpc_addr: str = field(default_factory=lambda: _env("SYSDESIGN_GRPC_ADDR", "127.0.0.1:50051"))
    http_addr: str = field(default_factory=lambda: _env("SYSDESIGN_HTTP_ADDR", "127.0.0.1:8080"))
    metrics_addr: str = field(default_factory=lambda: _env("SYSDESIGN_METRICS_ADDR", "127.0.0.1:9464"))
    public_url: str = field(default_factory=lambda: _env("SYSDESIGN_PUBLIC_URL"))
    redis_url: str = field(default_factory=lambda: _env("SYSDESIGN_REDIS_URL"))
    # A Redis Cluster: the URL names one or more of its nodes (comma-separated).
    redis_cluster: bool = field(
        default_factory=lambda: _env("SYSDESIGN_REDIS_CLUSTER", "0") not in ("0", "false", "no", "")
        or "," in _env("SYSDESIGN_REDIS_URL")
    )
    cassandra_hosts: list[str] = field(
        default_factory=lambda: [h for h in _env("SYSDESIGN_CASSANDRA_HOSTS").split(",") if h]
    )
    cassandra_port: int = field(default_factory=lambda: int(_env("SYSDESIGN_CASSANDRA_PORT", "9042")))
    cassandra_keyspace: str = field(default_factory=lambda: _env("SYSDESIGN_CASSANDRA_KEYSPACE", "sysdesign"))
    cassandra_local_dc: str = field(default_factory=lambda: _env("SYSDESIGN_CASSANDRA_LOCAL_DC"))
    s3_endpoint: str = field(default_factory=lambda: _env("SYSDESIGN_S3_ENDPOINT"))
    s3_bucket: str = field(default_factory=lambda: _env("SYSDESIGN_S3_BUCKET", "sysdesign"))
    s3_region: str = field(default_factory=lambda: _env("SYSDESIGN_S3_REGION", "us-east-1"))
    token_secret: str = field(default_factory=lambda: _env("SYSDESIGN_TOKEN_SECRET"))
    token_ttl_seconds: int = field(default_factory=lambda: int(_env("SYSDESIGN_TOKEN_TTL_SECONDS", "3600")))
    worker_id: int | None = field(
        default_factory=lambda: int(v) if (v := _env("SYSDESIGN_WORKER_ID")) else None
    )
    log_level: str = field(default_factory=lambda: _env("SYSDESIGN_LOG_LEVEL", "info"))
    access_log: bool = field(default_factory=lambda: _env("SYSDESIGN_ACCESS_LOG", "1") not in ("0", "false", "no"))
    shutdown_grace_seconds: float = field(
        default_factory=lambda: float(_env("SYSDESIGN_SHUTDOWN_GRACE_SECONDS", "10"))
    )
    cache_ttl_seconds: int = field(default_factory=lambda: int(_env("SYSDESIGN_CACHE_TTL_SECONDS", "3600")))
    # Peers whose X-Forwarded-For the edge believes (an ingress, a CDN); nobody else's.
    trusted_proxies: list[str] = field(
        default_factory=lambda: [p for p in _env("SYSDESIGN_TRUSTED_PROXIES", "127.0.0.1,::1").split(",") if p]
    )

    def __post_init__(self) -> None:
        self.cassandra_hosts_from_env = bool(self.cassandra_hosts)
        if not self.cassandra_hosts:
            node = local_cassandra_node(self.data_dir)
            if node is not None:
                self.cassandra_hosts = ["127.0.0.1"]
                self.cassandra_port = int(str(node["native_port"]))
                self.cassandra_local_dc = self.cassandra_local_dc or "datacenter1"

    cassandra_hosts_from_env: bool = field(default=False, init=False, repr=False)

    @property
    def cassandra_node_dir(self) -> Path:
        """Where `sysdesign up --cassandra` keeps its local node."""
        return self.data_dir / "cassandra"

    @property
    def grpc_host_port(self) -> tuple[str, int]:
        return _split_addr(self.grpc_addr)

    @property
    def http_host_port(self) -> tuple[str, int]:
        return _split_addr(self.http_addr)

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        return _split_addr(self.metrics_addr) if self.metrics_addr else None

    @property
    def edge_base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.http_host_port
        return f"http://{host}:{port}"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "tables.sqlite3"

    @property
    def blob_root(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def valkey_dir(self) -> Path:
        return self.data_dir / "valkey"

    def secret(self) -> bytes:
        """The token-signing secret: the variable, or one generated once and kept in DATA_DIR."""
        if self.token_secret:
            return self.token_secret.encode()
        path = self.data_dir / "token-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(48))
            tmp.chmod(0o600)
            try:
                os.link(tmp, path)  # first writer wins, concurrent starters agree
            except FileExistsError:
                pass
            tmp.unlink(missing_ok=True)
        return path.read_text().strip().encode()
