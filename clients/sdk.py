"""Small client helpers: a channel to the stack and the bearer-token metadata."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import grpc

DEFAULT_ADDR = "127.0.0.1:50051"
# The retry policy every language's client uses (clients/README.md): idempotent
# methods retry on UNAVAILABLE with backoff, the others only get a deadline.
SERVICE_CONFIG = Path(__file__).resolve().parent / "service_config.json"


def grpc_target() -> str:
    return os.environ.get("SYSDESIGN_GRPC_ADDR", DEFAULT_ADDR)


@cache
def channel_options() -> tuple[tuple[str, object], ...]:
    return (("grpc.service_config", SERVICE_CONFIG.read_text()), ("grpc.enable_retries", 1))


def channel(target: str | None = None) -> grpc.Channel:
    return grpc.insecure_channel(target or grpc_target(), options=channel_options())


# A long-lived client (the interactive chat) retries on its own schedule: the channel
# must not sit in its own reconnect backoff (up to 2 minutes by default) once the
# server is back.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500),
                     ("grpc.min_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 5000))


def aio_channel(target: str | None = None, *, reconnect_quickly: bool = False) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target or grpc_target(),
                                     options=(*channel_options(), *(RECONNECT_OPTIONS if reconnect_quickly else ())))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
