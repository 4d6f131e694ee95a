"""`sysdesign sim psp`, the card-processor stand-in, started as a real process and called over HTTP."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from clients.loopback import free_port
from servers.sim.psp import (
    SignatureVerificationError,
    settlement_day,
    sign_payload,
    verify_signature,
)
from tests.sims import KEY, WHSEC, SimPsp

ROOT = Path(__file__).resolve().parents[2]

AUTH = {"Authorization": f"Bearer {KEY}"}


class Receiver:
    """A loopback webhook endpoint: records every delivery; fails the first attempt of chosen events."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, Any], bytes, str]] = []
        self.fail_once: set[str] = set()  # intent ids whose first delivery gets a 500
        self.failed: set[str] = set()
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks"

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        event = json.loads(raw)
        self.received.append((event, raw, request.headers.get("Stripe-Signature", "")))
        obj_id = event["data"]["object"].get("payment_intent") or event["data"]["object"]["id"]
        if obj_id in self.fail_once and event["id"] not in self.failed:
            self.failed.add(event["id"])
            return web.Response(status=500)
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/webhooks", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def events_for(self, pi_id: str) -> list[dict[str, Any]]:
        out = []
        for event, _, _ in self.received:
            obj = event["data"]["object"]
            if obj["id"] == pi_id or obj.get("payment_intent") == pi_id:
                out.append(event)
        return out

    async def wait_for(self, pi_id: str, n: int, within_s: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            got = self.events_for(pi_id)
            if len(got) >= n:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError(f"{pi_id}: {len(self.events_for(pi_id))} webhooks, expected {n}")


@pytest.fixture(scope="module")
def psp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimPsp]:
    sim = SimPsp(tmp_path_factory.mktemp("psp")).start()
    yield sim
    assert sim.stop() == 0, sim.logs()


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[SimPsp]:
    sim = SimPsp(tmp_path_factory.mktemp("psp-hooks"), webhook_url=receiver.url).start()
    yield sim
    assert sim.stop() == 0, sim.logs()


async def call(base: str, method: str, path: str, body: dict[str, Any] | None = None, *,
               key: str | None = None, auth: bool = True,
               client_timeout_s: float = 30) -> tuple[int, bytes, dict[str, str]]:
    headers = dict(AUTH) if auth else {}
    if method == "POST":
        headers["Idempotency-Key"] = key or uuid.uuid4().hex
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=client_timeout_s)) as s, s.request(
            method, base + path, json=body, headers=headers) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def ok(base: str, method: str, path: str, body: dict[str, Any] | None = None,
             **kw: Any) -> dict[str, Any]:
    status, raw, _ = await call(base, method, path, body, **kw)
    assert status == 200, raw.decode()
    return dict(json.loads(raw))


async def error(base: str, method: str, path: str, body: dict[str, Any] | None = None,
                **kw: Any) -> tuple[int, dict[str, Any]]:
    status, raw, _ = await call(base, method, path, body, **kw)
    assert status >= 400, raw.decode()
    return status, json.loads(raw)["error"]


async def faults(base: str, **values: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(base + "/_sim/faults", json=values) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def deliveries_of(sim: SimPsp, event_id: str, until: str) -> list[dict[str, Any]]:
    """The simulator's delivery records of an event, once the first is in state `until`."""
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(sim.url + "/_sim/webhooks") as resp:
                mine = [d for d in (await resp.json())["data"] if d["event"] == event_id]
            if (mine and mine[0]["state"] == until) or time.monotonic() > deadline:
                return mine
            await asyncio.sleep(0.05)


def intent(card: str = "4242424242424242", amount: int = 1000, **extra: Any) -> dict[str, Any]:
    return {"amount": amount, "currency": "usd", "payment_method": card, **extra}


# -- idempotency -----------------------------------------------------------------


async def test_same_key_same_body_replays_the_stored_response_byte_for_byte(psp: SimPsp) -> None:
    body = intent(metadata={"ref": "order-replay"}, confirm=True)
    s1, raw1, h1 = await call(psp.url, "POST", "/v1/payment_intents", body, key="replay-1")
    s2, raw2, h2 = await call(psp.url, "POST", "/v1/payment_intents", body, key="replay-1")
    assert (s1, s2) == (200, 200)
    assert raw2 == raw1
    assert h2.get("Idempotent-Replayed") == "true" and "Idempotent-Replayed" not in h1
    pi = json.loads(raw1)
    assert pi["status"] == "succeeded"
    # One charge, not two: the key finds it, and only one intent carries the reference.
    found = await ok(psp.url, "GET", "/v1/payment_intents?idempotency_key=replay-1")
    assert [p["id"] for p in found["data"]] == [pi["id"]]
    search = await ok(psp.url, "GET", "/v1/payment_intents/search?query=metadata['ref']:'order-replay'")
    assert [p["id"] for p in search["data"]] == [pi["id"]]
    assert (await ok(psp.url, "GET", "/v1/payment_intents?idempotency_key=never-used"))["data"] == []


async def test_same_key_different_body_is_refused(psp: SimPsp) -> None:
    await ok(psp.url, "POST", "/v1/payment_intents", intent(), key="reuse-1")
    status, err = await error(psp.url, "POST", "/v1/payment_intents", intent(amount=1001), key="reuse-1")
    assert status == 400 and err["type"] == "idempotency_error"
    assert "reuse-1" in err["message"]
    # Same key on another endpoint is a different request too.
    pi = (await ok(psp.url, "GET", "/v1/payment_intents?idempotency_key=reuse-1"))["data"][0]
    status, err = await error(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/confirm", {}, key="reuse-1")
    assert status == 400 and err["type"] == "idempotency_error"


async def test_same_key_while_the_first_is_in_flight_is_409(psp: SimPsp) -> None:
    await faults(psp.url, latency_ms=1500)
    try:
        first = asyncio.create_task(call(psp.url, "POST", "/v1/payment_intents", intent(), key="inflight-1"))
        await asyncio.sleep(0.3)
        status, err = await error(psp.url, "POST", "/v1/payment_intents", intent(), key="inflight-1")
        s1, raw1, _ = await first
    finally:
        await faults(psp.url, latency_ms=0)
    assert status == 409 and err["code"] == "idempotency_key_in_use"
    assert s1 == 200
    s2, raw2, _ = await call(psp.url, "POST", "/v1/payment_intents", intent(), key="inflight-1")
    assert (s2, raw2) == (200, raw1)


async def test_auth_is_required(psp: SimPsp) -> None:
    status, err = await error(psp.url, "GET", "/v1/payment_intents", auth=False)
    assert status == 401 and err["type"] == "invalid_request_error"
    async with aiohttp.ClientSession() as s, s.get(psp.url + "/v1/payment_intents",
                                                   headers={"Authorization": "Bearer sk_test_wrong"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "api_key_invalid"


async def test_bad_input_names_the_parameter(psp: SimPsp) -> None:
    for body, param in [({"currency": "usd"}, "amount"), ({"amount": -5, "currency": "usd"}, "amount"),
                        ({"amount": 100, "currency": "dollars"}, "currency"),
                        ({"amount": 100, "currency": "usd", "capture_method": "later"}, "capture_method"),
                        ({"amount": 100, "currency": "usd", "colour": "red"}, "colour")]:
        status, err = await error(psp.url, "POST", "/v1/payment_intents", body)
        assert status == 400 and err["param"] == param, err
    status, err = await error(psp.url, "POST", "/v1/payment_intents", intent(card="4242424242424241"))
    assert status == 402 and err["code"] == "incorrect_number"
    status, err = await error(psp.url, "GET", "/v1/payment_intents/pi_missing")
    assert status == 404 and err["code"] == "resource_missing"


# -- test cards ----------------------------------------------------------------------


async def test_4242_succeeds(psp: SimPsp) -> None:
    pi = await ok(psp.url, "POST", "/v1/payment_intents", intent())
    assert pi["status"] == "requires_confirmation"
    pi = await ok(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/confirm", {})
    assert pi["status"] == "succeeded" and pi["amount_received"] == 1000 and pi["latest_charge"]
    assert (await ok(psp.url, "GET", f"/v1/payment_intents/{pi['id']}"))["status"] == "succeeded"


@pytest.mark.parametrize(("card", "decline_code"), [("4000000000000002", "generic_decline"),
                                                     ("4000000000009995", "insufficient_funds")])
async def test_declining_cards(psp: SimPsp, card: str, decline_code: str) -> None:
    status, err = await error(psp.url, "POST", "/v1/payment_intents", intent(card=card, confirm=True))
    assert status == 402 and err["type"] == "card_error" and err["code"] == "card_declined"
    assert err["decline_code"] == decline_code
    pi = await ok(psp.url, "GET", f"/v1/payment_intents/{err['payment_intent']['id']}")
    assert pi["status"] == "requires_payment_method" and pi["amount_received"] == 0
    assert pi["last_payment_error"]["decline_code"] == decline_code
    # A new card on the same intent goes through.
    pi = await ok(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/confirm",
                  {"payment_method": "4242424242424242"})
    assert pi["status"] == "succeeded"


async def test_3ds_card_needs_a_second_step(psp: SimPsp) -> None:
    pi = await ok(psp.url, "POST", "/v1/payment_intents", intent(card="4000002500003155", confirm=True))
    assert pi["status"] == "requires_action" and pi["next_action"]["type"] == "three_d_secure"
    status, err = await error(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/confirm", {})
    assert status == 400 and err["param"] == "three_d_secure"
    pi = await ok(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/confirm", {"three_d_secure": "pass"})
    assert pi["status"] == "succeeded" and pi["amount_received"] == 1000

    other = await ok(psp.url, "POST", "/v1/payment_intents", intent(card="4000002500003155", confirm=True))
    status, err = await error(psp.url, "POST", f"/v1/payment_intents/{other['id']}/confirm",
                              {"three_d_secure": "fail"})
    assert status == 402 and err["code"] == "payment_intent_authentication_failure"


async def test_cancel_voids_an_authorization(psp: SimPsp) -> None:
    pi = await ok(psp.url, "POST", "/v1/payment_intents", intent(capture_method="manual", confirm=True))
    assert pi["status"] == "requires_capture" and pi["amount_capturable"] == 1000
    pi = await ok(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/cancel", {})
    assert pi["status"] == "canceled" and pi["amount_capturable"] == 0
    status, err = await error(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/capture", {})
    assert status == 400 and err["code"] == "payment_intent_unexpected_state"


# -- capture, refunds, settlement ----------------------------------------------------------


async def test_partial_capture_multiple_refunds_and_the_over_refund_refusal(psp: SimPsp) -> None:
    ref = f"order-{uuid.uuid4().hex[:8]}"
    pi = await ok(psp.url, "POST", "/v1/payment_intents",
                  intent(amount=10_000, capture_method="manual", confirm=True, metadata={"ref": ref}))
    status, err = await error(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/capture",
                              {"amount_to_capture": 10_001})
    assert status == 400 and err["code"] == "amount_too_large"
    pi = await ok(psp.url, "POST", f"/v1/payment_intents/{pi['id']}/capture", {"amount_to_capture": 6_000})
    assert pi["status"] == "succeeded" and pi["amount_received"] == 6_000 and pi["amount_capturable"] == 0

    await ok(psp.url, "POST", "/v1/refunds", {"payment_intent": pi["id"], "amount": 2_000})
    await ok(psp.url, "POST", "/v1/refunds", {"payment_intent": pi["id"], "amount": 3_000})
    status, err = await error(psp.url, "POST", "/v1/refunds", {"payment_intent": pi["id"], "amount": 1_001})
    assert status == 400 and err["code"] == "amount_too_large"
    last = await ok(psp.url, "POST", "/v1/refunds", {"payment_intent": pi["id"]})  # the rest
    assert last["amount"] == 1_000
    status, err = await error(psp.url, "POST", "/v1/refunds", {"payment_intent": pi["id"], "amount": 1})
    assert status == 400 and err["code"] == "charge_already_refunded"
    refunds = await ok(psp.url, "GET", f"/v1/refunds?payment_intent={pi['id']}")
    assert sorted(r["amount"] for r in refunds["data"]) == [1_000, 2_000, 3_000]
    assert (await ok(psp.url, "GET", f"/v1/payment_intents/{pi['id']}"))["amount_refunded"] == 6_000

    async with aiohttp.ClientSession(headers=AUTH) as s, s.get(
            psp.url + f"/v1/reports/settlement?date={settlement_day(pi['created'])}") as resp:
        assert resp.status == 200 and resp.content_type == "text/csv"
        rows = [r for r in csv.DictReader(io.StringIO(await resp.text())) if r["merchant_reference"] == ref]
    charges = [r for r in rows if r["reporting_category"] == "charge"]
    refund_rows = [r for r in rows if r["reporting_category"] == "refund"]
    assert len(charges) == 1 and len(refund_rows) == 3
    fee = int(charges[0]["fee"])
    assert int(charges[0]["gross"]) == 6_000 and fee == 6_000 * 29 // 1000 + 30
    assert sum(int(r["gross"]) for r in rows) == 0
    assert sum(int(r["net"]) for r in rows) == -fee
    assert {r["payment_intent_id"] for r in rows} == {pi["id"]}
    status, err = await error(psp.url, "GET", "/v1/reports/settlement?date=yesterday")
    assert status == 400 and err["param"] == "date"


# -- faults ------------------------------------------------------------------------------------


async def test_timeout_after_charge_then_lookup_shows_the_charge(psp: SimPsp) -> None:
    body = intent(confirm=True, metadata={"ref": "order-timeout"})
    await faults(psp.url, timeout_after_charge=True, timeout_hold_ms=0)
    try:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await call(psp.url, "POST", "/v1/payment_intents", body, key="timeout-1")
        await faults(psp.url, timeout_hold_ms=10_000)
        with pytest.raises(TimeoutError):
            await call(psp.url, "POST", "/v1/payment_intents", body, key="timeout-2", client_timeout_s=0.5)
    finally:
        await faults(psp.url, timeout_after_charge=False, timeout_hold_ms=30_000)
    for key in ("timeout-1", "timeout-2"):
        found = await ok(psp.url, "GET", f"/v1/payment_intents?idempotency_key={key}")
        assert [p["status"] for p in found["data"]] == ["succeeded"]
        # The retry with the same key gets the stored answer, not a second charge.
        replay = await ok(psp.url, "POST", "/v1/payment_intents", body, key=key)
        assert replay["id"] == found["data"][0]["id"]
    search = await ok(psp.url, "GET", "/v1/payment_intents/search?query=metadata['ref']:'order-timeout'")
    assert len(search["data"]) == 2


async def test_5xx_and_429_faults_do_nothing(psp: SimPsp) -> None:
    await faults(psp.url, error_5xx_rate=1.0)
    try:
        status, err = await error(psp.url, "POST", "/v1/payment_intents", intent(), key="fault-500")
        assert status == 500 and err["type"] == "api_error"
    finally:
        await faults(psp.url, error_5xx_rate=0.0)
    assert (await ok(psp.url, "GET", "/v1/payment_intents?idempotency_key=fault-500"))["data"] == []
    await faults(psp.url, rate_limit_rate=1.0)
    try:
        status, _, headers = await call(psp.url, "POST", "/v1/payment_intents", intent(), key="fault-429")
        assert status == 429 and headers["Retry-After"] == "1"
    finally:
        await faults(psp.url, rate_limit_rate=0.0)
    await ok(psp.url, "POST", "/v1/payment_intents", intent(), key="fault-500")  # now it runs


async def test_fault_switches_are_validated(psp: SimPsp) -> None:
    async with aiohttp.ClientSession() as s:
        for bad in ({"bogus": 1}, {"error_5xx_rate": 2}, {"latency_ms": -1}, {"out_of_order_webhooks": "yes"}):
            async with s.post(psp.url + "/_sim/faults", json=bad) as resp:
                assert resp.status == 400, bad
        async with s.get(psp.url + "/_sim/faults") as resp:
            assert (await resp.json())["error_5xx_rate"] == 0.0


# -- webhooks ---------------------------------------------------------------------------------------


async def test_webhooks_are_signed_and_retried(hooked: SimPsp, receiver: Receiver) -> None:
    pi = await ok(hooked.url, "POST", "/v1/payment_intents", intent(capture_method="manual"))
    receiver.fail_once.add(pi["id"])
    await ok(hooked.url, "POST", f"/v1/payment_intents/{pi['id']}/confirm", {})
    got = await receiver.wait_for(pi["id"], 2)  # the 500, then the retry
    assert [e["type"] for e in got] == ["payment_intent.amount_capturable_updated"] * 2
    assert got[0]["id"] == got[1]["id"]
    for event, raw, header in receiver.received:
        if event["data"]["object"]["id"] == pi["id"]:
            assert verify_signature(raw, header, WHSEC, 300) > 0
    mine = await deliveries_of(hooked, got[0]["id"], until="delivered")
    assert [(d["state"], d["attempts"], d["last_status"]) for d in mine] == [("delivered", 2, 200)]
    await ok(hooked.url, "POST", f"/v1/payment_intents/{pi['id']}/capture", {})
    await ok(hooked.url, "POST", "/v1/refunds", {"payment_intent": pi["id"], "amount": 100})
    got = await receiver.wait_for(pi["id"], 4)
    assert sorted(e["type"] for e in got[2:]) == ["charge.refunded", "payment_intent.succeeded"]
    refunded = next(e for e in got if e["type"] == "charge.refunded")["data"]["object"]
    assert refunded["amount_refunded"] == 100 and refunded["refunded"] is False


async def test_duplicate_webhooks(hooked: SimPsp, receiver: Receiver) -> None:
    await faults(hooked.url, duplicate_webhooks=1.0)
    try:
        pi = await ok(hooked.url, "POST", "/v1/payment_intents", intent(confirm=True))
    finally:
        await faults(hooked.url, duplicate_webhooks=0.0)
    got = await receiver.wait_for(pi["id"], 2)
    assert [e["type"] for e in got] == ["payment_intent.succeeded"] * 2
    assert got[0]["id"] == got[1]["id"]


async def test_out_of_order_webhooks(hooked: SimPsp, receiver: Receiver) -> None:
    await faults(hooked.url, out_of_order_webhooks=True, out_of_order_batch=2, out_of_order_window_ms=60_000)
    try:
        pi = await ok(hooked.url, "POST", "/v1/payment_intents", intent(capture_method="manual", confirm=True))
        await ok(hooked.url, "POST", f"/v1/payment_intents/{pi['id']}/capture", {})
        got = await receiver.wait_for(pi["id"], 2)
    finally:
        await faults(hooked.url, out_of_order_webhooks=False)
    assert [e["type"] for e in got] == ["payment_intent.succeeded", "payment_intent.amount_capturable_updated"]
    assert got[0]["created"] >= got[1]["created"]


async def test_dropped_webhooks_stay_readable_as_events(hooked: SimPsp, receiver: Receiver) -> None:
    await faults(hooked.url, drop_webhooks=1.0)
    try:
        dropped = await ok(hooked.url, "POST", "/v1/payment_intents", intent(confirm=True))
    finally:
        await faults(hooked.url, drop_webhooks=0.0)
    kept = await ok(hooked.url, "POST", "/v1/payment_intents", intent(confirm=True))
    await receiver.wait_for(kept["id"], 1)
    assert receiver.events_for(dropped["id"]) == []
    events = await ok(hooked.url, "GET", "/v1/events?type=payment_intent.succeeded&limit=100")
    ev = next(e for e in events["data"] if e["data"]["object"]["id"] == dropped["id"])
    assert [d["state"] for d in await deliveries_of(hooked, ev["id"], until="dropped")] == ["dropped"]
    assert (await ok(hooked.url, "GET", f"/v1/events/{ev['id']}"))["type"] == "payment_intent.succeeded"


def test_signature_verify_good_tampered_expired() -> None:
    payload = b'{"id": "evt_1", "type": "payment_intent.succeeded"}'
    now = int(time.time())
    header = sign_payload(payload, WHSEC, now)
    assert verify_signature(payload, header, WHSEC, 300) == now
    assert verify_signature(payload.decode(), header, WHSEC, 300) == now
    with pytest.raises(SignatureVerificationError, match="no v1 signature matches"):
        verify_signature(payload.replace(b"evt_1", b"evt_2"), header, WHSEC, 300)
    with pytest.raises(SignatureVerificationError, match="no v1 signature matches"):
        verify_signature(payload, header, "whsec_other", 300)
    old = sign_payload(payload, WHSEC, now - 600)
    with pytest.raises(SignatureVerificationError, match="tolerance"):
        verify_signature(payload, old, WHSEC, 300)
    assert verify_signature(payload, old, WHSEC, 0) == now - 600  # age check off
    with pytest.raises(SignatureVerificationError):
        verify_signature(payload, "garbage", WHSEC, 300)
    with pytest.raises(SignatureVerificationError):
        verify_signature(payload, header.replace(f"t={now}", f"t={now + 1}"), WHSEC, 300)
    rotated = f"t={now},v1={'0' * 64},{header.split(',')[1]}"
    assert verify_signature(payload, rotated, WHSEC, 300) == now


# -- restart -----------------------------------------------------------------------------------------


async def test_restart_keeps_charges_and_keys(tmp_path: Path) -> None:
    sim = SimPsp(tmp_path / "psp").start()
    try:
        body = intent(capture_method="manual", confirm=True, metadata={"ref": "order-restart"})
        status, raw, _ = await call(sim.url, "POST", "/v1/payment_intents", body, key="restart-1")
        assert status == 200
        pi = json.loads(raw)
    finally:
        assert sim.stop() == 0, sim.logs()
    sim.port = free_port()
    sim.start()
    try:
        assert (await ok(sim.url, "GET", f"/v1/payment_intents/{pi['id']}"))["status"] == "requires_capture"
        status, replay, _ = await call(sim.url, "POST", "/v1/payment_intents", body, key="restart-1")
        assert (status, replay) == (200, raw)
        found = await ok(sim.url, "GET", "/v1/payment_intents?idempotency_key=restart-1")
        assert [p["id"] for p in found["data"]] == [pi["id"]]
        captured = await ok(sim.url, "POST", f"/v1/payment_intents/{pi['id']}/capture", {})
        assert captured["amount_received"] == 1000
    finally:
        assert sim.stop() == 0, sim.logs()


async def test_keys_are_kept_24_hours(tmp_path: Path) -> None:
    sim = SimPsp(tmp_path / "psp").start()
    try:
        await ok(sim.url, "POST", "/v1/payment_intents", intent(), key="old-key")
        await ok(sim.url, "POST", "/v1/payment_intents", intent(), key="young-key")
    finally:
        assert sim.stop() == 0, sim.logs()
    with sqlite3.connect(tmp_path / "psp" / "psp.sqlite3") as db:  # age the keys while it is down
        db.execute("UPDATE idem SET created = created - ? WHERE key = 'old-key'", (24 * 3600 + 60,))
        db.execute("UPDATE idem SET created = created - ? WHERE key = 'young-key'", (23 * 3600,))
    sim.port = free_port()
    sim.start()
    try:
        assert (await ok(sim.url, "GET", "/v1/payment_intents?idempotency_key=old-key"))["data"] == []
        await ok(sim.url, "POST", "/v1/payment_intents", intent(amount=2000), key="old-key")  # a new request
        status, err = await error(sim.url, "POST", "/v1/payment_intents", intent(amount=2000), key="young-key")
        assert status == 400 and err["type"] == "idempotency_error"
    finally:
        assert sim.stop() == 0, sim.logs()


async def test_undelivered_webhooks_survive_a_restart(tmp_path: Path) -> None:
    receiver = Receiver()  # not listening yet: every attempt fails to connect
    sim = SimPsp(tmp_path / "psp", webhook_url=receiver.url).start()
    try:
        pi = await ok(sim.url, "POST", "/v1/payment_intents", intent(confirm=True))
        event = (await ok(sim.url, "GET", "/v1/events?type=payment_intent.succeeded"))["data"][0]
        deadline = time.monotonic() + 30
        while not (failing := await deliveries_of(sim, event["id"], until="pending"))[0]["attempts"]:
            assert time.monotonic() < deadline, failing
            await asyncio.sleep(0.05)
        assert failing[0]["state"] == "pending" and failing[0]["last_error"]  # tried, and will retry
    finally:
        assert sim.stop() == 0, sim.logs()
    await receiver.start()
    try:
        sim.port = free_port()
        sim.start()
        try:
            got = await receiver.wait_for(pi["id"], 1)
            assert got[0]["id"] == event["id"]
        finally:
            assert sim.stop() == 0, sim.logs()
    finally:
        assert receiver.runner is not None
        await receiver.runner.cleanup()


async def test_fault_rates_follow_the_seed(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        sim = SimPsp(tmp_path / name, "--error-5xx-rate", "0.5").start()
        try:
            runs.append([(await call(sim.url, "GET", "/v1/payment_intents"))[0] for _ in range(24)])
        finally:
            assert sim.stop() == 0, sim.logs()
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}
