"""Small helpers for integration tests: rich gRPC error details and bearer metadata.

Every function here works with the errors of both the sync (``grpc.RpcError``
from a blocking stub) and the asyncio API (``grpc.aio.AioRpcError``): the rich
status is read from the ``grpc-status-details-bin`` trailer either way.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"

M = TypeVar("M", bound=Message)


def grpc_metadata(token: str | None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``authorization: Bearer <token>`` (none when token is None)."""
    md: list[tuple[str, str]] = [] if token is None else [("authorization", f"Bearer {token}")]
    md.extend(extra)
    return tuple(md)


def rich_status(err: Any) -> status_pb2.Status | None:
    """The google.rpc.Status an error carries, or None when it carries no details."""
    trailers = err.trailing_metadata() or ()
    for k, v in trailers:
        if k == _DETAILS_KEY:
            status = status_pb2.Status.FromString(v if isinstance(v, bytes) else v.encode())
            if status.code != err.code().value[0]:
                raise AssertionError(f"status details code {status.code} != call code {err.code()}")
            return status
    return None


def details_of(err: Any, kind: type[M]) -> list[M]:
    """Every detail of the given message type (BadRequest, ErrorInfo, ...) in the error."""
    status = rich_status(err)
    out: list[M] = []
    for any_msg in status.details if status is not None else ():
        if any_msg.Is(kind.DESCRIPTOR):
            msg = kind()
            any_msg.Unpack(msg)
            out.append(msg)
    return out


def violations(err: Any) -> dict[str, str]:
    """google.rpc.BadRequest field violations as {field: description}."""
    out: dict[str, str] = {}
    for br in details_of(err, error_details_pb2.BadRequest):
        for fv in br.field_violations:
            out[fv.field] = fv.description
    return out


def error_reason(err: Any) -> str:
    """The google.rpc.ErrorInfo reason, or '' when the error has none."""
    infos = details_of(err, error_details_pb2.ErrorInfo)
    return infos[0].reason if infos else ""


def precondition_violations(err: Any) -> list[error_details_pb2.PreconditionFailure.Violation]:
    """google.rpc.PreconditionFailure violations (type, subject, description)."""
    return [v for pf in details_of(err, error_details_pb2.PreconditionFailure) for v in pf.violations]


def expect_error(code: grpc.StatusCode, fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call a blocking stub method, assert it fails with ``code`` and return the error."""
    kwargs.setdefault("timeout", 30)
    try:
        resp = fn(*args, **kwargs)
    except grpc.RpcError as err:
        assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
        return err
    raise AssertionError(f"expected {code.name}, the call succeeded with {resp!r}")
