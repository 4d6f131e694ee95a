"""Payment intents: a state machine over the table port, a processor behind a port, a ledger.

States (PaymentIntentStatus in protos/sysdesign/payments/v1/payments.proto)::

    requires_payment_method --confirm(card)--> processing
    requires_confirmation ----confirm--------> processing
    requires_action ----------confirm(3ds)---> processing
    processing --processor answers--> requires_capture | succeeded | requires_action
                                      | requires_payment_method (declined) | canceled
    requires_capture --capture--> succeeded     (any status before succeeded) --cancel--> canceled
    succeeded --refund (status unchanged, refunded grows up to received)

Every transition is the next row of the intent's log (servers/payments/tables.py),
claimed IF NOT EXISTS and named by its operation, so a replayed operation
finds its own row and racing writers agree on one.

A processor operation is two rows around one HTTP call:

1. ``begin:<n>:<kind>`` records the request and its idempotency key
   (``sd-<intent>-<n>-<kind>``) *before* anything is sent, and the intent is
   put in the work index first;
2. the request is sent; its answer is ``done`` (the processor did it, or did
   it before and answers the same again), ``refused`` (a decline, a request it
   rejects) or ``unknown`` (a timeout, a 5xx, the key in flight);
3. on done or refused, ``done:<n>`` records the outcome and the ledger
   transfers it books (the row is the outbox);
4. the transfers are booked, each by an id derived from the intent and its
   purpose, so booking twice books once; then the work index row is removed.

A process that dies anywhere in there leaves an intent in the work index
whose last row says what is left: the reconciler (``sweep``) sends the
stored request again with the same key, which either does it (it never
reached the processor) or answers what was done, and books what is
unbooked. So a crash at any point converges to one charge, recorded once.
Webhooks are a hint to do this now (they are verified, de-duplicated, and
in whatever order they come only make the intent be looked at again).

The ledger (servers/payments/ledger.py), per currency:

* authorized (manual capture): a pending transfer customer_funds -> merchant_receivable;
* captured: the pending one posted (the captured amount; the rest released),
  or a single transfer for an automatic capture;
* canceled after authorization: the pending one voided;
* refunded: a single transfer merchant_receivable -> customer_funds.

merchant_receivable may not be debited beyond its credits and a customer's
account may not be credited beyond its debits: the ledger itself refuses a
refund of money that never came in.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog
from google.protobuf.message import Message

from servers.payments import money
from servers.payments.ledger import Account, Finding, Ledger
from servers.payments.processor import Answer, HttpProcessor, Processor, Request
from servers.payments.tables import (
    INTENT_DAY_BUCKETS,
    PAYMENT_INTENT_LOG,
    PAYMENT_INTENTS,
    PAYMENT_INTENTS_BY_CUSTOMER,
    PAYMENT_INTENTS_BY_DAY,
    PAYMENT_WEBHOOK_EVENTS,
    PAYMENT_WORK,
    WORK_BUCKETS,
)
from servers.platform.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    retry_info,
)
from servers.platform.events import EVENT_COLUMN, Publisher
from servers.platform.failpoints import failpoint
from servers.storage.table import InvalidPageToken, Row, TableStore

log = structlog.get_logger("sysdesign.payments")

# The topic of PaymentIntentEvent (docs/events.md), and what builds one from the
# intent after the change and the status before it (servers/payments/service.py).
INTENT_TOPIC = "payments.intents"
EventOf = Callable[["IntentView", int], Message]

# PaymentIntentStatus values.
REQUIRES_PAYMENT_METHOD, REQUIRES_CONFIRMATION, REQUIRES_ACTION, PROCESSING = 1, 2, 3, 4
REQUIRES_CAPTURE, SUCCEEDED, CANCELED = 5, 6, 7
STATUS_NAMES = {1: "requires_payment_method", 2: "requires_confirmation", 3: "requires_action",
                4: "processing", 5: "requires_capture", 6: "succeeded", 7: "canceled"}
# CaptureMethod values.
AUTOMATIC, MANUAL = 1, 2
# ThreeDSecureResult values.
THREE_DS_PASS, THREE_DS_FAIL = 1, 2

# The processor's limit (Stripe's for two-decimal currencies).
MAX_AMOUNT_MINOR = 99_999_999

PSP_STATUS = {"requires_payment_method": REQUIRES_PAYMENT_METHOD, "requires_confirmation": REQUIRES_CONFIRMATION,
              "requires_action": REQUIRES_ACTION, "processing": PROCESSING, "requires_capture": REQUIRES_CAPTURE,
              "succeeded": SUCCEEDED, "canceled": CANCELED}


class Unresolved(Unavailable):
    """The processor has not said what became of a call; the intent stays processing."""

    def details(self) -> list[Any]:
        return [retry_info(1.0), *super().details()]


def now_ms() -> int:
    return int(time.time() * 1000)


def utc_day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


@dataclass(frozen=True)
class PaymentsSettings:
    # Usernames allowed the ledger's operator methods (CreateAccount, CreateTransfer, Audit, ...).
    operators: frozenset[str] = field(default_factory=lambda: frozenset(
        u.strip() for u in os.environ.get("SYSDESIGN_PAYMENTS_OPERATORS", "").split(",") if u.strip()))
    # How often the reconciler walks the work index, and how long an operation is
    # left to the call that began it before the reconciler takes it up.
    reconcile_every_s: float = field(default_factory=lambda: float(
        os.environ.get("SYSDESIGN_PAYMENTS_RECONCILE_SECONDS", "2")))
    reconcile_after_s: float = field(default_factory=lambda: float(
        os.environ.get("SYSDESIGN_PAYMENTS_RECONCILE_AFTER_SECONDS", "5")))
    # A processor keeps idempotency keys 24 h: an operation older than this is not
    # sent again (it could be done twice); it is left for a person (the audit lists it).
    resend_max_age_s: float = 20 * 3600
    book: str = "main"


def parse_money(currency: str, value: str, path: str) -> tuple[str, int, list[tuple[str, str]]]:
    """A decimal amount in major units -> (currency, minor units, violations)."""
    bad: list[tuple[str, str]] = []
    if not money.is_known(currency):
        bad.append((f"{path}.currency_code", f"{currency!r} is not a currency this service accepts "
                                             f"({', '.join(sorted(money.CURRENCIES))})"))
        return currency, 0, bad
    exp = money.exponent(currency)
    try:
        d = Decimal(value)
    except (InvalidOperation, ValueError):
        return currency, 0, [(f"{path}.value", "must be a decimal number, e.g. 10.50")]
    if not d.is_finite():
        return currency, 0, [(f"{path}.value", "must be a decimal number, e.g. 10.50")]
    places = -int(d.as_tuple().exponent) if d.as_tuple().exponent < 0 else 0  # type: ignore[operator]
    if places > exp and d != d.quantize(Decimal(1).scaleb(-exp)):
        bad.append((f"{path}.value", f"has {places} decimal places; {currency} has {exp}"))
        return currency, 0, bad
    minor = int(d.scaleb(exp))
    if minor <= 0:
        bad.append((f"{path}.value", "must be positive" if minor < 0 else "must be more than zero"))
    elif minor > MAX_AMOUNT_MINOR:
        bad.append((f"{path}.value", f"must be at most {money.format_minor(MAX_AMOUNT_MINOR, currency)}"))
    return currency, minor, bad


def mask_card(pm: str) -> str:
    if not pm:
        return ""
    if pm.startswith("pm_"):
        return pm
    digits = "".join(c for c in pm if c.isdigit())
    brand = {"4": "visa", "5": "mastercard", "3": "amex", "6": "discover"}.get(digits[:1], "card")
    return f"{brand} ending {digits[-4:]}"


def _derived_id(*parts: object) -> int:
    """A stable positive 62-bit id for a ledger account or transfer named by its parts."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return (int.from_bytes(h[:8], "big") >> 2) or 1


@dataclass(frozen=True)
class IntentView:
    header: Row
    now: Row

    @property
    def intent_id(self) -> int:
        return int(self.header["intent_id"])

    @property
    def customer_id(self) -> int:
        return int(self.header["customer_id"])

    @property
    def status(self) -> int:
        return int(self.now["status"])

    @property
    def currency(self) -> str:
        return str(self.header["currency"])

    @property
    def amount(self) -> int:
        return int(self.header["amount"])

    @property
    def pending(self) -> dict[str, Any]:
        raw = self.now["pending"]
        return json.loads(raw) if raw else {}

    @property
    def refunds(self) -> list[dict[str, Any]]:
        raw = self.now["refunds"]
        return json.loads(raw) if raw else []

    def int_of(self, col: str) -> int:
        return int(self.now[col] or 0)


@dataclass
class AuditReport:
    findings: list[Finding]
    accounts_checked: int = 0
    entries_checked: int = 0
    intents_checked: int = 0
    settlement_rows_checked: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings


class PaymentsCore:
    def __init__(self, tables: TableStore, next_id: Callable[[], int], processor: Processor,
                 settings: PaymentsSettings | None = None, *, events: Publisher | None = None,
                 event_of: EventOf | None = None) -> None:
        self.tables = tables
        self.next_id = next_id
        self.processor = processor
        self.s = settings or PaymentsSettings()
        self.ledger = Ledger(tables, next_id=next_id, book=self.s.book)
        self._accounts: set[int] = set()
        # Status changes are published as events (topic INTENT_TOPIC) when both are given.
        self.events = events if event_of is not None else None
        self.event_of = event_of
        self._next_events_sweep = 0.0

    @classmethod
    def for_runtime(cls, rt: Any, event_of: EventOf | None = None) -> PaymentsCore:
        def make() -> PaymentsCore:
            processor = HttpProcessor()
            rt.closers.append(processor.close)
            events = Publisher(rt.tables, rt.redis, rt.snowflake, source="payments",
                               state_tables=[PAYMENT_INTENT_LOG])
            return cls(rt.tables, rt.snowflake.next_id, processor, events=events, event_of=event_of)

        return rt.singleton("payments_core", make)  # type: ignore[no-any-return]

    async def sweep_events(self) -> None:
        """Append the status-change events a crash kept from the stream (every SYSDESIGN_EVENTS_SWEEP_S)."""
        if self.events is None or time.monotonic() < self._next_events_sweep:
            return
        self._next_events_sweep = time.monotonic() + self.events.settings.sweep_s
        await self.events.sweep_once()

    # -- reading ---------------------------------------------------------------------------

    async def _log(self, intent_id: int) -> list[Row]:
        return (await self.tables.slice(PAYMENT_INTENT_LOG, {"intent_id": intent_id}, limit=10_000)).rows

    async def intent(self, intent_id: int) -> IntentView | None:
        header = await self.tables.get(PAYMENT_INTENTS, {"intent_id": intent_id})
        if header is None:
            return None
        page = await self.tables.slice(PAYMENT_INTENT_LOG, {"intent_id": intent_id}, limit=1, reverse=True)
        return IntentView(header, page.rows[0]) if page.rows else None

    async def intent_for(self, caller: int, intent_id: int) -> IntentView:
        view = await self.intent(intent_id)
        if view is None or view.customer_id != caller:
            raise NotFound(f"no payment intent {intent_id}", reason="PAYMENT_INTENT_NOT_FOUND")
        return view

    async def list_intents(self, caller: int, page_size: int, page_token: str) -> tuple[list[IntentView], str]:
        try:
            page = await self.tables.slice(PAYMENT_INTENTS_BY_CUSTOMER, {"customer_id": caller},
                                           limit=page_size or 20, page_token=page_token)
        except InvalidPageToken as exc:
            raise InvalidArgument([("page_token", "is not a token this listing returned")]) from exc
        views = await asyncio.gather(*(self.intent(int(r["intent_id"])) for r in page.rows))
        return [v for v in views if v is not None], page.next_page_token

    # -- transitions -----------------------------------------------------------------------

    async def _transition(self, intent_id: int, op: str, allowed: set[int] | None, status: int | None,
                          change: Callable[[Row], dict[str, Any]], *, idle: bool = True) -> tuple[Row, bool]:
        """Appends the next log row: (the intent now, whether this call moved it).

        An op already in the log answers the intent now. ``allowed`` (None: any)
        and ``idle`` (no operation in flight) are the preconditions; a status
        outside them raises FailedPrecondition naming the status.
        """
        for _ in range(50):
            rows = await self._log(intent_id)
            if not rows:
                raise NotFound(f"no payment intent {intent_id}", reason="PAYMENT_INTENT_NOT_FOUND")
            cur = rows[-1]
            if any(r["op"] == op for r in rows):
                return cur, False
            if idle and cur["pending"]:
                raise Unresolved(f"payment intent {intent_id} has a processor call in progress; retry shortly",
                                 reason="PAYMENT_INTENT_PROCESSING")
            if allowed is not None and int(cur["status"]) not in allowed:
                raise _WrongStatus(int(cur["status"]))
            new = {**cur, **change(cur), "seq": int(cur["seq"]) + 1, "op": op, "at_ms": now_ms()}
            new.pop(EVENT_COLUMN, None)  # a row carries its own event, if any
            if status is not None:
                new["status"] = status
            if await self._append(intent_id, cur, new):
                return new, True
        raise Unavailable("the payment intent is changing too fast; try again")

    async def _append(self, intent_id: int, cur: Row, new: Row) -> bool:
        """Claim the next log row; one that changes the status carries its PaymentIntentEvent
        and is published (servers/platform/events.py): the event exists iff the row does."""
        if self.events is None or self.event_of is None or int(new["status"]) == int(cur["status"]):
            return await self.tables.put(PAYMENT_INTENT_LOG, new, if_not_exists=True)
        header = await self.tables.get(PAYMENT_INTENTS, {"intent_id": intent_id})
        if header is None:  # not created yet (its header is written last): nothing to tell
            return await self.tables.put(PAYMENT_INTENT_LOG, new, if_not_exists=True)
        message = self.event_of(IntentView(header, new), int(cur["status"]))
        published = await self.events.publish(PAYMENT_INTENT_LOG, new, INTENT_TOPIC, message,
                                              subject=str(intent_id), if_not_exists=True)
        return published is not None

    # -- the API ---------------------------------------------------------------------------

    async def create(self, caller: int, *, currency: str, amount: int, capture_method: int, payment_method: str,
                     description: str, metadata: dict[str, str]) -> IntentView:
        intent_id = self.next_id()
        at = now_ms()
        header = {"intent_id": intent_id, "customer_id": caller, "currency": currency, "amount": amount,
                  "capture_method": capture_method or AUTOMATIC, "description": description,
                  "metadata": json.dumps(metadata, sort_keys=True), "create_ms": at}
        first = {"intent_id": intent_id, "seq": 0, "op": "create",
                 "status": REQUIRES_CONFIRMATION if payment_method else REQUIRES_PAYMENT_METHOD, "at_ms": at,
                 "n": 0, "payment_method": payment_method, "psp_id": "", "capturable": 0, "received": 0,
                 "refunded": 0, "refunds": "", "error_type": "", "error_code": "", "decline_code": "", "error_message": "",
                 "cancellation_reason": "", "pending": "", "book": ""}
        # The log row and the indexes first, the header last: an intent is there once its header is.
        await self.tables.put(PAYMENT_INTENT_LOG, first, if_not_exists=True)
        await asyncio.gather(
            self.tables.put(PAYMENT_INTENTS_BY_CUSTOMER, {"customer_id": caller, "intent_id": intent_id}),
            self.tables.put(PAYMENT_INTENTS_BY_DAY, {"day": utc_day(at), "bucket": intent_id % INTENT_DAY_BUCKETS,
                                                     "intent_id": intent_id}))
        await self.tables.put(PAYMENT_INTENTS, header, if_not_exists=True)
        return IntentView(header, first)

    async def confirm(self, caller: int, intent_id: int, *, payment_method: str = "",
                      three_d_secure: int = 0, client_key: str = "") -> IntentView:
        view = await self._settled_for(caller, intent_id)
        if await self._did(intent_id, ("confirm", "3ds"), client_key):
            return view
        st = view.status
        cur = view.now
        psp_id = str(cur["psp_id"] or "")
        card = payment_method or str(cur["payment_method"] or "")
        if st == REQUIRES_ACTION:
            if not three_d_secure:
                raise InvalidArgument([("three_d_secure", "is required: the intent waits for the card's "
                                                          "second step (REQUIRES_ACTION)")])
            body: dict[str, Any] = {"three_d_secure": "pass" if three_d_secure == THREE_DS_PASS else "fail"}
            path, kind = f"/v1/payment_intents/{psp_id}/confirm", "3ds"
        elif st in (REQUIRES_CONFIRMATION, REQUIRES_PAYMENT_METHOD):
            if three_d_secure:
                raise InvalidArgument([("three_d_secure", "is only for an intent in REQUIRES_ACTION")])
            if not card:
                raise InvalidArgument([("payment_method", "is required: the intent has no payment method")])
            if st == REQUIRES_PAYMENT_METHOD and psp_id and not payment_method:
                raise InvalidArgument([("payment_method", "is required: the last one was declined")])
            if psp_id:
                body, path = {"payment_method": card}, f"/v1/payment_intents/{psp_id}/confirm"
            else:
                h = view.header
                body = {"amount": view.amount, "currency": view.currency.lower(), "confirm": True,
                        "capture_method": "manual" if int(h["capture_method"]) == MANUAL else "automatic",
                        "payment_method": card, "metadata": {"ref": str(intent_id)}}
                if h["description"]:
                    body["description"] = str(h["description"])
                path = "/v1/payment_intents"
            kind = "confirm"
        else:
            raise _WrongStatus(st).as_error("confirmed", "INTENT_NOT_CONFIRMABLE")
        return await self._operate(view, kind, "POST", path, body, PROCESSING,
                                   {REQUIRES_CONFIRMATION, REQUIRES_PAYMENT_METHOD, REQUIRES_ACTION},
                                   {"payment_method": card}, client_key=client_key)

    async def capture(self, caller: int, intent_id: int, amount: int | None, client_key: str = "") -> IntentView:
        view = await self._settled_for(caller, intent_id)
        if await self._did(intent_id, ("capture",), client_key):
            return view
        if view.status != REQUIRES_CAPTURE:
            raise _WrongStatus(view.status).as_error("captured", "INTENT_NOT_CAPTURABLE")
        capturable = view.int_of("capturable")
        if amount is not None and amount > capturable:
            raise InvalidArgument([("amount_to_capture.value", f"is more than can be captured "
                                                               f"({money.format_minor(capturable, view.currency)})")])
        body = {} if amount is None else {"amount_to_capture": amount}
        return await self._operate(view, "capture", "POST", f"/v1/payment_intents/{view.now['psp_id']}/capture",
                                   body, None, {REQUIRES_CAPTURE}, client_key=client_key)

    async def cancel(self, caller: int, intent_id: int, reason: str, client_key: str = "") -> IntentView:
        view = await self._settled_for(caller, intent_id)
        if await self._did(intent_id, ("cancel",), client_key):
            return view
        st = view.status
        if st == CANCELED:
            return view
        if st == SUCCEEDED:
            raise _WrongStatus(st).as_error("canceled", "INTENT_NOT_CANCELABLE")
        allowed = {REQUIRES_PAYMENT_METHOD, REQUIRES_CONFIRMATION, REQUIRES_ACTION, REQUIRES_CAPTURE}
        if not view.now["psp_id"]:
            # Never sent to the processor: nothing to void there.
            now, _ = await self._transition(intent_id, "cancel", allowed, CANCELED,
                                            lambda c: {"cancellation_reason": reason})
            return IntentView(view.header, now)
        body = {"cancellation_reason": "requested_by_customer"}
        return await self._operate(view, "cancel", "POST", f"/v1/payment_intents/{view.now['psp_id']}/cancel",
                                   body, None, allowed, {"cancellation_reason": reason}, client_key=client_key)

    async def refund(self, caller: int, intent_id: int, amount: int | None,
                     reason: str, client_key: str = "") -> tuple[dict[str, Any], IntentView]:
        view = await self._settled_for(caller, intent_id)
        n_done = await self._did(intent_id, ("refund",), client_key)
        if n_done:
            made = [r for r in view.refunds if r.get("op") == n_done]
            if made:
                return made[-1], view
        if view.status != SUCCEEDED:
            raise _WrongStatus(view.status).as_error("refunded", "INTENT_NOT_REFUNDABLE")
        left = view.int_of("received") - view.int_of("refunded")
        if left <= 0:
            raise FailedPrecondition("everything captured is refunded already", reason="INTENT_FULLY_REFUNDED",
                                     subject=f"payment_intents/{intent_id}")
        if amount is not None and amount > left:
            raise InvalidArgument([("amount.value", f"is more than is left to refund "
                                                    f"({money.format_minor(left, view.currency)})")])
        n = view.int_of("n") + 1
        body: dict[str, Any] = {"payment_intent": str(view.now["psp_id"]), "amount": amount or left,
                                "metadata": {"ref": str(intent_id), "op": str(n)}}
        if reason:
            body["reason"] = "requested_by_customer"
        after = await self._operate(view, "refund", "POST", "/v1/refunds", body, None, {SUCCEEDED},
                                    {"cancellation_reason": view.now["cancellation_reason"]}, reason=reason,
                                    client_key=client_key)
        made = [r for r in after.refunds if r.get("op") == after.int_of("n")]
        return (made[-1] if made else after.refunds[-1]), after

    async def _settled_for(self, caller: int, intent_id: int) -> IntentView:
        """The caller's intent, with any operation left in flight finished first."""
        view = await self.intent_for(caller, intent_id)
        if view.now["pending"] or view.now["book"]:
            view = await self.advance(intent_id)
            if view.now["pending"]:
                raise Unresolved(f"payment intent {intent_id} is waiting for the processor; retry shortly",
                                 reason="PAYMENT_INTENT_PROCESSING")
        return view

    async def _did(self, intent_id: int, kinds: tuple[str, ...], client_key: str) -> int:
        """The number of the operation of one of ``kinds`` begun with the caller's
        idempotency key, if one was (0 otherwise): a retry after a crash that the key's
        own record missed answers the intent as that operation left it."""
        if not client_key:
            return 0
        for row in await self._log(intent_id):
            if str(row["op"]).startswith("begin:") and row["pending"]:
                p = json.loads(row["pending"])
                if p.get("client_key") == client_key and p.get("kind") in kinds:
                    return int(p["n"])
        return 0

    async def _operate(self, view: IntentView, kind: str, method: str, path: str, body: dict[str, Any],
                       status_during: int | None, allowed: set[int], change: dict[str, Any] | None = None,
                       reason: str = "", client_key: str = "") -> IntentView:
        intent_id = view.intent_id
        n = view.int_of("n") + 1
        req = Request(method, path, body, f"sd-{intent_id}-{n}-{kind}")
        pending = {"kind": kind, "n": n, "request": req.to_json(), "prev": view.status, "at_ms": now_ms(),
                   "reason": reason, "client_key": client_key}
        # In the work index before the row that begins the call: a process that dies
        # after the row leaves an intent the reconciler finds.
        await self._mark_work(intent_id)
        _, moved = await self._transition(intent_id, f"begin:{n}:{kind}", allowed, status_during,
                                          lambda c: {**(change or {}), "n": n, "pending": json.dumps(pending),
                                                     "book": ""})
        failpoint(f"payments.{kind}.before_processor")
        after = await self.advance(intent_id)
        failpoint(f"payments.{kind}.before_response")
        if after.now["pending"]:
            raise Unresolved("the processor has not answered; the payment intent is PROCESSING and will be "
                             "finished (retry to see how it ended)", reason="PAYMENT_INTENT_PROCESSING")
        if not moved:
            return after
        if after.int_of("n") == n and after.now["error_type"] and after.now["error_type"] != "card_error":
            # The processor refused the request outright (not a decline: that is an answer).
            raise FailedPrecondition(f"the processor refused the {kind}: {after.now['error_message']}",
                                     reason="PROCESSOR_REFUSED", subject=f"payment_intents/{intent_id}")
        return after

    # -- finishing operations (the call, the reconciler, webhooks) --------------------------

    async def advance(self, intent_id: int) -> IntentView:
        """Finishes what the intent's log leaves open: the processor call in flight (sent
        again with its key) and the ledger transfers not booked yet. Safe to run at once
        in many processes; returns the intent now (still pending if the processor did
        not answer)."""
        for _ in range(5):
            view = await self.intent(intent_id)
            if view is None:
                raise NotFound(f"no payment intent {intent_id}", reason="PAYMENT_INTENT_NOT_FOUND")
            p = view.pending
            if p:
                if now_ms() - int(p["at_ms"]) > self.s.resend_max_age_s * 1000:
                    log.error("payment_operation_too_old_to_resend", intent_id=intent_id, op=p["kind"])
                    return view
                answer = await self.processor.send(Request.from_json(p["request"]))
                if answer.unknown:
                    log.info("processor_answer_unknown", intent_id=intent_id, op=p["kind"], why=answer.why)
                    return view
                if answer.obj.get("status") == "processing":
                    return view
                failpoint(f"payments.{p['kind']}.after_processor")
                n = int(p["n"])
                outcome = self._outcome(view, p, answer)

                def done(_: Row, o: dict[str, Any] = outcome) -> dict[str, Any]:
                    return o

                await self._transition(intent_id, f"done:{n}", None, None, done, idle=False)
                failpoint(f"payments.{p['kind']}.after_row")
                continue
            if view.now["book"]:
                await self._book_all(view)
                await self._transition(intent_id, f"booked:{view.int_of('n')}", None, None,
                                       lambda c: {"book": ""}, idle=False)
                continue
            await self._unmark_work(intent_id)
            return view
        last = await self.intent(intent_id)
        assert last is not None
        return last

    def _outcome(self, view: IntentView, p: dict[str, Any], a: Answer) -> dict[str, Any]:
        """The next row's fields from the processor's answer to operation ``p``."""
        kind, n = str(p["kind"]), int(p["n"])
        cur = view.now
        out: dict[str, Any] = {"pending": "", "error_type": "", "error_code": "", "decline_code": "",
                               "error_message": ""}
        book: list[dict[str, Any]] = []
        cust, cur_code = view.customer_id, view.currency
        auth_id = _derived_id("auth", view.intent_id)
        if a.refused:
            err = a.error
            out.update(error_type=str(err.get("type") or "invalid_request_error"),
                       error_code=str(err.get("code") or err.get("type") or "refused"),
                       decline_code=str(err.get("decline_code") or ""),
                       error_message=str(err.get("message") or ""))
            if kind in ("confirm", "3ds"):
                pi = a.obj
                out["psp_id"] = str(pi.get("id") or cur["psp_id"] or "")
                out["status"] = PSP_STATUS.get(str(pi.get("status")), REQUIRES_PAYMENT_METHOD) \
                    if a.status == 402 else int(p["prev"])
                if out["status"] not in (REQUIRES_PAYMENT_METHOD, REQUIRES_CONFIRMATION, REQUIRES_ACTION):
                    out["status"] = REQUIRES_PAYMENT_METHOD
            else:
                out["status"] = int(p["prev"])
            return out
        obj = a.obj
        if kind in ("confirm", "3ds", "capture", "cancel"):
            st = PSP_STATUS.get(str(obj.get("status")), int(p["prev"]))
            out.update(status=st, psp_id=str(obj.get("id") or cur["psp_id"]),
                       capturable=int(obj.get("amount_capturable") or 0),
                       received=int(obj.get("amount_received") or 0))
            err = obj.get("last_payment_error") or {}
            if err and st in (REQUIRES_PAYMENT_METHOD,):
                out.update(error_type=str(err.get("type") or "card_error"), error_code=str(err.get("code") or ""), decline_code=str(err.get("decline_code") or ""),
                           error_message=str(err.get("message") or ""))
            was_authorized = int(p["prev"]) == REQUIRES_CAPTURE
            if st == REQUIRES_CAPTURE and not was_authorized:
                book.append({"id": auth_id, "kind": "pending", "debit": self._customer_acct(cust, cur_code),
                             "credit": self._platform_acct("merchant_receivable", cur_code),
                             "amount": out["capturable"], "reference": f"intent:{view.intent_id}:auth"})
            elif st == SUCCEEDED and was_authorized:
                book.append({"id": _derived_id("capture", view.intent_id), "kind": "post", "pending_id": auth_id,
                             "amount": out["received"], "reference": f"intent:{view.intent_id}:capture"})
            elif st == SUCCEEDED:
                book.append({"id": _derived_id("capture", view.intent_id), "kind": "single",
                             "debit": self._customer_acct(cust, cur_code),
                             "credit": self._platform_acct("merchant_receivable", cur_code),
                             "amount": out["received"], "reference": f"intent:{view.intent_id}:capture"})
            elif st == CANCELED and was_authorized:
                book.append({"id": _derived_id("void", view.intent_id), "kind": "void", "pending_id": auth_id,
                             "reference": f"intent:{view.intent_id}:void"})
        elif kind == "refund":
            amount = int(obj.get("amount") or 0)
            refunds = [*view.refunds, {"id": str(obj.get("id") or ""), "amount": amount, "op": n,
                                       "reason": str(p.get("reason") or ""), "at_ms": now_ms()}]
            out.update(refunded=view.int_of("refunded") + amount, refunds=json.dumps(refunds))
            book.append({"id": _derived_id("refund", view.intent_id, obj.get("id") or n), "kind": "single",
                         "debit": self._platform_acct("merchant_receivable", cur_code),
                         "credit": self._customer_acct(cust, cur_code), "amount": amount,
                         "reference": f"intent:{view.intent_id}:refund:{obj.get('id') or n}"})
        out["book"] = json.dumps(book) if book else ""
        return out

    # -- the ledger ------------------------------------------------------------------------

    def _customer_acct(self, customer: int, currency: str) -> int:
        return _derived_id(self.s.book, "customer_funds", currency, customer)

    def _platform_acct(self, code: str, currency: str) -> int:
        return _derived_id(self.s.book, code, currency, 0)

    async def _ensure_account(self, account_id: int, code: str, currency: str, **flags: bool) -> None:
        if account_id in self._accounts:
            return
        await self.ledger.create_account(id=account_id, code=code, currency=currency, **flags)
        self._accounts.add(account_id)

    async def _ensure_accounts(self, customer: int, currency: str) -> None:
        await asyncio.gather(
            self._ensure_account(self._customer_acct(customer, currency), "customer_funds", currency,
                                 credits_must_not_exceed_debits=True),
            self._ensure_account(self._platform_acct("merchant_receivable", currency), "merchant_receivable",
                                 currency, debits_must_not_exceed_credits=True))

    async def _book_all(self, view: IntentView) -> None:
        """Books every transfer the intent's log names, in order (each id once)."""
        await self._ensure_accounts(view.customer_id, view.currency)
        rows = await self._log(view.intent_id)
        booked = {str(r["op"]).split(":", 1)[1] for r in rows if str(r["op"]).startswith("booked:")}
        for row in rows:
            op = str(row["op"])
            if not row["book"] or not op.startswith("done:") or op.split(":", 1)[1] in booked:
                continue
            for t in json.loads(row["book"]):
                try:
                    await self._submit(t)
                except ServiceError as exc:
                    # The audit lists the intent (INTENT_LEDGER_MISMATCH); a person looks.
                    log.error("payment_booking_refused", intent_id=view.intent_id, transfer=t["id"],
                              error=str(exc))

    async def _submit(self, t: dict[str, Any]) -> None:
        kind = t["kind"]
        if kind in ("single", "pending"):
            await self.ledger.transfer(id=t["id"], debit_account_id=t["debit"], credit_account_id=t["credit"],
                                       amount=t["amount"], code="payment", reference=t["reference"],
                                       pending=kind == "pending")
        elif kind == "post":
            await self.ledger.post_pending(id=t["id"], pending_id=t["pending_id"], amount=t["amount"] or None,
                                           code="payment", reference=t["reference"])
        elif kind == "void":
            await self.ledger.void_pending(id=t["id"], pending_id=t["pending_id"], code="payment",
                                           reference=t["reference"])

    def owner_of_account(self, account: Account, caller: int) -> int:
        """``caller`` when the account is the caller's own customer account, else 0."""
        if account.code == "customer_funds" and account.id == self._customer_acct(caller, account.currency):
            return caller
        return 0

    async def customer_accounts(self, customer: int) -> list[Account]:
        out = []
        for cur in sorted(money.CURRENCIES):
            try:
                out.append(await self.ledger.account(self._customer_acct(customer, cur)))
            except NotFound:
                pass
        return out

    # -- the work index and the reconciler --------------------------------------------------

    async def _mark_work(self, intent_id: int) -> None:
        await self.tables.put(PAYMENT_WORK, {"bucket": intent_id % WORK_BUCKETS, "intent_id": intent_id,
                                             "at_ms": now_ms()})

    async def _unmark_work(self, intent_id: int) -> None:
        await self.tables.delete(PAYMENT_WORK, {"bucket": intent_id % WORK_BUCKETS, "intent_id": intent_id})
        # An operation begun meanwhile marked it before its first row: mark it again.
        view = await self.intent(intent_id)
        if view is not None and (view.now["pending"] or view.now["book"]):
            await self._mark_work(intent_id)

    async def reconcile(self, *, min_age_s: float | None = None) -> int:
        """One pass over the work index: finishes each intent left there longer than
        ``min_age_s``. Returns how many were looked at."""
        age = self.s.reconcile_after_s if min_age_s is None else min_age_s
        cutoff = now_ms() - int(age * 1000)
        seen = 0
        sem = asyncio.Semaphore(32)

        async def one(intent_id: int) -> None:
            async with sem:
                try:
                    await self.advance(intent_id)
                except Exception as exc:
                    log.warning("reconcile_failed", intent_id=intent_id, error=repr(exc))

        for bucket in range(WORK_BUCKETS):
            rows = (await self.tables.slice(PAYMENT_WORK, {"bucket": bucket}, limit=1000)).rows
            due = [int(r["intent_id"]) for r in rows if int(r["at_ms"] or 0) <= cutoff]
            seen += len(due)
            await asyncio.gather(*(one(i) for i in due))
        return seen

    async def webhook(self, event: dict[str, Any]) -> str:
        """A verified processor event: recorded once, then its intent is looked at again.
        Returns what was done ("duplicate", "unknown_intent", "applied")."""
        event_id = str(event.get("id") or "")
        intent_id = intent_of_event(event)
        first = await self.tables.put(PAYMENT_WEBHOOK_EVENTS, {"event_id": event_id, "type": str(event.get("type")),
                                                               "intent_id": intent_id or 0,
                                                               "received_ms": now_ms()}, if_not_exists=True)
        if not first:
            return "duplicate"
        if not intent_id or await self.intent(intent_id) is None:
            return "unknown_intent"
        await self.advance(intent_id)
        return "applied"

    # -- the audit -------------------------------------------------------------------------

    async def audit(self, dates: list[str]) -> AuditReport:
        findings = list(await self.ledger.audit())
        report = AuditReport(findings)
        days = sorted(set(dates)) or [utc_day(now_ms())]
        ids: set[int] = set()
        for day in days:
            for b in range(INTENT_DAY_BUCKETS):
                token = ""
                while True:
                    page = await self.tables.slice(PAYMENT_INTENTS_BY_DAY, {"day": day, "bucket": b}, limit=1000,
                                                   page_token=token)
                    ids.update(int(r["intent_id"]) for r in page.rows)
                    token = page.next_page_token
                    if not token:
                        break
        psp: dict[int, dict[str, int]] = {}
        if dates:
            for day in days:
                text = await self.processor.settlement_report(day)
                for row in csv.DictReader(io.StringIO(text)):
                    report.settlement_rows_checked += 1
                    ref = row.get("merchant_reference") or ""
                    if not ref.isdigit():
                        findings.append(Finding("SETTLEMENT_MISSING_IN_LEDGER", row.get("payment_intent_id", ""),
                                                f"{row.get('reporting_category')} with no intent reference"))
                        continue
                    got = psp.setdefault(int(ref), {"charge": 0, "refund": 0})
                    got[row["reporting_category"]] = got.get(row["reporting_category"], 0) + abs(int(row["gross"]))
                    ids.add(int(ref))
        sem = asyncio.Semaphore(32)

        async def check(intent_id: int) -> None:
            async with sem:
                await self._audit_intent(intent_id, psp.get(intent_id) if dates else None, findings)

        await asyncio.gather(*(check(i) for i in sorted(ids)))
        report.intents_checked = len(ids)
        return report

    async def _audit_intent(self, intent_id: int, settled: dict[str, int] | None, findings: list[Finding]) -> None:
        view = await self.intent(intent_id)
        subject = f"payment_intents/{intent_id}"
        if view is None:
            findings.append(Finding("SETTLEMENT_MISSING_IN_LEDGER", subject, "the processor settled money for an "
                                                                             "intent this service does not have"))
            return
        if view.now["pending"] or view.now["book"]:
            findings.append(Finding("INTENT_PROCESSING", subject, "an operation is not finished (the reconciler "
                                                                  "completes it)"))
            return
        authorized = 0
        captured = 0
        refunded = 0
        for row in await self._log(intent_id):
            for t in json.loads(row["book"]) if row["book"] else []:
                try:
                    tr = await self.ledger.get_transfer(int(t["id"]))
                except NotFound:
                    findings.append(Finding("INTENT_LEDGER_MISMATCH", subject, f"transfer {t['id']} ({t['kind']}) "
                                                                               "is not in the ledger"))
                    continue
                if t["kind"] == "pending":
                    authorized += tr.amount
                elif t["kind"] in ("post", "single") and ":capture" in t["reference"]:
                    captured += tr.amount
                    authorized += tr.amount if t["kind"] == "single" else 0
                elif ":refund:" in t["reference"]:
                    refunded += tr.amount
        if captured > authorized:
            findings.append(Finding("INTENT_OVER_CAPTURED", subject, f"captured {captured} > authorized {authorized}"))
        if refunded > captured:
            findings.append(Finding("INTENT_OVER_REFUNDED", subject, f"refunded {refunded} > captured {captured}"))
        if captured != view.int_of("received") or refunded != view.int_of("refunded"):
            findings.append(Finding("INTENT_LEDGER_MISMATCH", subject,
                                    f"intent says received {view.int_of('received')} refunded "
                                    f"{view.int_of('refunded')}; ledger has {captured} and {refunded}"))
        if settled is not None and (captured, refunded) != (settled.get("charge", 0), settled.get("refund", 0)):
            if captured or refunded or settled.get("charge") or settled.get("refund"):
                findings.append(Finding("SETTLEMENT_MISMATCH", subject,
                                        f"ledger captured {captured} refunded {refunded}; the processor's report "
                                        f"has {settled.get('charge', 0)} and {settled.get('refund', 0)}"))


def intent_of_event(event: dict[str, Any]) -> int:
    """Our intent's id from a processor event: the idempotency key we sent, else metadata['ref']."""
    key = str(((event.get("request") or {}).get("idempotency_key")) or "")
    if key.startswith("sd-"):
        part = key.split("-")[1]
        if part.isdigit():
            return int(part)
    obj = (event.get("data") or {}).get("object") or {}
    ref = str((obj.get("metadata") or {}).get("ref") or "")
    return int(ref) if ref.isdigit() else 0


class _WrongStatus(FailedPrecondition):
    """The intent is (or just moved) in a status the operation does not start from."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the payment intent is {STATUS_NAMES.get(status, status)} now",
                         reason="INTENT_STATUS_CHANGED", subject=STATUS_NAMES.get(status, ""))
        self.status = status

    def as_error(self, verb: str, reason: str) -> FailedPrecondition:
        return FailedPrecondition(f"a payment intent in status {STATUS_NAMES.get(self.status)} cannot be {verb}",
                                  reason=reason, kind=reason, subject=STATUS_NAMES.get(self.status, ""))


__all__ = ["AuditReport", "IntentView", "PaymentsCore", "PaymentsSettings", "Unresolved", "intent_of_event",
           "mask_card", "parse_money", "utc_day"]
