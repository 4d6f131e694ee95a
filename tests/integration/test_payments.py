"""Payments against a real stack and the real processor stand-in (`sysdesign sim psp`) over HTTP.

The stack's webhooks come from the stand-in to the stack's edge; the
reconciler runs in the stack every few hundred milliseconds. Each test uses
its own users, so the intents of one never meet another's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import grpc
import pytest
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.payments.v1 import payments_pb2 as pb
from sysdesign.payments.v1 import payments_pb2_grpc as pbg

from servers.sim.psp import sign_payload
from tests.integration.helpers import error_reason, violations
from tests.sims import KEY, WHSEC, SimPsp
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables]

OPERATOR = "op" + uuid.uuid4().hex[:10]
AUTH = {"Authorization": f"Bearer {KEY}"}


class Env:
    def __init__(self, stack: StackProcess, psp: SimPsp) -> None:
        self.stack, self.psp = stack, psp


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("payments")
    stack = StackProcess(root / "data")
    psp = SimPsp(root / "psp", "--webhook-retry-base-ms", "200",
                 webhook_url=f"{stack.http_base}/webhooks/psp").start()
    stack.extra_env.update({
        "SYSDESIGN_PSP_URL": psp.url, "SYSDESIGN_PSP_SECRET_KEY": KEY, "SYSDESIGN_PSP_WEBHOOK_SECRET": WHSEC,
        "SYSDESIGN_PSP_TIMEOUT_SECONDS": "3",
        "SYSDESIGN_PAYMENTS_OPERATORS": OPERATOR,
        "SYSDESIGN_PAYMENTS_RECONCILE_SECONDS": "0.3", "SYSDESIGN_PAYMENTS_RECONCILE_AFTER_SECONDS": "1",
    })
    stack.start()
    yield Env(stack, psp)
    try:
        assert stack.stop() == 0, stack.logs()
    finally:
        psp.stop()


class User:
    def __init__(self, user_id: str, token: str) -> None:
        self.user_id = user_id
        self.md = (("authorization", f"Bearer {token}"),)


async def new_user(ch: grpc.aio.Channel, name: str = "") -> User:
    ident = ipbg.IdentityServiceStub(ch)
    name = name or "p" + uuid.uuid4().hex[:12]
    try:
        reg = await ident.RegisterUser(ipb.RegisterUserRequest(username=name, password="correct horse battery"))
        uid = reg.user.user_id
    except grpc.aio.AioRpcError:
        uid = ""
    tok = await ident.Login(ipb.LoginRequest(username=name, password="correct horse battery"))
    return User(uid or tok.user.user_id, tok.access_token)


def usd(value: str) -> pb.Money:
    return pb.Money(currency_code="USD", value=value)


async def faults(psp: SimPsp, **values: Any) -> None:
    async with aiohttp.ClientSession() as s, s.post(f"{psp.url}/_sim/faults", json=values) as r:
        assert r.status == 200, await r.text()


async def psp_get(psp: SimPsp, path: str, **params: str) -> Any:
    async with aiohttp.ClientSession(headers=AUTH) as s, s.get(psp.url + path, params=params) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def wait_status(stub: pbg.PaymentServiceStub, user: User, intent_id: str, status: int,
                      within_s: float = 20) -> pb.PaymentIntent:
    deadline = time.monotonic() + within_s
    while True:
        got = (await stub.GetPaymentIntent(pb.GetPaymentIntentRequest(payment_intent_id=intent_id),
                                           metadata=user.md)).payment_intent
        if got.status == status or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


async def audit_of(ch: grpc.aio.Channel, intent_ids: set[str], dates: list[str] | None = None) -> list[Any]:
    """The audit's findings about these intents, and any about the books themselves."""
    op = await new_user(ch, OPERATOR)
    rep = await pbg.LedgerServiceStub(ch).Audit(pb.AuditRequest(settlement_dates=dates or []), metadata=op.md)
    return [f for f in rep.findings
            if f.subject.split("/")[-1] in intent_ids or not f.subject.startswith("payment_intents/")]


def test_an_automatic_payment_is_charged_once_and_refunded_in_parts(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            created = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("10.00"), payment_method="4242424242424242", description="order 1",
                metadata={"order": "1"}), metadata=u.md)).payment_intent
            assert created.status == pb.PAYMENT_INTENT_STATUS_REQUIRES_CONFIRMATION
            assert created.amount.amount_minor == 1000 and created.amount.value == "10.00"
            assert created.customer_id == u.user_id and created.payment_method == "visa ending 4242"
            pi = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=created.payment_intent_id), metadata=u.md)).payment_intent
            assert pi.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED, pi
            assert pi.amount_received.amount_minor == 1000 and pi.processor_reference.startswith("pi_")
            # The processor has exactly this one charge for it.
            found = await psp_get(env.psp, "/v1/payment_intents/search",
                                  query=f"metadata['ref']:'{pi.payment_intent_id}'")
            assert [x["amount_received"] for x in found["data"]] == [1000]

            r1 = await pay.RefundPayment(pb.RefundPaymentRequest(payment_intent_id=pi.payment_intent_id,
                                                                 amount=usd("3.00"), reason="damaged"),
                                         metadata=u.md)
            assert r1.refund.amount.amount_minor == 300 and r1.refund.refund_id.startswith("re_")
            assert r1.payment_intent.amount_refunded.amount_minor == 300
            assert r1.payment_intent.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as too_much:
                await pay.RefundPayment(pb.RefundPaymentRequest(payment_intent_id=pi.payment_intent_id,
                                                                amount=usd("7.01")), metadata=u.md)
            assert too_much.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "amount.value" in violations(too_much.value)
            rest = await pay.RefundPayment(pb.RefundPaymentRequest(payment_intent_id=pi.payment_intent_id),
                                           metadata=u.md)
            assert rest.refund.amount.amount_minor == 700
            assert rest.payment_intent.amount_refunded.amount_minor == 1000
            assert [r.amount.amount_minor for r in rest.payment_intent.refunds] == [300, 700]
            with pytest.raises(grpc.aio.AioRpcError) as done:
                await pay.RefundPayment(pb.RefundPaymentRequest(payment_intent_id=pi.payment_intent_id),
                                        metadata=u.md)
            assert done.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(done.value) == "INTENT_FULLY_REFUNDED"

            # The customer's ledger account: paid 10.00, got 10.00 back.
            ledger = pbg.LedgerServiceStub(ch)
            accts = (await ledger.ListAccounts(pb.ListAccountsRequest(), metadata=u.md)).accounts
            assert [(a.code, a.currency_code, a.debits_posted, a.credits_posted, a.owner_id) for a in accts] == [
                (pb.ACCOUNT_CODE_CUSTOMER_FUNDS, "USD", 1000, 1000, u.user_id)]
            entries = (await ledger.ListEntries(pb.ListEntriesRequest(account_id=accts[0].account_id),
                                                metadata=u.md)).entries
            assert [(e.side, e.op, e.amount_minor) for e in entries] == [
                ("debit", "single", 1000), ("credit", "single", 300), ("credit", "single", 700)]
            listed = (await pay.ListPayments(pb.ListPaymentsRequest(), metadata=u.md)).payment_intents
            assert [p.payment_intent_id for p in listed] == [pi.payment_intent_id]
            today = datetime.now(UTC).date().isoformat()
            assert await audit_of(ch, {pi.payment_intent_id}, [today]) == []

    run(go())


def test_manual_capture_in_part_and_a_cancelled_authorization(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)

            async def authorized(value: str) -> pb.PaymentIntent:
                c = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                    amount=usd(value), capture_method=pb.CAPTURE_METHOD_MANUAL,
                    payment_method="pm_card_visa"), metadata=u.md)).payment_intent
                return (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                    payment_intent_id=c.payment_intent_id), metadata=u.md)).payment_intent

            a = await authorized("50.00")
            assert a.status == pb.PAYMENT_INTENT_STATUS_REQUIRES_CAPTURE
            assert a.amount_capturable.amount_minor == 5000 and a.amount_received.amount_minor == 0
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await pay.CapturePaymentIntent(pb.CapturePaymentIntentRequest(
                    payment_intent_id=a.payment_intent_id, amount_to_capture=usd("50.01")), metadata=u.md)
            assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "amount_to_capture.value" in violations(over.value)
            cap = (await pay.CapturePaymentIntent(pb.CapturePaymentIntentRequest(
                payment_intent_id=a.payment_intent_id, amount_to_capture=usd("40.00")), metadata=u.md)).payment_intent
            assert cap.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED
            assert cap.amount_received.amount_minor == 4000 and cap.amount_capturable.amount_minor == 0
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await pay.CancelPaymentIntent(pb.CancelPaymentIntentRequest(payment_intent_id=a.payment_intent_id),
                                              metadata=u.md)
            assert error_reason(late.value) == "INTENT_NOT_CANCELABLE"

            b = await authorized("20.00")
            canceled = (await pay.CancelPaymentIntent(pb.CancelPaymentIntentRequest(
                payment_intent_id=b.payment_intent_id, cancellation_reason="out of stock"),
                metadata=u.md)).payment_intent
            assert canceled.status == pb.PAYMENT_INTENT_STATUS_CANCELED
            assert canceled.cancellation_reason == "out of stock" and canceled.amount_capturable.amount_minor == 0
            with pytest.raises(grpc.aio.AioRpcError) as nope:
                await pay.CapturePaymentIntent(pb.CapturePaymentIntentRequest(payment_intent_id=b.payment_intent_id),
                                               metadata=u.md)
            assert nope.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(nope.value) == "INTENT_NOT_CAPTURABLE"
            at_psp = await psp_get(env.psp, f"/v1/payment_intents/{b.processor_reference}")
            assert at_psp["status"] == "canceled" and at_psp["amount_received"] == 0

            # Held 50 and 20, posted 40 of the first and voided the second: the customer paid 40.
            accts = (await pbg.LedgerServiceStub(ch).ListAccounts(pb.ListAccountsRequest(), metadata=u.md)).accounts
            assert [(a.debits_posted, a.debits_pending, a.credits_posted) for a in accts] == [(4000, 0, 0)]
            assert await audit_of(ch, {a.payment_intent_id, b.payment_intent_id}) == []

    run(go())


def test_declines_and_the_second_step(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            c = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("12.00"), payment_method="4000000000009995"), metadata=u.md)).payment_intent
            d = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=c.payment_intent_id), metadata=u.md)).payment_intent
            assert d.status == pb.PAYMENT_INTENT_STATUS_REQUIRES_PAYMENT_METHOD
            assert (d.last_payment_error.code, d.last_payment_error.decline_code) == ("card_declined",
                                                                                     "insufficient_funds")
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                    payment_intent_id=c.payment_intent_id), metadata=u.md)
            assert "payment_method" in violations(again.value)
            ok = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=c.payment_intent_id, payment_method="4242424242424242"),
                metadata=u.md)).payment_intent
            assert ok.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED and not ok.HasField("last_payment_error")
            assert ok.amount_received.amount_minor == 1200

            three = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("5.00"), payment_method="4000002500003155"), metadata=u.md)).payment_intent
            step = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=three.payment_intent_id), metadata=u.md)).payment_intent
            assert step.status == pb.PAYMENT_INTENT_STATUS_REQUIRES_ACTION
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                    payment_intent_id=three.payment_intent_id), metadata=u.md)
            assert "three_d_secure" in violations(missing.value)
            passed = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=three.payment_intent_id, three_d_secure=pb.THREE_D_SECURE_RESULT_PASS),
                metadata=u.md)).payment_intent
            assert passed.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED

            failing = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("5.00"), payment_method="4000002500003155"), metadata=u.md)).payment_intent
            await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=failing.payment_intent_id), metadata=u.md)
            failed = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                payment_intent_id=failing.payment_intent_id, three_d_secure=pb.THREE_D_SECURE_RESULT_FAIL),
                metadata=u.md)).payment_intent
            assert failed.status == pb.PAYMENT_INTENT_STATUS_REQUIRES_PAYMENT_METHOD
            assert failed.last_payment_error.code == "payment_intent_authentication_failure"
            accts = (await pbg.LedgerServiceStub(ch).ListAccounts(pb.ListAccountsRequest(), metadata=u.md)).accounts
            assert [a.debits_posted for a in accts] == [1700]
            assert await audit_of(ch, {c.payment_intent_id, three.payment_intent_id,
                                       failing.payment_intent_id}) == []

    run(go())


@pytest.mark.parametrize(("money", "field", "words"), [
    (pb.Money(currency_code="USD", value="-5.00"), "amount.value", "positive"),
    (pb.Money(currency_code="USD", value="0"), "amount.value", "more than zero"),
    (pb.Money(currency_code="USD", value="1000000.00"), "amount.value", "at most"),
    (pb.Money(currency_code="XYZ", value="5.00"), "amount.currency_code", "not a currency"),
    (pb.Money(currency_code="USD", value="10.005"), "amount.value", "decimal places"),
    (pb.Money(currency_code="JPY", value="100.5"), "amount.value", "JPY has 0"),
    (pb.Money(currency_code="usd", value="5.00"), "amount.currency_code", ""),
    (pb.Money(currency_code="USD", value="5,00"), "amount.value", ""),
])
def test_bad_amounts_are_refused_and_nothing_is_stored(env: Env, money: pb.Money, field: str, words: str) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(amount=money,
                                                                            payment_method="4242424242424242"),
                                              metadata=u.md)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            got = violations(e.value)
            assert field in got and words in got[field], got
            assert not (await pay.ListPayments(pb.ListPaymentsRequest(), metadata=u.md)).payment_intents

    run(go())


def test_a_customer_reaches_only_their_own_intents(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            owner, other = await new_user(ch), await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            pi = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("9.99"), payment_method="4242424242424242"), metadata=owner.md)).payment_intent
            await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(payment_intent_id=pi.payment_intent_id),
                                           metadata=owner.md)
            pid = pi.payment_intent_id
            for call in (pay.GetPaymentIntent(pb.GetPaymentIntentRequest(payment_intent_id=pid), metadata=other.md),
                         pay.RefundPayment(pb.RefundPaymentRequest(payment_intent_id=pid), metadata=other.md),
                         pay.CancelPaymentIntent(pb.CancelPaymentIntentRequest(payment_intent_id=pid),
                                                 metadata=other.md)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                assert error_reason(e.value) == "PAYMENT_INTENT_NOT_FOUND"
            assert not (await pay.ListPayments(pb.ListPaymentsRequest(), metadata=other.md)).payment_intents
            ledger = pbg.LedgerServiceStub(ch)
            mine = (await ledger.ListAccounts(pb.ListAccountsRequest(), metadata=owner.md)).accounts
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await ledger.ListEntries(pb.ListEntriesRequest(account_id=mine[0].account_id), metadata=other.md)
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            for call in (ledger.Audit(pb.AuditRequest(), metadata=other.md),
                         ledger.CreateAccount(pb.CreateAccountRequest(code=pb.ACCOUNT_CODE_FEES, currency_code="USD"),
                                              metadata=other.md)):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await call
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as anon:
                await pay.ListPayments(pb.ListPaymentsRequest())
            assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(go())


def test_idempotency_keys_replay_the_first_answer_and_refuse_other_parameters(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            req = pb.CreatePaymentIntentRequest(amount=usd("25.00"), payment_method="4242424242424242",
                                                idempotency_key="order-77")
            first = await pay.CreatePaymentIntent(req, metadata=u.md)
            again = await pay.CreatePaymentIntent(req, metadata=u.md)
            assert again.SerializeToString() == first.SerializeToString()
            other = pb.CreatePaymentIntentRequest(amount=usd("26.00"), payment_method="4242424242424242",
                                                  idempotency_key="order-77")
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await pay.CreatePaymentIntent(other, metadata=u.md)
            assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "idempotency_key" in violations(reused.value)
            pid = first.payment_intent.payment_intent_id
            confirm = pb.ConfirmPaymentIntentRequest(payment_intent_id=pid, idempotency_key="order-77-pay")
            c1, c2 = await asyncio.gather(pay.ConfirmPaymentIntent(confirm, metadata=u.md),
                                          pay.ConfirmPaymentIntent(confirm, metadata=u.md),
                                          return_exceptions=True)
            answers = [c for c in (c1, c2) if isinstance(c, pb.ConfirmPaymentIntentResponse)]
            busy = [c for c in (c1, c2) if isinstance(c, grpc.aio.AioRpcError)]
            assert answers and all(b.code() == grpc.StatusCode.ABORTED for b in busy)
            c3 = await pay.ConfirmPaymentIntent(confirm, metadata=u.md)
            assert c3.SerializeToString() == answers[0].SerializeToString()
            assert c3.payment_intent.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED
            # Another user's same key is theirs: a new intent.
            v = await new_user(ch)
            theirs = await pay.CreatePaymentIntent(req, metadata=v.md)
            assert theirs.payment_intent.payment_intent_id != pid
            found = await psp_get(env.psp, "/v1/payment_intents/search", query=f"metadata['ref']:'{pid}'")
            assert len(found["data"]) == 1

    run(go())


def test_a_charge_whose_answer_was_lost_is_finished_by_the_reconciler(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            pi = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("33.00"), payment_method="4242424242424242"), metadata=u.md)).payment_intent
            await faults(env.psp, timeout_after_charge=True, timeout_hold_ms=0)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as lost:
                    await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                        payment_intent_id=pi.payment_intent_id), metadata=u.md)
                assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_reason(lost.value) == "PAYMENT_INTENT_PROCESSING"
            finally:
                await faults(env.psp, timeout_after_charge=False)
            # The reconciler (or the webhook) asks the processor with the same key.
            done = await wait_status(pay, u, pi.payment_intent_id, pb.PAYMENT_INTENT_STATUS_SUCCEEDED)
            assert done.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED and done.amount_received.amount_minor == 3300
            found = await psp_get(env.psp, "/v1/payment_intents/search",
                                  query=f"metadata['ref']:'{pi.payment_intent_id}'")
            assert [x["amount_received"] for x in found["data"]] == [3300]
            accts = (await pbg.LedgerServiceStub(ch).ListAccounts(pb.ListAccountsRequest(), metadata=u.md)).accounts
            assert [a.debits_posted for a in accts] == [3300]
            today = datetime.now(UTC).date().isoformat()
            assert await audit_of(ch, {pi.payment_intent_id}, [today]) == []

    run(go())


def test_webhooks_are_verified_and_applied_once(env: Env) -> None:
    async def go() -> None:
        url = f"{env.stack.http_base}/webhooks/psp"
        event = {"id": "evt_" + uuid.uuid4().hex, "type": "payment_intent.succeeded",
                 "data": {"object": {"id": "pi_x", "metadata": {"ref": "12345"}}},
                 "request": {"idempotency_key": None}}
        raw = json.dumps(event).encode()
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=raw, headers={"Stripe-Signature": sign_payload(raw, "whsec_wrong")}) as r:
                assert r.status == 400
            async with s.post(url, data=raw + b" ", headers={"Stripe-Signature": sign_payload(raw, WHSEC)}) as r:
                assert r.status == 400  # signed over other bytes
            stale = sign_payload(raw, WHSEC, int(time.time()) - 3600)
            async with s.post(url, data=raw, headers={"Stripe-Signature": stale}) as r:
                assert r.status == 400
            results = []
            for _ in range(2):
                async with s.post(url, data=raw, headers={"Stripe-Signature": sign_payload(raw, WHSEC)}) as r:
                    assert r.status == 200
                    results.append((await r.json())["result"])
            assert results == ["unknown_intent", "duplicate"]
        # The stand-in's own deliveries reached the edge and were accepted.
        deliveries = await psp_get(env.psp, "/_sim/webhooks")
        rows = deliveries["data"] if isinstance(deliveries, dict) else deliveries
        assert any(d.get("state") == "delivered" for d in rows), rows

    run(go())


def test_operators_keep_their_own_books(env: Env) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            op = await new_user(ch, OPERATOR)
            ledger = pbg.LedgerServiceStub(ch)
            base = int(uuid.uuid4().int % (1 << 40)) * 16 + 1
            a = (await ledger.CreateAccount(pb.CreateAccountRequest(
                account_id=base, code=pb.ACCOUNT_CODE_PROCESSOR_CLEARING, currency_code="EUR"),
                metadata=op.md)).account
            b = (await ledger.CreateAccount(pb.CreateAccountRequest(
                account_id=base + 1, code=pb.ACCOUNT_CODE_FEES, currency_code="EUR",
                debits_must_not_exceed_credits=True), metadata=op.md)).account
            t = (await ledger.CreateTransfer(pb.CreateTransferRequest(
                transfer_id=base, kind=pb.TRANSFER_KIND_PENDING, debit_account_id=base, credit_account_id=base + 1,
                amount_minor=500, code="fee"), metadata=op.md)).transfer
            assert t.status == "pending" and t.currency_code == "EUR"
            posted = (await ledger.CreateTransfer(pb.CreateTransferRequest(
                transfer_id=base + 1, kind=pb.TRANSFER_KIND_POST, pending_id=base, amount_minor=200),
                metadata=op.md)).transfer
            assert posted.amount_minor == 200 and posted.status == "posted"
            with pytest.raises(grpc.aio.AioRpcError) as flagged:
                await ledger.CreateTransfer(pb.CreateTransferRequest(
                    transfer_id=base + 2, kind=pb.TRANSFER_KIND_SINGLE, debit_account_id=base + 1,
                    credit_account_id=base, amount_minor=201), metadata=op.md)
            assert flagged.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(flagged.value) == "EXCEEDS_CREDITS"
            got = (await ledger.GetAccount(pb.GetAccountRequest(account_id=b.account_id), metadata=op.md)).account
            assert (got.credits_posted, got.credits_pending, got.debits_posted) == (200, 0, 0)
            got_a = (await ledger.GetAccount(pb.GetAccountRequest(account_id=a.account_id), metadata=op.md)).account
            assert got_a.debits_posted == 200
            listed = (await ledger.ListAccounts(pb.ListAccountsRequest(currency_code="EUR"), metadata=op.md)).accounts
            assert {a.account_id, b.account_id} <= {x.account_id for x in listed}
            tr = (await ledger.GetTransfer(pb.GetTransferRequest(transfer_id=str(base)), metadata=op.md)).transfer
            assert tr.status == "posted" or tr.status == "pending"

    run(go())


def test_status_changes_are_published_as_payment_intent_events(env: Env) -> None:
    """Each status change of an intent is one PaymentIntentEvent on payments.intents (docs/events.md)."""
    from servers.platform.events import Consumer, Event, EventSettings
    from servers.storage.redis_conn import connect

    async def go() -> None:
        async with grpc.aio.insecure_channel(env.stack.grpc_addr) as ch:
            u = await new_user(ch)
            pay = pbg.PaymentServiceStub(ch)
            c = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("30.00"), capture_method=pb.CAPTURE_METHOD_MANUAL, payment_method="pm_card_visa"),
                metadata=u.md)).payment_intent
            await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(payment_intent_id=c.payment_intent_id),
                                           metadata=u.md)
            done = (await pay.CapturePaymentIntent(pb.CapturePaymentIntentRequest(
                payment_intent_id=c.payment_intent_id), metadata=u.md)).payment_intent
            assert done.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED
            # A refund changes no status: no event.
            await pay.RefundPayment(pb.RefundPaymentRequest(payment_intent_id=c.payment_intent_id,
                                                            amount=usd("5.00")), metadata=u.md)

        r = connect(env.stack.redis_url)
        mine: list[Event] = []

        async def collect(event: Event) -> None:
            if event.subject == c.payment_intent_id:
                mine.append(event)

        consumer = Consumer(r, "payments.intents", "test-" + uuid.uuid4().hex[:8], collect,
                            types=[pb.PaymentIntentEvent], settings=EventSettings(claim_idle_ms=500))
        await consumer.queue.ensure_group()
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run("t", stop=stop, block_ms=50))
        try:
            # Every event of the intent was on the stream before its call answered:
            # once the group has read and acked all there is, it has seen them all.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                depth = await consumer.queue.depth()
                if depth["lag"] == 0 and depth["pending"] == 0 and depth["length"] > 0:
                    break
                await stop_or(stop, 0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await r.aclose()
        assert all(e.type == "sysdesign.payments.v1.PaymentIntentEvent" for e in mine)
        msgs = [e.message for e in mine if isinstance(e.message, pb.PaymentIntentEvent)]
        assert len(msgs) == len(mine)
        S = pb.PaymentIntentStatus
        assert [(S.Name(m.previous_status), S.Name(m.payment_intent.status)) for m in msgs] == [
            ("PAYMENT_INTENT_STATUS_REQUIRES_CONFIRMATION", "PAYMENT_INTENT_STATUS_PROCESSING"),
            ("PAYMENT_INTENT_STATUS_PROCESSING", "PAYMENT_INTENT_STATUS_REQUIRES_CAPTURE"),
            ("PAYMENT_INTENT_STATUS_REQUIRES_CAPTURE", "PAYMENT_INTENT_STATUS_SUCCEEDED"),
        ]
        seqs = [m.sequence for m in msgs]
        assert seqs == sorted(set(seqs))
        last = msgs[-1].payment_intent
        assert last.payment_intent_id == c.payment_intent_id and last.customer_id == u.user_id
        assert last.amount_received.amount_minor == 3000 and last.payment_method == "pm_card_visa"

    run(go())


async def stop_or(stop: asyncio.Event, seconds: float) -> None:
    """Wait for ``stop`` at most ``seconds``."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
