"""The payments process SIGKILLed at each step of a confirmation, then started again.

A failpoint (servers/platform/failpoints.py) kills the process with SIGKILL
at one exact step: before the processor call, after the processor charged,
after the row that records the answer, and before the response. After a
restart, the intent is finished either by the client retrying with its
idempotency key or by the reconciler alone; in every case the processor
holds exactly one charge, the ledger books it once, and the audit is clean.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sysdesign.payments.v1 import payments_pb2 as pb
from sysdesign.payments.v1 import payments_pb2_grpc as pbg

from clients.loopback import free_port
from tests.integration.test_payments import OPERATOR, new_user, psp_get, usd
from tests.sims import KEY, WHSEC, SimPsp
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables]

STEPS = ["before_processor", "after_processor", "after_row", "before_response"]


class Deployment:
    """One data dir and one set of ports, started again and again (as a pod is restarted)."""

    def __init__(self, root: Path, psp: SimPsp) -> None:
        self.root, self.psp = root, psp
        self.ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}

    def stack(self, **env: str) -> StackProcess:
        s = StackProcess(self.root / "data", **self.ports)  # type: ignore[arg-type]
        s.extra_env.update({
            "SYSDESIGN_PSP_URL": self.psp.url, "SYSDESIGN_PSP_SECRET_KEY": KEY, "SYSDESIGN_PSP_WEBHOOK_SECRET": WHSEC,
            "SYSDESIGN_PSP_TIMEOUT_SECONDS": "3", "SYSDESIGN_PAYMENTS_OPERATORS": OPERATOR,
            "SYSDESIGN_PAYMENTS_RECONCILE_SECONDS": "0.3", "SYSDESIGN_PAYMENTS_RECONCILE_AFTER_SECONDS": "1",
            "SYSDESIGN_IDEMPOTENCY_LEASE_SECONDS": "2", **env,
        })
        return s


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("payments-crash")
    http_port = free_port()
    psp = SimPsp(root / "psp", "--webhook-retry-base-ms", "200",
                 webhook_url=f"http://127.0.0.1:{http_port}/webhooks/psp").start()
    d = Deployment(root, psp)
    d.ports["http_port"] = http_port
    yield d
    psp.stop()


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("recovery", ["client_retries", "reconciler_alone"])
def test_a_confirmation_killed_at_any_step_charges_once(deployment: Deployment, step: str, recovery: str) -> None:
    key = "pay-" + uuid.uuid4().hex[:8]
    name = "k" + uuid.uuid4().hex[:12]
    crashing = deployment.stack(SYSDESIGN_FAILPOINTS=f"payments.confirm.{step}=kill").start()

    async def until_killed() -> str:
        async with grpc.aio.insecure_channel(crashing.grpc_addr) as ch:
            u = await new_user(ch, name)
            pay = pbg.PaymentServiceStub(ch)
            pi = (await pay.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                amount=usd("42.00"), payment_method="4242424242424242", idempotency_key=key + "-create"),
                metadata=u.md)).payment_intent
            with pytest.raises(grpc.aio.AioRpcError) as died:
                await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                    payment_intent_id=pi.payment_intent_id, idempotency_key=key), metadata=u.md, timeout=30)
            assert died.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                                         grpc.StatusCode.UNKNOWN), died.value
            return pi.payment_intent_id

    try:
        intent_id = asyncio.run(until_killed())
        assert crashing.proc is not None and crashing.proc.wait(30) == -signal.SIGKILL, crashing.logs()
    finally:
        crashing.stop()

    again = deployment.stack().start()
    try:
        async def recover() -> None:
            async with grpc.aio.insecure_channel(again.grpc_addr) as ch:
                u = await new_user(ch, name)
                pay = pbg.PaymentServiceStub(ch)
                deadline = time.monotonic() + 30
                answer = None
                if recovery == "client_retries":
                    while answer is None and time.monotonic() < deadline:
                        try:
                            answer = (await pay.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                                payment_intent_id=intent_id, idempotency_key=key), metadata=u.md)).payment_intent
                        except grpc.aio.AioRpcError as e:
                            # The key is held by the dead process's claim until its lease ends.
                            assert e.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE), e
                            await asyncio.sleep(0.3)
                else:
                    while time.monotonic() < deadline:
                        answer = (await pay.GetPaymentIntent(pb.GetPaymentIntentRequest(payment_intent_id=intent_id),
                                                             metadata=u.md)).payment_intent
                        if answer.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED:
                            break
                        await asyncio.sleep(0.3)
                assert answer is not None and answer.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED, answer
                assert answer.amount_received.amount_minor == 4200
                # Exactly one charge at the processor, for the whole amount.
                found = await psp_get(deployment.psp, "/v1/payment_intents/search",
                                      query=f"metadata['ref']:'{intent_id}'")
                assert [(x["status"], x["amount_received"]) for x in found["data"]] == [("succeeded", 4200)]
                # Booked once.
                accts = (await pbg.LedgerServiceStub(ch).ListAccounts(pb.ListAccountsRequest(),
                                                                       metadata=u.md)).accounts
                assert [(a.debits_posted, a.debits_pending) for a in accts] == [(4200, 0)]
                op = await new_user(ch, OPERATOR)
                rep = await pbg.LedgerServiceStub(ch).Audit(pb.AuditRequest(), metadata=op.md)
                mine = [f for f in rep.findings if f.subject == f"payment_intents/{intent_id}"
                        or not f.subject.startswith("payment_intents/")]
                assert mine == [], mine

        asyncio.run(recover())
    finally:
        assert again.stop() == 0, again.logs()
