"""Small client helpers: a channel to the stack and the bearer-token metadata."""

from __future__ import annotations

import os

import grpc

DEFAULT_ADDR = "127.0.0.1:50051"


def grpc_target() -> str:
    return os.environ.get("SYSDESIGN_GRPC_ADDR", DEFAULT_ADDR)


def channel(target: str | None = None) -> grpc.Channel:
    return grpc.insecure_channel(target or grpc_target())


# A long-lived client (the interactive chat) retries on its own schedule: the channel
# must not sit in its own reconnect backoff (up to 2 minutes by default) once the
# server is back.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500),
                     ("grpc.min_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 5000))


def aio_channel(target: str | None = None, *, reconnect_quickly: bool = False) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target or grpc_target(),
                                     options=RECONNECT_OPTIONS if reconnect_quickly else None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
