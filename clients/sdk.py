"""Small client helpers: a channel to the stack and the bearer-token metadata."""

from __future__ import annotations

import os

import grpc

DEFAULT_ADDR = "127.0.0.1:50051"


def grpc_target() -> str:
    return os.environ.get("SYSDESIGN_GRPC_ADDR", DEFAULT_ADDR)


def channel(target: str | None = None) -> grpc.Channel:
    return grpc.insecure_channel(target or grpc_target())


def aio_channel(target: str | None = None) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target or grpc_target())


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
