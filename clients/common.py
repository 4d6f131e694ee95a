"""What every `sysdesign` subcommand shares: configuration, tokens, RPC error printing."""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

TokenOpt = Annotated[str | None, typer.Option(help="Bearer token (default: $SYSDESIGN_TOKEN, or minted for --user).")]
UserOpt = Annotated[str, typer.Option(help="User to mint a token for when none is given.")]


def _config() -> Any:
    from servers.platform.config import Config

    return Config()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _token(token: str | None, user: str) -> str:
    if token:
        return token
    if os.environ.get("SYSDESIGN_TOKEN"):
        return os.environ["SYSDESIGN_TOKEN"]
    from clients.localauth import mint_token

    return asyncio.run(mint_token(_config(), user))[0]


def _rpc(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from grpc_status import rpc_status

    try:
        return fn(*args, timeout=10, **kwargs)
    except grpc.RpcError as e:
        err.print(f"[red]{e.code().name}[/]: {e.details()}")  # type: ignore[attr-defined]
        status = rpc_status.from_call(e)  # type: ignore[arg-type]
        if status is not None:
            from google.rpc import error_details_pb2

            for d in status.details:
                if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    d.Unpack(br)
                    for fv in br.field_violations:
                        err.print(f"  {fv.field}: {fv.description}")
        raise typer.Exit(1) from e
