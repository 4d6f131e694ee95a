"""clients/service_config.json, the retry policy of every language's client, matches the protos."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import grpc

from clients import sdk

CONFIG = json.loads(Path(sdk.SERVICE_CONFIG).read_text())


def methods() -> dict[str, object]:
    import sysdesign

    out = {}
    for mod in pkgutil.walk_packages(sysdesign.__path__, "sysdesign."):
        if mod.name.endswith("_pb2"):
            for svc in importlib.import_module(mod.name).DESCRIPTOR.services_by_name.values():
                for m in svc.methods:
                    out[f"{svc.full_name}/{m.name}"] = m
    return out


def policy_of(service: str, method: str) -> dict[str, object] | None:
    """The methodConfig gRPC applies: an exact method name wins over a service-wide one."""
    for exact in (True, False):
        for mc in CONFIG["methodConfig"]:
            for name in mc["name"]:
                if name["service"] == service and (name.get("method") == method if exact else "method" not in name):
                    return dict(mc)
    return None


def test_every_name_in_the_config_is_a_real_service_or_method() -> None:
    known = methods()
    services = {k.split("/")[0] for k in known}
    for mc in CONFIG["methodConfig"]:
        for name in mc["name"]:
            assert name["service"] in services, name
            if "method" in name:
                assert f"{name['service']}/{name['method']}" in known, name


def test_every_unary_rpc_has_a_deadline_and_only_idempotent_ones_retry() -> None:
    never_retried = {"RegisterUser", "CreateShortUrl", "CreatePaste", "CreatePost", "CreateConversation",
                     "CreateUpload",
                     # a second attempt would find the work done and answer NOT_FOUND or ALREADY_EXISTS
                     "CreateFolder", "MoveNode", "DeleteNode", "RestoreNode", "UnshareFolder",
                     # money moves: a retry is the caller's, with its idempotency key
                     "CreatePaymentIntent", "ConfirmPaymentIntent", "CapturePaymentIntent",
                     "CancelPaymentIntent", "RefundPayment", "CreateAccount"}
    for full, m in methods().items():
        service, method = full.split("/")
        mc = policy_of(service, method)
        if m.client_streaming or m.server_streaming:  # type: ignore[attr-defined]
            # Streams live as long as the user stays (chat, watches) and resume by their own
            # protocol (Hello replay, committed_bytes): no deadline, no transparent retry.
            assert mc is None, full
            continue
        assert mc is not None and mc["timeout"], full
        if "retryPolicy" in mc:
            assert method not in never_retried, full
            assert mc["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"], full  # type: ignore[index]
        else:
            assert method in never_retried, f"{full} is idempotent but not retried"


def test_the_sdk_channel_retries_an_idempotent_call_and_not_a_create() -> None:
    """A real gRPC server on loopback that answers UNAVAILABLE and counts the attempts."""
    from concurrent import futures

    attempts: dict[str, int] = {}

    def unavailable(name: str):  # type: ignore[no-untyped-def]
        def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
            attempts[name] = attempts.get(name, 0) + 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
        return grpc.unary_unary_rpc_method_handler(handler)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "sysdesign.identity.v1.IdentityService",
        {"Login": unavailable("Login"), "RegisterUser": unavailable("RegisterUser")}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        from sysdesign.identity.v1 import identity_pb2, identity_pb2_grpc

        with sdk.channel(f"127.0.0.1:{port}") as ch:
            stub = identity_pb2_grpc.IdentityServiceStub(ch)
            for call, req in [(stub.RegisterUser, identity_pb2.RegisterUserRequest(username="x", password="y")),
                              (stub.Login, identity_pb2.LoginRequest(username="x", password="y"))]:
                try:
                    call(req, timeout=20)
                    raise AssertionError("an UNAVAILABLE server answered")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    finally:
        server.stop(None)
    max_attempts = CONFIG["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    assert attempts == {"RegisterUser": 1, "Login": max_attempts}, attempts
