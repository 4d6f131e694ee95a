"""Domain errors and their gRPC statuses (google.rpc rich error model).

Service code raises these; the platform interceptor turns them into a status
with details (BadRequest field violations, ErrorInfo, RetryInfo,
PreconditionFailure) that every gRPC client library can decode. Anything else
that escapes a handler is a bug: INTERNAL with the request id, logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "sysdesign.dev"


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, reason: str = "", metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}

    def details(self) -> list[object]:
        out: list[object] = []
        if self.reason:
            out.append(
                error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
            )
        return out

    def to_status(self) -> status_pb2.Status:
        code_value = self.code.value[0]
        packed = []
        for d in self.details():
            a = any_pb2.Any()
            a.Pack(d)  # type: ignore[arg-type]
            packed.append(a)
        return status_pb2.Status(code=code_value, message=self.message, details=packed)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """google.rpc.RetryInfo: retry after ``seconds``."""
    secs = int(seconds)
    nanos = int((seconds - secs) * 1e9)
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=secs, nanos=nanos))


class FieldViolation(tuple[str, str]):
    """(field path, description): the path uses proto field names, dotted for nesting."""

    def __new__(cls, field: str, description: str) -> FieldViolation:
        return super().__new__(cls, (field, description))

    @property
    def field(self) -> str:
        return self[0]

    @property
    def description(self) -> str:
        return self[1]


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[tuple[str, str]], message: str = ""):
        self.violations = [FieldViolation(f, d) for f, d in violations]
        if not message:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or "invalid argument")

    def details(self) -> list[object]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            ),
            *super().details(),
        ]


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """A state the caller cannot fix by retrying: carries a PreconditionFailure detail."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, *, reason: str, subject: str = "", kind: str = "",
                 subjects: Sequence[str] = ()):
        super().__init__(message, reason=reason)
        self.subject = subject
        self.kind = kind or reason
        # Several subjects (e.g. every block still missing): one violation each.
        self.subjects = list(subjects) or [subject]

    def details(self) -> list[object]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.kind, subject=s, description=self.message
                    )
                    for s in self.subjects
                ]
            ),
            *super().details(),
        ]


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_seconds: float, reason: str = "RATE_LIMITED"):
        super().__init__(message, reason=reason)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[object]:
        return [retry_info(self.retry_after_seconds), *super().details()]


class Aborted(ServiceError):
    """A concurrent call holds what this one needs (an idempotency key in flight):
    retry after the delay given."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, *, retry_after_seconds: float, reason: str):
        super().__init__(message, reason=reason)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[object]:
        return [retry_info(self.retry_after_seconds), *super().details()]


class Replayed(ServiceError):
    """An error answered before, answered again exactly as it was (its stored status)."""

    def __init__(self, stored: status_pb2.Status):
        super().__init__(stored.message)
        self.stored = stored
        self.code = next((c for c in grpc.StatusCode if c.value[0] == stored.code), grpc.StatusCode.UNKNOWN)

    def to_status(self) -> status_pb2.Status:
        return self.stored


class Unavailable(ServiceError):
    """A backend is unreachable; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


def internal_status(request_id: str) -> status_pb2.Status:
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error (request id {request_id})",
    )


class Violations:
    """Collects field violations so a request reports all its problems at once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
