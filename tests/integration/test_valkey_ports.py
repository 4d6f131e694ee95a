"""The embedded Valkey servers draw their ports from the kernel and draw again when another
process took one first (two stacks starting at once, parallel test workers)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from servers.storage import redis_conn


@pytest.fixture
def taken_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A port another process listens on, handed out as the first 'free' one."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = int(held.getsockname()[1])
    real = redis_conn._free_port
    first = [port]
    monkeypatch.setattr(redis_conn, "_free_port", lambda: first.pop() if first else real())
    yield port
    held.close()


def test_a_single_server_that_loses_its_port_starts_on_another(tmp_path: Path, taken_port: int) -> None:
    server = redis_conn.EmbeddedValkey(tmp_path / "valkey")
    url = server.start()
    try:
        assert f":{taken_port}/" not in url
        client = redis.Redis.from_url(url)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        server.stop()


def test_a_cluster_node_that_loses_its_port_is_started_again(tmp_path: Path, taken_port: int) -> None:
    cluster = redis_conn.EmbeddedValkeyCluster(tmp_path / "cluster")
    url = cluster.start()
    try:
        assert taken_port not in cluster.ports and len(cluster.ports) == 3
        client = redis.RedisCluster.from_url(url.split(",")[0])
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        cluster.stop()
