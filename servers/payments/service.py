"""sysdesign.payments.v1: PaymentService and LedgerService, the reconciler, and webhooks.

Thin adapters: the customer comes from the token, messages become calls on
PaymentsCore (servers/payments/intents.py) and the Ledger
(servers/payments/ledger.py), and rows become messages again. Mutating calls
go through the platform's idempotency keys (servers/platform/idempotency.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.payments.v1 import payments_pb2 as pb
from sysdesign.payments.v1 import payments_pb2_grpc as pb_grpc

from servers.payments import money
from servers.payments.intents import IntentView, PaymentsCore, mask_card, parse_money
from servers.payments.ledger import ACCOUNT_CODES, Account, Balance, Entry, Transfer
from servers.payments.processor import WebhookRejected
from servers.payments.tables import TABLES as PAYMENT_TABLES
from servers.platform.auth import Caller, require_caller
from servers.platform.errors import InvalidArgument, NotFound, PermissionDenied, Violations
from servers.platform.events import TABLES as EVENT_TABLES
from servers.platform.idempotency import TABLES as IDEMPOTENCY_TABLES
from servers.platform.idempotency import IdempotencyStore
from servers.platform.runtime import Runtime

log = structlog.get_logger("sysdesign.payments")

PAYMENT = pb.DESCRIPTOR.services_by_name["PaymentService"].full_name
LEDGER = pb.DESCRIPTOR.services_by_name["LedgerService"].full_name
PUBLIC_METHODS: set[str] = set()
TABLES = PAYMENT_TABLES + IDEMPOTENCY_TABLES + EVENT_TABLES
WEBHOOK_PATH = "/webhooks/psp"

CODE_OF = {name: i + 1 for i, name in enumerate(ACCOUNT_CODES)}  # AccountCode values follow ACCOUNT_CODES
KIND_OF = {"single": pb.TRANSFER_KIND_SINGLE, "pending": pb.TRANSFER_KIND_PENDING, "post": pb.TRANSFER_KIND_POST,
           "void": pb.TRANSFER_KIND_VOID}


def _ts(ms: int) -> Timestamp | None:
    if not ms:
        return None
    t = Timestamp()
    t.FromMilliseconds(int(ms))
    return t


def money_message(currency: str, minor: int) -> pb.Money:
    exp = money.exponent(currency)
    whole, frac = divmod(int(minor), 10**exp)
    value = f"{whole}.{frac:0{exp}d}" if exp else str(whole)
    return pb.Money(currency_code=currency, value=value, amount_minor=int(minor))


def intent_message(v: IntentView) -> pb.PaymentIntent:
    h, n, cur = v.header, v.now, v.currency
    err = None
    if n["error_code"]:
        err = pb.PaymentError(code=str(n["error_code"]), decline_code=str(n["decline_code"] or ""),
                              message=str(n["error_message"] or ""))
    return pb.PaymentIntent(
        payment_intent_id=str(v.intent_id), customer_id=str(v.customer_id), amount=money_message(cur, v.amount),
        status=v.status,  # type: ignore[arg-type]
        capture_method=int(h["capture_method"]),  # type: ignore[arg-type]
        amount_capturable=money_message(cur, v.int_of("capturable")),
        amount_received=money_message(cur, v.int_of("received")),
        amount_refunded=money_message(cur, v.int_of("refunded")),
        description=str(h["description"] or ""), metadata=json.loads(h["metadata"] or "{}"),
        payment_method=mask_card(str(n["payment_method"] or "")), last_payment_error=err,
        processor_reference=str(n["psp_id"] or ""),
        refunds=[refund_message(cur, r) for r in v.refunds],
        cancellation_reason=str(n["cancellation_reason"] or ""),
        create_time=_ts(int(h["create_ms"])), update_time=_ts(int(n["at_ms"])),
    )


def intent_event(v: IntentView, previous_status: int) -> pb.PaymentIntentEvent:
    """What a status change publishes on payments.intents (docs/events.md)."""
    return pb.PaymentIntentEvent(payment_intent=intent_message(v),
                                 previous_status=previous_status,  # type: ignore[arg-type]
                                 sequence=int(v.now["seq"]))


def core_of(rt: Runtime) -> PaymentsCore:
    """The process's PaymentsCore, publishing its intents' status changes."""
    return PaymentsCore.for_runtime(rt, event_of=intent_event)


def refund_message(currency: str, r: dict[str, Any]) -> pb.Refund:
    return pb.Refund(refund_id=str(r["id"]), amount=money_message(currency, int(r["amount"])),
                     reason=str(r.get("reason") or ""), create_time=_ts(int(r.get("at_ms") or 0)))


def _id(raw: str) -> int:
    return int(raw)


def _amount(m: pb.Money, path: str, currency: str | None = None) -> tuple[str, int]:
    """A request's Money -> (currency, minor units), or INVALID_ARGUMENT naming the field."""
    v = Violations()
    if currency is not None and m.currency_code != currency:
        v.add(f"{path}.currency_code", f"must be the intent's currency, {currency}")
        v.raise_if_any()
    cur, minor, bad = parse_money(m.currency_code, m.value, path)
    for f, why in bad:
        v.add(f, why)
    v.raise_if_any()
    return cur, minor


class PaymentServicer(pb_grpc.PaymentServiceServicer):
    def __init__(self, core: PaymentsCore, idem: IdempotencyStore) -> None:
        self.core = core
        self.idem = idem

    async def _once(self, method: str, caller: Caller, request: Any, response_type: type[Any],
                    handler: Callable[[], Awaitable[Message]]) -> Any:
        return await self.idem.run(scope=f"payments.{method}", owner=caller.user_id,
                                   key=request.idempotency_key, request=request, response_type=response_type,
                                   handler=handler)

    async def CreatePaymentIntent(self, request: pb.CreatePaymentIntentRequest,
                                  context: Any) -> pb.CreatePaymentIntentResponse:
        caller = require_caller()
        currency, minor = _amount(request.amount, "amount")

        async def run() -> pb.CreatePaymentIntentResponse:
            view = await self.core.create(caller.user_id, currency=currency, amount=minor,
                                          capture_method=int(request.capture_method),
                                          payment_method=request.payment_method, description=request.description,
                                          metadata=dict(request.metadata))
            return pb.CreatePaymentIntentResponse(payment_intent=intent_message(view))

        return await self._once("CreatePaymentIntent", caller, request, pb.CreatePaymentIntentResponse, run)

    async def ConfirmPaymentIntent(self, request: pb.ConfirmPaymentIntentRequest,
                                   context: Any) -> pb.ConfirmPaymentIntentResponse:
        caller = require_caller()

        async def run() -> pb.ConfirmPaymentIntentResponse:
            view = await self.core.confirm(caller.user_id, _id(request.payment_intent_id),
                                           payment_method=request.payment_method,
                                           three_d_secure=int(request.three_d_secure),
                                           client_key=request.idempotency_key)
            return pb.ConfirmPaymentIntentResponse(payment_intent=intent_message(view))

        return await self._once("ConfirmPaymentIntent", caller, request, pb.ConfirmPaymentIntentResponse, run)

    async def CapturePaymentIntent(self, request: pb.CapturePaymentIntentRequest,
                                   context: Any) -> pb.CapturePaymentIntentResponse:
        caller = require_caller()

        async def run() -> pb.CapturePaymentIntentResponse:
            intent_id = _id(request.payment_intent_id)
            amount = None
            if request.HasField("amount_to_capture"):
                view = await self.core.intent_for(caller.user_id, intent_id)
                _, amount = _amount(request.amount_to_capture, "amount_to_capture", view.currency)
            view = await self.core.capture(caller.user_id, intent_id, amount, request.idempotency_key)
            return pb.CapturePaymentIntentResponse(payment_intent=intent_message(view))

        return await self._once("CapturePaymentIntent", caller, request, pb.CapturePaymentIntentResponse, run)

    async def CancelPaymentIntent(self, request: pb.CancelPaymentIntentRequest,
                                  context: Any) -> pb.CancelPaymentIntentResponse:
        caller = require_caller()

        async def run() -> pb.CancelPaymentIntentResponse:
            view = await self.core.cancel(caller.user_id, _id(request.payment_intent_id),
                                          request.cancellation_reason, request.idempotency_key)
            return pb.CancelPaymentIntentResponse(payment_intent=intent_message(view))

        return await self._once("CancelPaymentIntent", caller, request, pb.CancelPaymentIntentResponse, run)

    async def RefundPayment(self, request: pb.RefundPaymentRequest, context: Any) -> pb.RefundPaymentResponse:
        caller = require_caller()

        async def run() -> pb.RefundPaymentResponse:
            intent_id = _id(request.payment_intent_id)
            amount = None
            if request.HasField("amount"):
                view = await self.core.intent_for(caller.user_id, intent_id)
                _, amount = _amount(request.amount, "amount", view.currency)
            refund, view = await self.core.refund(caller.user_id, intent_id, amount, request.reason,
                                                  request.idempotency_key)
            return pb.RefundPaymentResponse(refund=refund_message(view.currency, refund),
                                            payment_intent=intent_message(view))

        return await self._once("RefundPayment", caller, request, pb.RefundPaymentResponse, run)

    async def GetPaymentIntent(self, request: pb.GetPaymentIntentRequest,
                               context: Any) -> pb.GetPaymentIntentResponse:
        caller = require_caller()
        view = await self.core.intent_for(caller.user_id, _id(request.payment_intent_id))
        return pb.GetPaymentIntentResponse(payment_intent=intent_message(view))

    async def ListPayments(self, request: pb.ListPaymentsRequest, context: Any) -> pb.ListPaymentsResponse:
        caller = require_caller()
        views, token = await self.core.list_intents(caller.user_id, request.page_size, request.page_token)
        return pb.ListPaymentsResponse(payment_intents=[intent_message(v) for v in views], next_page_token=token)


def account_message(a: Account, b: Balance, owner: int = 0) -> pb.Account:
    return pb.Account(account_id=str(a.id), code=CODE_OF[a.code],  # type: ignore[arg-type]
                      currency_code=a.currency,
                      debits_must_not_exceed_credits=a.debits_must_not_exceed_credits,
                      credits_must_not_exceed_debits=a.credits_must_not_exceed_debits,
                      debits_posted=b.debits_posted, credits_posted=b.credits_posted,
                      debits_pending=b.debits_pending, credits_pending=b.credits_pending,
                      owner_id=str(owner) if owner else "", create_time=_ts(a.created_ms))


def entry_message(e: Entry) -> pb.Entry:
    return pb.Entry(seq=e.seq, transfer_id=str(e.transfer_id) if e.transfer_id else "",
                    side={"d": "debit", "c": "credit"}.get(e.side, e.side), op=e.op, amount_minor=e.amount,
                    debits_posted=e.debits_posted, credits_posted=e.credits_posted,
                    debits_pending=e.debits_pending, credits_pending=e.credits_pending, create_time=_ts(e.at_ms))


def transfer_message(t: Transfer) -> pb.Transfer:
    return pb.Transfer(transfer_id=str(t.id), kind=KIND_OF[t.kind], debit_account_id=str(t.debit_account_id),
                       credit_account_id=str(t.credit_account_id), amount_minor=t.amount, currency_code=t.currency,
                       code=t.code, reference=t.reference, pending_id=str(t.pending_id) if t.pending_id else "",
                       status=t.status)


class LedgerServicer(pb_grpc.LedgerServiceServicer):
    def __init__(self, core: PaymentsCore) -> None:
        self.core = core
        self.ledger = core.ledger

    def _operator(self) -> Caller:
        caller = require_caller()
        if caller.username not in self.core.s.operators:
            raise PermissionDenied("only the ledger's operators (SYSDESIGN_PAYMENTS_OPERATORS) may do this",
                                   reason="NOT_A_LEDGER_OPERATOR")
        return caller

    def _is_operator(self, caller: Caller) -> bool:
        return caller.username in self.core.s.operators

    async def _readable(self, caller: Caller, account_id: int) -> tuple[Account, int]:
        """The account if the caller may see it (theirs, or any for an operator), and its owner."""
        try:
            acct = await self.ledger.account(account_id)
        except NotFound:
            raise NotFound(f"no account {account_id}", reason="ACCOUNT_NOT_FOUND") from None
        owner = self.core.owner_of_account(acct, caller.user_id)
        if owner != caller.user_id and not self._is_operator(caller):
            raise NotFound(f"no account {account_id}", reason="ACCOUNT_NOT_FOUND")
        return acct, owner

    async def ListAccounts(self, request: pb.ListAccountsRequest, context: Any) -> pb.ListAccountsResponse:
        caller = require_caller()
        if self._is_operator(caller):
            ids = []
            for cur in [request.currency_code] if request.currency_code else sorted(money.CURRENCIES):
                ids += await self.ledger.accounts(cur)
            accts = [await self.ledger.account(i) for i in ids]
        else:
            accts = [a for a in await self.core.customer_accounts(caller.user_id)
                     if not request.currency_code or a.currency == request.currency_code]
        out = []
        for a in accts:
            owner = self.core.owner_of_account(a, caller.user_id)
            out.append(account_message(a, await self.ledger.balance(a.id), owner))
        return pb.ListAccountsResponse(accounts=out)

    async def GetAccount(self, request: pb.GetAccountRequest, context: Any) -> pb.GetAccountResponse:
        caller = require_caller()
        acct, owner = await self._readable(caller, _id(request.account_id))
        return pb.GetAccountResponse(account=account_message(acct, await self.ledger.balance(acct.id), owner))

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Any) -> pb.ListEntriesResponse:
        caller = require_caller()
        acct, _ = await self._readable(caller, _id(request.account_id))
        page = await self.ledger.entries(acct.id, request.page_size or 100, request.page_token)
        return pb.ListEntriesResponse(entries=[entry_message(e) for e in page.entries],
                                      next_page_token=page.next_page_token)

    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Any) -> pb.CreateAccountResponse:
        self._operator()
        acct = await self.ledger.create_account(
            id=int(request.account_id), code=ACCOUNT_CODES[int(request.code) - 1], currency=request.currency_code,
            debits_must_not_exceed_credits=request.debits_must_not_exceed_credits,
            credits_must_not_exceed_debits=request.credits_must_not_exceed_debits)
        return pb.CreateAccountResponse(account=account_message(acct, await self.ledger.balance(acct.id)))

    async def CreateTransfer(self, request: pb.CreateTransferRequest, context: Any) -> pb.CreateTransferResponse:
        self._operator()
        kind = int(request.kind)
        tid = int(request.transfer_id)
        if kind in (pb.TRANSFER_KIND_SINGLE, pb.TRANSFER_KIND_PENDING):
            t = await self.ledger.transfer(id=tid, debit_account_id=int(request.debit_account_id),
                                           credit_account_id=int(request.credit_account_id),
                                           amount=int(request.amount_minor), code=request.code,
                                           reference=request.reference, pending=kind == pb.TRANSFER_KIND_PENDING,
                                           timeout_s=int(request.timeout_seconds))
        elif kind == pb.TRANSFER_KIND_POST:
            t = await self.ledger.post_pending(id=tid, pending_id=int(request.pending_id),
                                               amount=int(request.amount_minor) or None, code=request.code,
                                               reference=request.reference)
        else:
            t = await self.ledger.void_pending(id=tid, pending_id=int(request.pending_id), code=request.code,
                                               reference=request.reference)
        return pb.CreateTransferResponse(transfer=transfer_message(t))

    async def GetTransfer(self, request: pb.GetTransferRequest, context: Any) -> pb.GetTransferResponse:
        self._operator()
        return pb.GetTransferResponse(transfer=transfer_message(await self.ledger.get_transfer(
            _id(request.transfer_id))))

    async def Audit(self, request: pb.AuditRequest, context: Any) -> pb.AuditResponse:
        self._operator()
        bad = [(f"settlement_dates[{i}]", "is not a date") for i, d in enumerate(request.settlement_dates)
               if not _is_date(d)]
        if bad:
            raise InvalidArgument(bad)
        report = await self.core.audit(list(request.settlement_dates))
        return pb.AuditResponse(
            clean=report.clean,
            findings=[pb.AuditFinding(kind=f.kind, subject=f.subject, detail=f.detail) for f in report.findings],
            accounts_checked=report.accounts_checked, entries_checked=report.entries_checked,
            intents_checked=report.intents_checked, settlement_rows_checked=report.settlement_rows_checked)


def _is_date(d: str) -> bool:
    from datetime import date

    try:
        date.fromisoformat(d)
    except ValueError:
        return False
    return True


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    core = core_of(rt)
    # How long a claimed key is held by a call whose process may have died.
    lease_s = float(os.environ.get("SYSDESIGN_IDEMPOTENCY_LEASE_SECONDS", "30"))
    idem = rt.singleton("idempotency", lambda: IdempotencyStore(rt.tables, lease_s=lease_s))
    pb_grpc.add_PaymentServiceServicer_to_server(PaymentServicer(core, idem), server)
    pb_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(core), server)
    return [PAYMENT, LEDGER]


async def sweep(rt: Runtime) -> float:
    """The `reconciler` worker: finishes intents left with a processor call or a booking
    open (and transfers left in flight in the ledger), and appends the status-change
    events a crash kept from their stream; returns the seconds until the next pass."""
    core = core_of(rt)
    n = await core.reconcile()
    if n:
        log.info("reconciled", intents=n)
    await core.ledger.recover()
    try:
        await core.sweep_events()
    except Exception as exc:  # the events wait for the next pass; the reconciler goes on
        log.warning("payment_events_sweep_failed", error=repr(exc))
    return core.s.reconcile_every_s


def edge_routes(app: Any, rt: Runtime) -> None:
    """POST /webhooks/psp on the HTTP edge: the processor's signed events."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        core = core_of(rt)
        raw = await request.read()
        try:
            core.processor.verify_webhook(raw, request.headers)
        except WebhookRejected as exc:
            return web.Response(status=400, text=f"bad signature: {exc}\n")
        try:
            event = json.loads(raw)
        except ValueError:
            return web.Response(status=400, text="the body is not JSON\n")
        if not isinstance(event, dict) or not event.get("id"):
            return web.Response(status=400, text="not an event\n")
        done = await core.webhook(event)
        return web.json_response({"received": True, "result": done})

    app.router.add_post(WEBHOOK_PATH, receive)


__all__ = ["PUBLIC_METHODS", "TABLES", "edge_routes", "register", "sweep"]
