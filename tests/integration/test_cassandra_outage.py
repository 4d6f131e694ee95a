"""A real Cassandra node dies under write load and comes back.

Runs in the Cassandra pass (`pytest --tables=cassandra`, part of `make test`)
on a node of its own, so killing it disturbs no other test. What must hold:

- every write acknowledged before the node died is readable after it is back
  (the node syncs its commit log before acknowledging, so even SIGKILL loses
  nothing acknowledged);
- calls during the outage answer UNAVAILABLE (retry later), never INTERNAL;
- health goes NOT_SERVING while the node is down and SERVING once it is back;
- writes work again after the restart without restarting the server (the
  driver reconnects and re-prepares its statements on the new node process).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata
from tests.stack import StackProcess, table_engine

pytestmark = pytest.mark.tables

SERVICE = "sysdesign.shortener.v1.ShortenerService"


@pytest.fixture(scope="module")
def own_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    if table_engine() != "cassandra":
        pytest.skip("runs in the Cassandra pass (pytest --tables=cassandra)")
    from clients import cassandra_node

    node_dir = tmp_path_factory.mktemp("own-cassandra")
    st = cassandra_node.start(node_dir)
    yield node_dir, st
    cassandra_node.stop(node_dir)


def health_status(stack: StackProcess) -> int:
    try:
        with stack.channel() as ch:
            return int(health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=2).status)
    except grpc.RpcError:
        return -1


def wait_for(what: str, cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_node_killed_and_restarted_under_write_load(
    own_node: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from clients import cassandra_node

    node_dir, st = own_node
    env = {
        "SYSDESIGN_CASSANDRA_HOSTS": "127.0.0.1",
        "SYSDESIGN_CASSANDRA_PORT": str(st["native_port"]),
        "SYSDESIGN_CASSANDRA_LOCAL_DC": cassandra_node.LOCAL_DC,
        "SYSDESIGN_CASSANDRA_KEYSPACE": "outage",
    }
    stack = StackProcess(tmp_path / "data", extra_env=env)
    stack.start(["serve", "--services", "identity,shortener"], timeout=120)
    try:
        md = grpc_metadata(stack.token("writer"))
        acked: list[str] = []
        failures: Counter[grpc.StatusCode] = Counter()
        stop = threading.Event()

        def load() -> None:
            with stack.channel() as ch:
                stub = pbg.ShortenerServiceStub(ch)
                i = 0
                while not stop.is_set():
                    alias = f"wr{i:06d}"
                    i += 1
                    try:
                        stub.CreateShortUrl(pb.CreateShortUrlRequest(
                            long_url=f"https://example.com/{alias}", custom_alias=alias),
                            metadata=md, timeout=15)
                        acked.append(alias)
                    except grpc.RpcError as e:
                        failures[e.code()] += 1
                    time.sleep(0.02)

        writer = threading.Thread(target=load, daemon=True)
        writer.start()
        try:
            wait_for("writes before the outage", lambda: len(acked) >= 30, 60)
            os.kill(int(st["pid"]), signal.SIGKILL)
            wait_for("NOT_SERVING", lambda: health_status(stack) == health_pb2.HealthCheckResponse.NOT_SERVING, 30)
            wait_for("calls refused during the outage", lambda: sum(failures.values()) >= 3, 60)
            before_restart = len(acked)

            restarted = cassandra_node.start(node_dir)
            assert restarted["native_port"] == st["native_port"], "the node came back on another port"
            wait_for("SERVING again", lambda: health_status(stack) == health_pb2.HealthCheckResponse.SERVING, 120)
            wait_for("writes after the restart", lambda: len(acked) >= before_restart + 30, 120)
        finally:
            stop.set()
            writer.join(30)

        assert failures, "no call failed while the node was down"
        assert set(failures) == {grpc.StatusCode.UNAVAILABLE}, f"outage answered {dict(failures)}"
        stored = {str(c) for c in stack.scan_column("short_urls", "code")}
        lost = [a for a in acked if a not in stored]
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    finally:
        code = stack.stop()
        assert code == 0, f"server exited with {code}:\n{stack.logs()}"
