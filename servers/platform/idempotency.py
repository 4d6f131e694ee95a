"""Idempotency keys, the way Stripe defines them, for any system's mutating RPCs.

A client that may retry (a timeout, a dropped connection) sends the same key
with the same request. The first call to claim the key runs; its answer, a
response or an error, is stored and every later call with that key gets the
very same answer (the stored bytes) without running anything again::

    answer = await idem.run(scope="payments.CreatePaymentIntent", owner=caller.user_id,
                            key=request.idempotency_key, request=request,
                            response_type=pb.CreatePaymentIntentResponse,
                            handler=lambda: create(request))

* The key is the caller's own: keys are scoped by ``owner`` (the token's user)
  and ``scope`` (the method), so two users or two methods never collide.
* A fingerprint (SHA-256 of the request's deterministic serialization, with the
  key field cleared) is kept with the key: the same key with different
  parameters is refused with INVALID_ARGUMENT on the key's field.
* While the first call is in flight, a second one gets ABORTED with a RetryInfo
  hint; it is not queued behind it.
* Outcomes that a retry could change (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED,
  RESOURCE_EXHAUSTED, INTERNAL, a cancelled call) are not stored: the claim is
  released and the next call with the key runs again. So the handler must be
  safe to run again after a partial run (payments makes its own steps
  idempotent for exactly that reason).
* A claim whose process died holds the key only for ``lease_s``; after that the
  next call takes over.
* Keys are kept ``ttl_s`` (24 h).

Storage is one partition per key in the table port, each attempt two rows
(``claim``, then ``outcome``) written IF NOT EXISTS: the first claimer of
attempt N is the only one that runs, on SQLite and on Cassandra alike
(lightweight transactions only, never mixed with plain writes on one row).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from servers.platform.errors import Aborted, InvalidArgument, Replayed, ServiceError
from servers.storage.table import Row, Table, TableStore

M = TypeVar("M", bound=Message)

IDEMPOTENCY_KEYS = Table(
    name="idempotency_keys",
    partition_key=("scope", "owner", "idem_key"),
    clustering=("attempt", "part"),
    columns={
        "scope": "text", "owner": "bigint", "idem_key": "text", "attempt": "int", "part": "text",
        "fingerprint": "text", "lease_until_ms": "bigint", "created_ms": "bigint",
        "code": "int", "response": "blob", "status": "blob",
    },
    comment="idempotency keys: per attempt a claim row, then its outcome (servers/platform/idempotency.py)",
)
TABLES = [IDEMPOTENCY_KEYS]

MAX_KEY_LENGTH = 255
# Outcomes not stored: the next call with the key runs again.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.UNKNOWN}
RELEASED = -1  # the code of an outcome row that gives the key back


def _now_ms() -> int:
    return int(time.time() * 1000)


def fingerprint(request: Message, key_field: str = "idempotency_key") -> str:
    """SHA-256 of the request's deterministic bytes, its key field cleared."""
    copy = type(request)()
    copy.CopyFrom(request)
    if key_field and key_field in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField(key_field)  # type: ignore[arg-type]
    body = copy.SerializeToString(deterministic=True)
    return hashlib.sha256(copy.DESCRIPTOR.full_name.encode() + b"\0" + body).hexdigest()


class IdempotencyStore:
    def __init__(self, tables: TableStore, *, ttl_s: int = 86_400, lease_s: float = 30.0,
                 retry_after_s: float = 1.0) -> None:
        self.tables = tables
        self.ttl_s = ttl_s
        self.lease_ms = int(lease_s * 1000)
        self.retry_after_s = retry_after_s

    async def run(self, *, scope: str, owner: int, key: str, request: Message, response_type: type[M],
                  handler: Callable[[], Awaitable[M]], key_field: str = "idempotency_key") -> M:
        """The handler's answer for this key: run once, then replayed. An empty key
        runs the handler without any of this."""
        if not key:
            return await handler()
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument([(key_field, f"must be at most {MAX_KEY_LENGTH} characters")])
        fp = fingerprint(request, key_field)
        part = {"scope": scope, "owner": owner, "idem_key": key}
        for _ in range(5):
            rows = (await self.tables.slice(IDEMPOTENCY_KEYS, part, limit=1000)).rows
            attempt, decided = self._state(rows, fp, key_field)
            if decided is not None:
                return self._replay(decided, response_type)
            if attempt < 0:  # in flight elsewhere
                raise Aborted("a request with this idempotency key is still in progress; retry shortly",
                              retry_after_seconds=self.retry_after_s, reason="IDEMPOTENCY_KEY_IN_USE")
            claim = {**part, "attempt": attempt, "part": "claim", "fingerprint": fp,
                     "lease_until_ms": _now_ms() + self.lease_ms, "created_ms": _now_ms()}
            if await self.tables.put(IDEMPOTENCY_KEYS, claim, if_not_exists=True, ttl_seconds=self.ttl_s):
                return await self._run_claimed(part, attempt, handler)
        raise Aborted("this idempotency key is contended; retry shortly",
                      retry_after_seconds=self.retry_after_s, reason="IDEMPOTENCY_KEY_IN_USE")

    def _state(self, rows: list[Row], fp: str, key_field: str) -> tuple[int, Row | None]:
        """(the attempt to claim next, or -1 while one is in flight; the stored outcome)."""
        claims = {int(r["attempt"]): r for r in rows if r["part"] == "claim"}
        outcomes = {int(r["attempt"]): r for r in rows if r["part"] == "outcome"}
        if claims and any(c["fingerprint"] != fp for c in claims.values()):
            raise InvalidArgument([(key_field, "was already used with different parameters; use a new key for "
                                               "a different request")])
        for n in sorted(outcomes):
            if int(outcomes[n]["code"]) != RELEASED:
                return 0, outcomes[n]
        if not claims:
            return 0, None
        last = max(claims)
        if last in outcomes:  # released: the next attempt runs
            return last + 1, None
        if int(claims[last]["lease_until_ms"] or 0) < _now_ms():  # its process died
            return last + 1, None
        return -1, None

    async def _run_claimed(self, part: dict[str, Any], attempt: int, handler: Callable[[], Awaitable[M]]) -> M:
        outcome = {**part, "attempt": attempt, "part": "outcome"}
        try:
            response = await handler()
        except ServiceError as exc:
            if exc.code in RETRYABLE:
                await self._release(outcome)
                raise
            await self._store(outcome, {"code": exc.code.value[0], "status": exc.to_status().SerializeToString()})
            raise
        except BaseException:
            await self._release(outcome)
            raise
        body = response.SerializeToString(deterministic=True)
        await self._store(outcome, {"code": 0, "response": body})
        return response

    async def _store(self, outcome: Row, columns: dict[str, Any]) -> None:
        await self.tables.put(IDEMPOTENCY_KEYS, {**outcome, **columns, "created_ms": _now_ms()},
                              if_not_exists=True, ttl_seconds=self.ttl_s)

    async def _release(self, outcome: Row) -> None:
        try:
            await self.tables.put(IDEMPOTENCY_KEYS, {**outcome, "code": RELEASED, "created_ms": _now_ms()},
                                  if_not_exists=True, ttl_seconds=self.ttl_s)
        except Exception:  # the lease gives the key back anyway
            pass

    @staticmethod
    def _replay(row: Row, response_type: type[M]) -> M:
        code = int(row["code"])
        if code == 0:
            return response_type.FromString(bytes(row["response"] or b""))
        raise Replayed(status_pb2.Status.FromString(bytes(row["status"] or b"")))
