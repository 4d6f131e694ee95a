"""Health turns NOT_SERVING while Redis is unreachable and SERVING again when it returns."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.storage.redis_conn import EmbeddedValkey
from tests.stack import StackProcess, free_port


def _status(stack: StackProcess, service: str) -> int:
    with stack.channel() as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_for(stack: StackProcess, service: str, want: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _status(stack, service) == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"{service!r} never became {health_pb2.HealthCheckResponse.ServingStatus.Name(want)}")


def test_health_follows_redis(tmp_path: Path) -> None:
    port = free_port()
    valkey = EmbeddedValkey(tmp_path / "valkey", port=port)
    url = valkey.start()
    stack = StackProcess(tmp_path / "data", extra_env={"SYSDESIGN_REDIS_URL": url}).start()
    try:
        svc = "sysdesign.shortener.v1.ShortenerService"
        assert _status(stack, svc) == health_pb2.HealthCheckResponse.SERVING
        valkey.stop()
        _wait_for(stack, svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        _wait_for(stack, "", health_pb2.HealthCheckResponse.NOT_SERVING)
        # a call that needs Redis fails cleanly, not with INTERNAL
        from sysdesign.shortener.v1 import shortener_pb2 as pb
        from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

        with stack.channel() as ch:
            try:
                pbg.ShortenerServiceStub(ch).ResolveShortUrl(pb.ResolveShortUrlRequest(code="abcd"), timeout=10)
                raise AssertionError("expected an error while Redis is down")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{stack.http_base}/abcd", timeout=10)
            raise AssertionError("expected 503 while Redis is down")
        except urllib.error.HTTPError as e:
            assert e.code == 503
        valkey = EmbeddedValkey(tmp_path / "valkey", port=port)
        valkey.start()
        _wait_for(stack, svc, health_pb2.HealthCheckResponse.SERVING)
    finally:
        assert stack.stop() == 0, stack.logs()
        valkey.stop()
