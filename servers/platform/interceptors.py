"""The platform middleware: request id, authentication, deadlines, errors, access log, metrics.

Every handler of every system is wrapped once, at registration (a grpc.aio
interceptor would add a coroutine hop per call to find the handler). Per
call, in order:

1. request id: ``x-request-id`` from the caller's metadata or a new one,
   written in the access-log and error lines and returned in the trailing metadata;
2. authentication: a valid ``authorization: Bearer`` token sets the caller;
   a missing token is refused with UNAUTHENTICATED unless the method is public;
   a present but bad or expired token is refused on every method;
3. deadlines: the handler runs under ``asyncio.timeout(time_remaining)`` (30 s
   when the caller set none), so every downstream await (Redis, tables, blobs)
   is bounded by the caller's deadline;
4. errors: a ServiceError becomes its rich status; anything else is a bug,
   logged with its traceback and answered INTERNAL with the request id;
5. one JSON access-log line and Prometheus metrics per call.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from grpc_status import rpc_status
from redis import exceptions as redis_exceptions

from servers.platform import auth, validation
from servers.platform.errors import InvalidArgument, ServiceError, Unavailable, internal_status
from servers.platform.limits import ApiLimiter, peer_ip
from servers.platform.logs import access_log
from servers.platform.metrics import GRPC_LATENCY, GRPC_REQUESTS
from servers.storage.blob import BlobError, BlobNotFound
from servers.storage.table import TableError

log = structlog.get_logger("sysdesign.rpc")



# A handler whose caller set no deadline still gives up after this long, so no
# call waits forever on a backend that stopped answering.
DEFAULT_DEADLINE_SECONDS = 30.0
# The longest a bulk client stream (``long_calls``) may run when its caller asks for that long.
LONG_CALL_SECONDS = 600.0

_RID_PREFIX = os.urandom(5).hex()
# A caller's request id is kept to characters that need no escaping anywhere (logs, trailers).
_RID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")
_rid_counter = itertools.count(1)


_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_request_id() -> str:
    """The request id of the RPC being handled ('' outside one): for server-side log lines."""
    return _request_id.get()


def new_request_id() -> str:
    """Unique without a system call per request: a random per-process prefix and a counter."""
    return f"{_RID_PREFIX}{next(_rid_counter):06x}"


async def _abort(context: grpc.aio.ServicerContext, status: Any, rid: str,
                 extra: tuple[tuple[str, str], ...] = ()) -> None:
    """Abort with a rich status; the request id (and ``extra``) stay in the trailers beside the details."""
    st = rpc_status.to_status(status)
    st = st._replace(trailing_metadata=(*st.trailing_metadata, ("x-request-id", rid), *extra))  # type: ignore[attr-defined]
    await context.abort_with_status(st)


def _reset_request_id(token: contextvars.Token[str]) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # an async generator finished in another context
        _request_id.set("")


class _Undecodable:
    """Stands in for a request the deserializer refused (e.g. a string field that is not UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Invalid:
    """Stands in for a request that breaks the rules its proto declares (servers/platform/validation.py)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None,
                       check: bool = True) -> Callable[[bytes], Any] | None:
    """Decode a request and check its declared rules, without raising inside gRPC's deserializer."""
    if deserialize is None:
        return None

    def wrapped(data: bytes) -> Any:
        try:
            message = deserialize(data)
        except DecodeError as exc:
            return _Undecodable(exc)
        # A handler's own decoder may hand out something that is not a
        # message (MediaService.Upload's zero-copy chunks, servers/media/wire.py):
        # that handler checks those rules itself.
        if check and isinstance(message, Message):
            found = validation.violations(message)
            if found:
                return _Invalid(found)
        return message

    return wrapped


def _refusal(request: Any) -> InvalidArgument | None:
    """The error a request stand-in becomes, or None for a message to hand to the handler."""
    if isinstance(request, _Undecodable):
        return _undecodable(request)
    if isinstance(request, _Invalid):
        return InvalidArgument(request.violations)
    return None


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream whose messages are decoded and valid: the first that is not ends the call."""
    async for request in requests:
        err = _refusal(request)
        if err is not None:
            raise err
        yield request


# A backend that does not answer is not a bug: UNAVAILABLE tells clients to retry.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    redis_exceptions.BusyLoadingError,
    TableError,
    BlobError,
)


def _unavailable(exc: BaseException, rid: str) -> Unavailable:
    return Unavailable(f"a backend is unavailable, retry later (request id {rid})",
                       reason="BACKEND_UNAVAILABLE", metadata={"backend_error": type(exc).__name__})


def _failure(exc: Exception, method: str, rid: str) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status an exception escaping a handler becomes (called inside the except block)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.to_status()
    if isinstance(exc, TimeoutError):  # the caller's deadline, enforced by asyncio.timeout
        return grpc.StatusCode.DEADLINE_EXCEEDED, status_pb2.Status(
            code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message="deadline exceeded")
    if isinstance(exc, BACKEND_ERRORS) and not isinstance(exc, BlobNotFound):
        log.warning("backend_unavailable", method=method, request_id=rid, error=repr(exc))
        return grpc.StatusCode.UNAVAILABLE, _unavailable(exc, rid).to_status()
    log.exception("rpc_failed", method=method, request_id=rid)
    return grpc.StatusCode.INTERNAL, internal_status(rid)


def _undecodable(request: Any) -> InvalidArgument:
    return InvalidArgument([("request", f"is not a valid message of this method: {request.error}")])


class PlatformInterceptor:
    """Wraps every handler of the systems' servicers once, when it is registered.

    A grpc.aio ``ServerInterceptor`` runs an extra coroutine per call just to
    pick the handler; wrapping at registration time does the same work with
    no per-call lookup. Use ``registrar(server)`` in place of the server when
    calling the generated ``add_XServicer_to_server`` functions. Health and
    reflection are registered on the server directly and stay unwrapped.
    """

    def __init__(self, signer: auth.TokenSigner, public_methods: set[str], *, access_log: bool = True,
                 own_stream_checks: set[str] | None = None, limits: ApiLimiter | None = None,
                 long_calls: set[str] | None = None, open_streams: set[str] | None = None):
        self._signer = signer
        # Client streams that stay open as long as the caller keeps them (a
        # driver's location pings): bounded only by the caller's own deadline.
        self._open = set(open_streams or ())
        # Client streams that carry bulk bytes (drive block uploads): bounded by
        # the caller's deadline up to LONG_CALL_SECONDS, not DEFAULT_DEADLINE_SECONDS,
        # so a slow link can still finish one large message sequence.
        self._long = set(long_calls or ())
        # Tiered rate limits per user or per IP (servers/platform/limits.py); None: off.
        self._limits = limits
        self._public = set(public_methods)
        # Bidirectional streams that answer a bad message with an error event on
        # the stream instead of ending the call: their handlers check each
        # message themselves (validation.violations).
        self._own_checks = set(own_stream_checks or ())
        self._access_log = access_log
        self._requests: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._latency: dict[str, Any] = {}

    def registrar(self, server: grpc.aio.Server) -> _Registrar:
        return _Registrar(self, server)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        public = method in self._public
        own = method in self._own_checks
        deserialize = _safe_deserializer(handler.request_deserializer, check=not own)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, public, stream_in=False),
                deserialize, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, public, stream_in=not own),
                deserialize, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, public, stream_in=False),
                deserialize, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method, public, stream_in=not own),
            deserialize, handler.response_serializer)

    # -- per-call steps ---------------------------------------------------

    async def _admit(self, request: Any, err: ServiceError | None, method: str,
                     caller: auth.Caller | None, context: grpc.aio.ServicerContext,
                     stream_in: bool) -> Any:
        """The request for the handler once the call is authenticated, within its limits and
        valid (a client stream is checked message by message); raises the first refusal."""
        if err is not None:
            raise err
        await self._limit(method, caller, context)
        if stream_in:
            return _checked(request)
        refused = _refusal(request)
        if refused is not None:
            raise refused
        return request

    async def _limit(self, method: str, caller: auth.Caller | None,
                     context: grpc.aio.ServicerContext) -> None:
        """Raise RESOURCE_EXHAUSTED when the caller is over a limit of this method."""
        if self._limits is None or self._limits.limits.exempt_method(method):
            return
        verdict = await self._limits.check(
            method.lstrip("/"), user_id=caller.user_id if caller else None,
            username=caller.username if caller else None, ip=peer_ip(context.peer()))
        if not verdict.allowed:
            raise verdict.error()  # its trailers: retry-after, ratelimit, ratelimit-policy

    def _begin(self, context: grpc.aio.ServicerContext,
               public: bool) -> tuple[str, auth.Caller | None, ServiceError | None]:
        metadata = context.invocation_metadata()
        rid = ""
        for k, v in metadata or ():
            if k == "x-request-id":
                rid = _RID_UNSAFE.sub("", v.decode() if isinstance(v, bytes) else v)[:64]
                break
        rid = rid or new_request_id()
        token = auth.bearer_from_metadata(metadata)
        caller = None
        err: ServiceError | None = None
        if token is None:
            if not public:
                err = auth.Unauthenticated(
                    "this call needs a bearer token: authorization: Bearer <token>", reason="TOKEN_MISSING")
        else:
            try:
                if token == "":
                    raise auth.Unauthenticated("the authorization metadata must be 'Bearer <token>'",
                                               reason="TOKEN_MALFORMED")
                caller = self._signer.verify(token)
            except ServiceError as e:
                err = e
        return rid, caller, err

    def _finish(self, method: str, rid: str, caller: auth.Caller | None, code: grpc.StatusCode,
                started: float) -> None:
        elapsed = time.perf_counter() - started
        counter = self._requests.get((method, code))
        if counter is None:
            counter = self._requests[(method, code)] = GRPC_REQUESTS.labels(method, code.name)
        counter.inc()
        hist = self._latency.get(method)
        if hist is None:
            hist = self._latency[method] = GRPC_LATENCY.labels(method)
        hist.observe(elapsed)
        if self._access_log or code is not grpc.StatusCode.OK:
            access_log(method, code.name, elapsed, rid, caller.user_id if caller is not None else None)

    @staticmethod
    def _timeout(context: grpc.aio.ServicerContext, cap: float = DEFAULT_DEADLINE_SECONDS) -> float:
        """The caller's deadline, at most ``cap`` (DEFAULT_DEADLINE_SECONDS when it set none)."""
        remaining = context.time_remaining()
        if remaining is None:
            return DEFAULT_DEADLINE_SECONDS
        return min(remaining, cap)

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], method: str,
                    public: bool, *, stream_in: bool) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            rid, caller, err = self._begin(context, public)
            context.set_trailing_metadata((("x-request-id", rid),))
            code = grpc.StatusCode.OK
            reset = auth.set_caller(caller)
            rid_reset = _request_id.set(rid)
            try:
                request = await self._admit(request, err, method, caller, context, stream_in)
                if method in self._open:
                    limit = context.time_remaining()
                else:
                    cap = LONG_CALL_SECONDS if method in self._long else DEFAULT_DEADLINE_SECONDS
                    limit = self._timeout(context, cap)
                async with asyncio.timeout(limit):
                    return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = context.code() or grpc.StatusCode.CANCELLED  # type: ignore[assignment]
                raise
            except Exception as e:
                code, status = _failure(e, method, rid)
                await _abort(context, status, rid, getattr(e, "trailers", ()))
            finally:
                auth.reset_caller(reset)
                _reset_request_id(rid_reset)
                self._finish(method, rid, caller, code, started)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., AsyncIterator[Any]], method: str,
                     public: bool, *, stream_in: bool) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            rid, caller, err = self._begin(context, public)
            context.set_trailing_metadata((("x-request-id", rid),))
            code = grpc.StatusCode.OK
            reset = auth.set_caller(caller)
            rid_reset = _request_id.set(rid)
            try:
                request = await self._admit(request, err, method, caller, context, stream_in)
                async for item in behavior(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = context.code() or grpc.StatusCode.CANCELLED  # type: ignore[assignment]
                raise
            except Exception as e:
                code, status = _failure(e, method, rid)
                await _abort(context, status, rid, getattr(e, "trailers", ()))
            finally:
                auth.reset_caller(reset)
                _reset_request_id(rid_reset)
                self._finish(method, rid, caller, code, started)

        return wrapped


class _Registrar:
    """Stands in for the server in ``add_XServicer_to_server``: wraps, then registers."""

    def __init__(self, platform: PlatformInterceptor, server: grpc.aio.Server) -> None:
        self._platform = platform
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # The generated code registers each service twice (generic + registered);
        # the registered call below carries the same handlers.
        pass

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self._platform.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)
