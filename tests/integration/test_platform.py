"""The server platform: health per service, reflection, request ids, metrics, INTERNAL never leaks."""

from __future__ import annotations

import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from tests.stack import StackProcess

SERVICES = [
    "sysdesign.identity.v1.IdentityService",
    "sysdesign.shortener.v1.ShortenerService",
    "sysdesign.shortener.v1.PasteService",
    "envoy.service.ratelimit.v3.RateLimitService",
]


def test_health_per_service(stack: StackProcess) -> None:
    stub = health_pb2_grpc.HealthStub(stack.channel())
    for name in ["", *SERVICES]:
        resp = stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
    try:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        raise AssertionError("expected NOT_FOUND")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service(stack: StackProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel())
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert set(SERVICES) | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    # describe: the file descriptor of a service is served (what `grpcurl describe` needs)
    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICES[1])
    resp = next(iter(stub.ServerReflectionInfo(iter([req]))))
    assert resp.file_descriptor_response.file_descriptor_proto


def test_request_id_is_echoed(stack: StackProcess) -> None:
    stub = pbg.ShortenerServiceStub(stack.channel())
    try:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code="nosuchcode1"),
                             metadata=(("x-request-id", "test-rid-123"),))
        raise AssertionError("expected NOT_FOUND")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "test-rid-123") in tuple(e.trailing_metadata())  # type: ignore[attr-defined]
    # the access-log line is written as the call completes: give it a moment
    for _ in range(50):
        if '"request_id": "test-rid-123"' in stack.logs():
            break
        time.sleep(0.1)
    assert '"request_id": "test-rid-123"' in stack.logs()


def test_metrics_side_port(stack: StackProcess) -> None:
    stub = pbg.ShortenerServiceStub(stack.channel())
    try:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code="nosuchcode2"))
    except grpc.RpcError:
        pass
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert 'sysdesign_grpc_requests_total{code="NOT_FOUND",method="/sysdesign.shortener.v1.ShortenerService/ResolveShortUrl"}' in body
    assert "sysdesign_grpc_request_duration_seconds_bucket" in body
    assert 'sysdesign_backend_up{backend="redis"} 1.0' in body

