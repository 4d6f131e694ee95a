"""`sysdesign up` starts the card processor's stand-in beside the stack, and stops it with the stack.

No SYSDESIGN_PSP_URL here: the stack must find the stand-in it started (on
12111, or the port it wrote to DATA_DIR/sim-psp/url), and the stand-in's
webhooks must reach this stack's edge.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.payments.v1 import payments_pb2 as pb
from sysdesign.payments.v1 import payments_pb2_grpc as pbg

from tests.stack import StackProcess

pytestmark = [pytest.mark.tables]


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        return s.connect_ex((parts.hostname or "", parts.port or 80)) == 0


def _get(url: str) -> list[dict[str, Any]]:
    # The stand-in's default API key: nothing in this stack's environment names another.
    req = urllib.request.Request(url, headers={"Authorization": "Bearer sk_test_sim"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return list(json.loads(resp.read())["data"])


def _delivered(url: str, ref: str) -> list[dict[str, Any]]:
    """The stand-in's record of its deliveries of the events about intent ``ref``, and the answers."""
    events = {e["id"] for e in _get(f"{url}/v1/events?limit=100") if e["data"]["object"].get("id") == ref}
    assert events, f"no event about {ref}"
    return [d for d in _get(f"{url}/_sim/webhooks") if d["event"] in events]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_up_runs_the_stand_in_and_a_payment_goes_through_it(tmp_path: Path, stop: int) -> None:
    stack = StackProcess(tmp_path / "data")
    stack.start()
    try:
        url = (tmp_path / "data" / "sim-psp" / "url").read_text().strip()
        assert _listening(url)

        async def pay() -> str:
            async with grpc.aio.insecure_channel(stack.grpc_addr) as ch:
                ident = ipbg.IdentityServiceStub(ch)
                name = "u" + uuid.uuid4().hex[:12]
                await ident.RegisterUser(ipb.RegisterUserRequest(username=name, password="correct horse battery"))
                tok = await ident.Login(ipb.LoginRequest(username=name, password="correct horse battery"))
                md = (("authorization", f"Bearer {tok.access_token}"),)
                stub = pbg.PaymentServiceStub(ch)
                created = (await stub.CreatePaymentIntent(pb.CreatePaymentIntentRequest(
                    amount=pb.Money(currency_code="USD", value="12.34"), payment_method="4242424242424242"),
                    metadata=md)).payment_intent
                pi = (await stub.ConfirmPaymentIntent(pb.ConfirmPaymentIntentRequest(
                    payment_intent_id=created.payment_intent_id), metadata=md)).payment_intent
                assert pi.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED, pi
                assert pi.amount_received.amount_minor == 1234 and pi.processor_reference.startswith("pi_")
                return pi.processor_reference

        ref = asyncio.run(pay())
        # The charge's event reached this stack's edge and was accepted (2xx).
        deadline = time.monotonic() + 20
        delivered = _delivered(url, ref)
        while not all(d["state"] == "delivered" for d in delivered) and time.monotonic() < deadline:
            time.sleep(0.3)
            delivered = _delivered(url, ref)
        assert delivered and all(d["state"] == "delivered" and d["last_status"] == 200 for d in delivered), \
            delivered
    finally:
        code = stack.stop(stop)
    if stop == signal.SIGTERM:
        assert code == 0, stack.logs()
    # However the stack ends, its stand-in goes with it.
    deadline = time.monotonic() + 15
    while _listening(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening(url), "the stand-in outlived the stack"
