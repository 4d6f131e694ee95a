"""A card-processor stand-in: Stripe's PaymentIntents API, simplified, as JSON over HTTP.

Payment intents (authorize, capture in full or in part, cancel), refunds (several,
never more than captured), Stripe's idempotency keys, Stripe's test cards,
signed webhooks with retries, a daily settlement CSV and fault switches. State
lives in SQLite under the data dir, so a restarted simulator still knows its
charges. docs/sim.md describes the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import hmac
import io
import json
import random
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

API_VERSION = "2024-06-20"
IDEMPOTENCY_TTL_S = 24 * 3600
SIGNATURE_TOLERANCE_S = 300
FEE_PERCENT_BP = 290  # 2.9 % in basis points
FEE_FIXED = 30  # minor units per captured charge

# Stripe's test cards (card number -> outcome of a confirm).
CARD_SUCCEEDS = "4242424242424242"
CARD_DECLINED = "4000000000000002"
CARD_INSUFFICIENT_FUNDS = "4000000000009995"
CARD_REQUIRES_ACTION = "4000002500003155"
# Stripe's test PaymentMethod ids for the same cards.
PM_ALIASES = {
    "pm_card_visa": CARD_SUCCEEDS,
    "pm_card_chargeDeclined": CARD_DECLINED,
    "pm_card_chargeDeclinedInsufficientFunds": CARD_INSUFFICIENT_FUNDS,
    "pm_card_threeDSecure2Required": CARD_REQUIRES_ACTION,
}
DECLINES = {
    CARD_DECLINED: ("generic_decline", "Your card was declined."),
    CARD_INSUFFICIENT_FUNDS: ("insufficient_funds", "Your card has insufficient funds."),
}


# -- webhook signatures ------------------------------------------------------


class SignatureVerificationError(ValueError):
    """A webhook whose Stripe-Signature header does not prove it came from the processor."""


def sign_payload(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header for a payload: `t=<unix>,v1=<hex HMAC-SHA256("t.payload")>`."""
    body = payload.encode() if isinstance(payload, str) else payload
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(payload: bytes | str, header: str, secret: str,
                     tolerance_s: float = SIGNATURE_TOLERANCE_S, *, now: float | None = None) -> int:
    """Check a Stripe-Signature header against the raw request body; return its timestamp.

    Raises SignatureVerificationError when the header is malformed, no v1 signature
    matches (constant-time compare; several v1 entries are allowed, as during a
    secret rotation), or the timestamp is more than tolerance_s away from now
    (a replayed delivery). tolerance_s <= 0 skips the age check.
    """
    body = payload.encode() if isinstance(payload, str) else payload
    ts: int | None = None
    sigs: list[str] = []
    for part in (header or "").split(","):
        k, sep, v = part.strip().partition("=")
        if not sep:
            continue
        if k == "t":
            try:
                ts = int(v)
            except ValueError:
                raise SignatureVerificationError("timestamp is not an integer") from None
        elif k == "v1":
            sigs.append(v)
    if ts is None or not sigs:
        raise SignatureVerificationError("header has no t= timestamp or no v1= signature")
    expected = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in sigs):
        raise SignatureVerificationError("no v1 signature matches the payload")
    current = time.time() if now is None else now
    if tolerance_s > 0 and abs(current - ts) > tolerance_s:
        raise SignatureVerificationError(f"timestamp {ts} is outside the {tolerance_s:g} s tolerance")
    return ts


# -- configuration -------------------------------------------------------------


@dataclass
class Faults:
    """Fault switches; set at start (CLI flags) and at runtime (POST /_sim/faults)."""

    latency_ms: int = 0  # added before every /v1 answer
    timeout_after_charge: bool = False  # money-moving POSTs commit, then never answer
    timeout_hold_ms: int = 30_000  # how long such a connection is held before it is closed
    error_5xx_rate: float = 0.0  # share of /v1 requests answered 500 before doing anything
    rate_limit_rate: float = 0.0  # share answered 429 with Retry-After before doing anything
    duplicate_webhooks: float = 0.0  # share of events delivered twice (same event id)
    out_of_order_webhooks: bool = False  # events held and delivered newest first, in batches
    out_of_order_batch: int = 2  # released when this many are held ...
    out_of_order_window_ms: int = 5_000  # ... or when the oldest has waited this long
    drop_webhooks: float = 0.0  # share of events never delivered

    def update(self, values: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        staged = asdict(self)
        for k, v in values.items():
            f = known.get(k)
            if f is None:
                raise ApiError(400, "invalid_request_error", f"Unknown fault: {k}", code="parameter_unknown", param=k)
            current = getattr(self, k)
            if isinstance(current, bool):
                if not isinstance(v, bool):
                    raise ApiError(400, "invalid_request_error", f"{k} must be true or false", param=k)
            elif isinstance(current, int):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ApiError(400, "invalid_request_error", f"{k} must be an integer >= 0", param=k)
            else:
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                    raise ApiError(400, "invalid_request_error", f"{k} must be a number from 0 to 1", param=k)
                v = float(v)
            staged[k] = v
        if staged["out_of_order_batch"] < 1:
            raise ApiError(400, "invalid_request_error", "out_of_order_batch must be >= 1", param="out_of_order_batch")
        for k, v in staged.items():
            setattr(self, k, v)


@dataclass
class PspConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 12111
    secret_key: str = "sk_test_sim"
    webhook_url: str = ""
    webhook_secret: str = "whsec_sim"
    seed: int = 0
    webhook_retry_base_ms: int = 1_000
    webhook_retry_cap_ms: int = 300_000
    webhook_max_attempts: int = 12
    faults: Faults = field(default_factory=Faults)
    # A listening socket handed over by the parent (`sysdesign up`), instead of binding host:port.
    listen_fd: int | None = None


class ApiError(Exception):
    """An answer in Stripe's error shape: {"error": {"type", "code", "message", "param", ...}}."""

    def __init__(self, status: int, type_: str, message: str, *, code: str | None = None,
                 param: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        body: dict[str, Any] = {"type": type_, "message": message}
        if code:
            body["code"] = code
        if param:
            body["param"] = param
        body.update(extra or {})
        self.body = {"error": body}


def _now() -> int:
    return int(time.time())


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


# -- storage ---------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS intents (id TEXT PRIMARY KEY, created INTEGER, body TEXT);
CREATE TABLE IF NOT EXISTS refunds (id TEXT PRIMARY KEY, intent_id TEXT, created INTEGER, body TEXT);
CREATE INDEX IF NOT EXISTS refunds_intent ON refunds (intent_id);
CREATE TABLE IF NOT EXISTS balance_txns (
  id TEXT PRIMARY KEY, type TEXT, created INTEGER, day TEXT, intent_id TEXT, charge_id TEXT,
  refund_id TEXT, ref TEXT, currency TEXT, amount INTEGER, fee INTEGER, net INTEGER);
CREATE INDEX IF NOT EXISTS balance_txns_day ON balance_txns (day, created);
CREATE TABLE IF NOT EXISTS idem (
  key TEXT PRIMARY KEY, fingerprint TEXT, method TEXT, path TEXT, status INTEGER, body BLOB,
  created INTEGER, object_id TEXT);
CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, type TEXT, created INTEGER, body TEXT);
CREATE TABLE IF NOT EXISTS deliveries (
  id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT, state TEXT, attempts INTEGER,
  next_at REAL, seq INTEGER, held_at REAL, last_status INTEGER, last_error TEXT);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at, seq);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    @contextlib.contextmanager
    def tx(self) -> Any:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def intent(self, pi_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT body FROM intents WHERE id=?", (pi_id,)).fetchone()
        if row is None:
            raise ApiError(404, "invalid_request_error", f"No such payment_intent: '{pi_id}'",
                           code="resource_missing", param="intent")
        return dict(json.loads(row[0]))

    def put_intent(self, pi: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO intents (id, created, body) VALUES (?, ?, ?)",
                        (pi["id"], pi["created"], json.dumps(pi)))

    def close(self) -> None:
        self.db.close()


# -- the API -----------------------------------------------------------------------

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[tuple[int, dict[str, Any], str | None]]]
MONEY_PATHS = re.compile(r"^/v1/(payment_intents(/[^/]+/(confirm|capture))?|refunds)$")
SEARCH_RE = re.compile(r"^\s*metadata\['([^']+)'\]\s*:\s*'([^']*)'\s*$")


class Psp:
    def __init__(self, config: PspConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.seed)
        self.store = Store(config.data_dir / "psp.sqlite3")
        self.in_flight: set[str] = set()
        self.wake = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None

    # ---- plumbing

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1 << 20)
        r = app.router
        r.add_post("/v1/payment_intents", self._post(self.create_intent))
        r.add_get("/v1/payment_intents", self.list_intents)
        r.add_get("/v1/payment_intents/search", self.search_intents)
        r.add_get("/v1/payment_intents/{id}", self.get_intent)
        r.add_post("/v1/payment_intents/{id}/confirm", self._post(self.confirm_intent))
        r.add_post("/v1/payment_intents/{id}/capture", self._post(self.capture_intent))
        r.add_post("/v1/payment_intents/{id}/cancel", self._post(self.cancel_intent))
        r.add_post("/v1/refunds", self._post(self.create_refund))
        r.add_get("/v1/refunds", self.list_refunds)
        r.add_get("/v1/refunds/{id}", self.get_refund)
        r.add_get("/v1/events", self.list_events)
        r.add_get("/v1/events/{id}", self.get_event)
        r.add_get("/v1/reports/settlement", self.settlement)
        r.add_get("/_sim/faults", self.get_faults)
        r.add_post("/_sim/faults", self.set_faults)
        r.add_get("/_sim/webhooks", self.list_deliveries)
        r.add_get("/_sim/health", self.health)
        app.cleanup_ctx.append(self._dispatcher_ctx)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._authenticate(request)
                if self.faults.latency_ms and request.method != "POST":  # POSTs: once their key is taken
                    await asyncio.sleep(self.faults.latency_ms / 1000)
                self._roll_request_faults()
            return await handler(request)
        except ApiError as e:
            headers = {"Retry-After": "1"} if e.status == 429 else {}
            return web.Response(status=e.status, body=_dumps(e.body), headers=headers,
                                content_type="application/json")

    def _authenticate(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "invalid_request_error",
                           "You did not provide an API key. Send it as 'Authorization: Bearer sk_test_...'.")
        if not hmac.compare_digest(key.strip(), self.config.secret_key):
            raise ApiError(401, "invalid_request_error", f"Invalid API Key provided: {key[:8]}***",
                           code="api_key_invalid")

    def _roll_request_faults(self) -> None:
        if self.faults.rate_limit_rate and self.rng.random() < self.faults.rate_limit_rate:
            raise ApiError(429, "invalid_request_error", "Too many requests; retry after 1 s.",
                           code="rate_limit")
        if self.faults.error_5xx_rate and self.rng.random() < self.faults.error_5xx_rate:
            raise ApiError(500, "api_error", "An unexpected error occurred (injected); nothing was done.")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "invalid_request_error", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request_error", "The request body must be a JSON object.")
        return body

    def _post(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Stripe's idempotency around a POST: one stored answer per key, replayed byte for byte."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            body = await self._body(request)
            key = request.headers.get("Idempotency-Key", "").strip()
            if len(key) > 255:
                raise ApiError(400, "invalid_request_error", "Idempotency-Key must be at most 255 characters.",
                               code="idempotency_key_too_long")
            fingerprint = hashlib.sha256(
                f"{request.method} {request.path}\n".encode() + json.dumps(body, sort_keys=True).encode()
            ).hexdigest()
            if key:
                row = self.store.db.execute(
                    "SELECT fingerprint, status, body, created FROM idem WHERE key=?", (key,)).fetchone()
                if row is not None and row[3] > _now() - IDEMPOTENCY_TTL_S:
                    if row[0] != fingerprint:
                        raise ApiError(
                            400, "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters they "
                            f"were first used with. Try using a key other than '{key}' if you meant to "
                            "execute a different request.", code="idempotency_key_reused")
                    return web.Response(status=row[1], body=row[2], content_type="application/json",
                                        headers={"Idempotency-Key": key, "Idempotent-Replayed": "true"})
                if key in self.in_flight:
                    raise ApiError(409, "idempotency_error",
                                   f"There is currently another in-progress request using the Idempotency-Key "
                                   f"'{key}'; retry later.", code="idempotency_key_in_use")
                self.in_flight.add(key)
            try:
                if self.faults.latency_ms:
                    await asyncio.sleep(self.faults.latency_ms / 1000)
                with self.store.tx() as db:
                    if key:
                        db.execute("DELETE FROM idem WHERE key=?", (key,))
                    try:
                        status, obj, object_id = await handler(request, body)
                        payload = _dumps(obj)
                    except ApiError as e:
                        status, payload, object_id = e.status, _dumps(e.body), e.body["error"].get(
                            "payment_intent", {}).get("id")
                    if key:
                        db.execute("INSERT INTO idem (key, fingerprint, method, path, status, body, created, "
                                   "object_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                   (key, fingerprint, request.method, request.path, status, payload, _now(),
                                    object_id))
            finally:
                self.in_flight.discard(key)
            self.wake.set()
            if self.faults.timeout_after_charge and status < 300 and MONEY_PATHS.match(request.path):
                # The charge is committed; the caller never hears of it.
                if self.faults.timeout_hold_ms:
                    await asyncio.sleep(self.faults.timeout_hold_ms / 1000)
                if request.transport is not None:
                    request.transport.close()
                raise asyncio.CancelledError
            headers = {"Idempotency-Key": key} if key else {}
            return web.Response(status=status, body=payload, content_type="application/json",
                                headers=headers)

        return wrapped

    # ---- validation helpers

    @staticmethod
    def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
        for k in body:
            if k not in allowed:
                raise ApiError(400, "invalid_request_error", f"Received unknown parameter: {k}",
                               code="parameter_unknown", param=k)

    @staticmethod
    def _amount(body: dict[str, Any], name: str, required: bool) -> int | None:
        v = body.get(name)
        if v is None:
            if required:
                raise ApiError(400, "invalid_request_error", f"Missing required param: {name}.",
                               code="parameter_missing", param=name)
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 99_999_999:
            raise ApiError(400, "invalid_request_error",
                           f"Invalid {name}: must be an integer from 1 to 99999999 (minor units).",
                           code="parameter_invalid_integer", param=name)
        return int(v)

    @staticmethod
    def _card(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ApiError(400, "invalid_request_error", "payment_method must be a test card number or pm_card_* id.",
                           code="parameter_invalid_string", param="payment_method")
        number = PM_ALIASES.get(value, value.replace(" ", ""))
        digits = [int(c) for c in number if c.isdigit()]
        if len(digits) != len(number) or not 12 <= len(digits) <= 19 or _luhn(digits) != 0:
            raise ApiError(402, "card_error", "Your card number is incorrect.", code="incorrect_number",
                           param="payment_method")
        return number

    # ---- payment intents

    async def create_intent(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        self._check_fields(body, {"amount", "currency", "capture_method", "payment_method", "metadata",
                                  "confirm", "description", "customer"})
        amount = self._amount(body, "amount", True)
        currency = body.get("currency")
        if not isinstance(currency, str) or not re.fullmatch(r"[A-Za-z]{3}", currency):
            raise ApiError(400, "invalid_request_error", "Invalid currency: a three-letter ISO code, e.g. usd.",
                           code="parameter_missing" if currency is None else "invalid_currency", param="currency")
        capture_method = body.get("capture_method", "automatic")
        if capture_method not in ("automatic", "manual"):
            raise ApiError(400, "invalid_request_error", "capture_method must be automatic or manual.",
                           code="parameter_invalid_string", param="capture_method")
        metadata = body.get("metadata", {})
        if not isinstance(metadata, dict) or len(metadata) > 50 or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 40 and len(v) <= 500
                for k, v in metadata.items()):
            raise ApiError(400, "invalid_request_error",
                           "metadata must be an object of at most 50 string keys (<= 40 chars) and string "
                           "values (<= 500 chars).", param="metadata")
        card = self._card(body["payment_method"]) if body.get("payment_method") is not None else None
        now = _now()
        pi: dict[str, Any] = {
            "id": _new_id("pi"), "object": "payment_intent", "amount": amount, "amount_capturable": 0,
            "amount_received": 0, "amount_refunded": 0, "currency": currency.lower(),
            "capture_method": capture_method, "confirmation_method": "automatic", "created": now,
            "customer": body.get("customer"), "description": body.get("description"),
            "latest_charge": None, "last_payment_error": None, "livemode": False, "metadata": metadata,
            "next_action": None, "payment_method": _pm(card), "payment_method_details": _pm_details(card),
            "status": "requires_confirmation" if card else "requires_payment_method",
            "canceled_at": None, "cancellation_reason": None,
            "client_secret": None,
        }
        pi["client_secret"] = f"{pi['id']}_secret_{secrets.token_hex(8)}"
        pi["_card"] = card
        self.store.put_intent(pi)
        if body.get("confirm") is True:
            return await self._confirm(pi, {}, request)
        return 200, _public(pi), pi["id"]

    async def confirm_intent(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        self._check_fields(body, {"payment_method", "three_d_secure", "return_url"})
        pi = self.store.intent(request.match_info["id"])
        return await self._confirm(pi, body, request)

    async def _confirm(self, pi: dict[str, Any], body: dict[str, Any],
                       request: web.Request) -> tuple[int, dict[str, Any], str | None]:
        key = request.headers.get("Idempotency-Key")
        status = pi["status"]
        if status == "requires_action":
            outcome = body.get("three_d_secure")
            if outcome not in ("pass", "fail"):
                raise ApiError(400, "invalid_request_error",
                               "This PaymentIntent requires_action: confirm again with "
                               "{\"three_d_secure\": \"pass\"} or {\"three_d_secure\": \"fail\"}.",
                               code="payment_intent_unexpected_state", param="three_d_secure",
                               extra={"payment_intent": _public(pi)})
            if outcome == "fail":
                pi["next_action"] = None
                return self._fail(pi, "payment_intent_authentication_failure", None,
                                  "The provided payment method has failed authentication.", key)
            pi["next_action"] = None
            return self._authorize(pi, key)
        if status not in ("requires_confirmation", "requires_payment_method"):
            raise ApiError(400, "invalid_request_error",
                           f"This PaymentIntent's status is {status}; it cannot be confirmed.",
                           code="payment_intent_unexpected_state", extra={"payment_intent": _public(pi)})
        if body.get("payment_method") is not None:
            pi["_card"] = self._card(body["payment_method"])
            pi["payment_method"] = _pm(pi["_card"])
            pi["payment_method_details"] = _pm_details(pi["_card"])
        card = pi.get("_card")
        if not card:
            raise ApiError(400, "invalid_request_error",
                           "You cannot confirm this PaymentIntent because it's missing a payment method.",
                           code="payment_intent_unexpected_state", param="payment_method")
        pi["last_payment_error"] = None
        if card in DECLINES:
            decline_code, message = DECLINES[card]
            return self._fail(pi, "card_declined", decline_code, message, key)
        if card == CARD_REQUIRES_ACTION and "three_d_secure" not in body:
            pi["status"] = "requires_action"
            pi["next_action"] = {"type": "three_d_secure",
                                 "three_d_secure": {"confirm_with": {"three_d_secure": "pass"}}}
            self.store.put_intent(pi)
            return 200, _public(pi), pi["id"]
        return self._authorize(pi, key)

    def _fail(self, pi: dict[str, Any], code: str, decline_code: str | None, message: str,
              key: str | None) -> tuple[int, dict[str, Any], str | None]:
        err: dict[str, Any] = {"type": "card_error", "code": code, "message": message,
                               "payment_method": pi["payment_method"]}
        if decline_code:
            err["decline_code"] = decline_code
        pi["last_payment_error"] = err
        pi["status"] = "requires_payment_method"
        self.store.put_intent(pi)
        self._event("payment_intent.payment_failed", _public(pi), key)
        extra: dict[str, Any] = {"payment_intent": _public(pi)}
        if decline_code:
            extra["decline_code"] = decline_code
        raise ApiError(402, "card_error", message, code=code, extra=extra)

    def _authorize(self, pi: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any], str | None]:
        pi["latest_charge"] = _new_id("ch")
        if pi["capture_method"] == "manual":
            pi["status"] = "requires_capture"
            pi["amount_capturable"] = pi["amount"]
            self.store.put_intent(pi)
            self._event("payment_intent.amount_capturable_updated", _public(pi), key)
        else:
            self._captured(pi, pi["amount"], key)
        return 200, _public(pi), pi["id"]

    def _captured(self, pi: dict[str, Any], amount: int, key: str | None) -> None:
        pi["status"] = "succeeded"
        pi["amount_capturable"] = 0
        pi["amount_received"] = amount
        self.store.put_intent(pi)
        fee = (amount * FEE_PERCENT_BP + 5000) // 10000 + FEE_FIXED
        self._balance("charge", pi, amount, fee, None)
        self._event("payment_intent.succeeded", _public(pi), key)

    def _balance(self, type_: str, pi: dict[str, Any], amount: int, fee: int, refund_id: str | None) -> None:
        now = _now()
        self.store.db.execute(
            "INSERT INTO balance_txns (id, type, created, day, intent_id, charge_id, refund_id, ref, currency, "
            "amount, fee, net) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_new_id("txn"), type_, now, datetime.fromtimestamp(now, UTC).date().isoformat(), pi["id"],
             pi["latest_charge"], refund_id, pi["metadata"].get("ref", ""), pi["currency"], amount, fee,
             amount - fee))

    async def capture_intent(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        self._check_fields(body, {"amount_to_capture"})
        pi = self.store.intent(request.match_info["id"])
        if pi["status"] != "requires_capture":
            raise ApiError(400, "invalid_request_error",
                           f"This PaymentIntent could not be captured because it has a status of {pi['status']}. "
                           "Only a PaymentIntent with the status requires_capture can be captured.",
                           code="payment_intent_unexpected_state", extra={"payment_intent": _public(pi)})
        amount = self._amount(body, "amount_to_capture", False) or pi["amount_capturable"]
        if amount > pi["amount_capturable"]:
            raise ApiError(400, "invalid_request_error",
                           f"amount_to_capture ({amount}) is greater than amount_capturable "
                           f"({pi['amount_capturable']}).", code="amount_too_large", param="amount_to_capture")
        self._captured(pi, amount, request.headers.get("Idempotency-Key"))
        return 200, _public(pi), pi["id"]

    async def cancel_intent(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        self._check_fields(body, {"cancellation_reason"})
        pi = self.store.intent(request.match_info["id"])
        if pi["status"] in ("succeeded", "canceled", "processing"):
            raise ApiError(400, "invalid_request_error",
                           f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}.",
                           code="payment_intent_unexpected_state", extra={"payment_intent": _public(pi)})
        reason = body.get("cancellation_reason", "requested_by_customer")
        if reason not in ("duplicate", "fraudulent", "requested_by_customer", "abandoned"):
            raise ApiError(400, "invalid_request_error",
                           "cancellation_reason must be duplicate, fraudulent, requested_by_customer or abandoned.",
                           param="cancellation_reason")
        pi["status"] = "canceled"
        pi["amount_capturable"] = 0
        pi["canceled_at"] = _now()
        pi["cancellation_reason"] = reason
        pi["next_action"] = None
        self.store.put_intent(pi)
        self._event("payment_intent.canceled", _public(pi), request.headers.get("Idempotency-Key"))
        return 200, _public(pi), pi["id"]

    async def get_intent(self, request: web.Request) -> web.Response:
        return _json(_public(self.store.intent(request.match_info["id"])))

    async def list_intents(self, request: web.Request) -> web.Response:
        """GET /v1/payment_intents[?idempotency_key=K][&limit=N]: newest first; with a key, the intent it acted on."""
        key = request.query.get("idempotency_key")
        limit = _limit(request)
        if key is not None:
            row = self.store.db.execute("SELECT object_id FROM idem WHERE key=? AND created > ?",
                                        (key, _now() - IDEMPOTENCY_TTL_S)).fetchone()
            ids = [row[0]] if row and row[0] else []
            data = [_public(self.store.intent(i)) for i in ids]
        else:
            rows = self.store.db.execute("SELECT body FROM intents ORDER BY created DESC, rowid DESC LIMIT ?",
                                         (limit + 1,)).fetchall()
            data = [_public(json.loads(r[0])) for r in rows]
        return _json({"object": "list", "url": "/v1/payment_intents", "has_more": len(data) > limit,
                      "data": data[:limit]})

    async def search_intents(self, request: web.Request) -> web.Response:
        query = request.query.get("query", "")
        m = SEARCH_RE.match(query)
        if not m:
            raise ApiError(400, "invalid_request_error",
                           "query must be metadata['KEY']:'VALUE', e.g. metadata['ref']:'order_42'.",
                           param="query")
        path = '$.metadata."' + m.group(1).replace('"', '') + '"'
        rows = self.store.db.execute(
            "SELECT body FROM intents WHERE json_extract(body, ?) = ? ORDER BY created DESC, rowid DESC LIMIT ?",
            (path, m.group(2), _limit(request) + 1)).fetchall()
        data = [_public(json.loads(r[0])) for r in rows]
        limit = _limit(request)
        return _json({"object": "search_result", "url": "/v1/payment_intents/search",
                      "has_more": len(data) > limit, "data": data[:limit]})

    # ---- refunds

    async def create_refund(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        self._check_fields(body, {"payment_intent", "amount", "reason", "metadata"})
        pi_id = body.get("payment_intent")
        if not isinstance(pi_id, str) or not pi_id:
            raise ApiError(400, "invalid_request_error", "Missing required param: payment_intent.",
                           code="parameter_missing", param="payment_intent")
        pi = self.store.intent(pi_id)
        if pi["status"] != "succeeded":
            raise ApiError(400, "invalid_request_error",
                           f"This PaymentIntent has no captured charge to refund (status {pi['status']}).",
                           code="charge_not_captured", param="payment_intent")
        remaining = pi["amount_received"] - pi["amount_refunded"]
        if remaining <= 0:
            raise ApiError(400, "invalid_request_error", f"Charge {pi['latest_charge']} has already been refunded.",
                           code="charge_already_refunded", param="payment_intent")
        amount = self._amount(body, "amount", False) or remaining
        if amount > remaining:
            raise ApiError(400, "invalid_request_error",
                           f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining}).",
                           code="amount_too_large", param="amount")
        metadata = body.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "invalid_request_error", "metadata must be an object.", param="metadata")
        now = _now()
        refund = {"id": _new_id("re"), "object": "refund", "amount": amount, "charge": pi["latest_charge"],
                  "created": now, "currency": pi["currency"], "metadata": metadata,
                  "payment_intent": pi["id"], "reason": body.get("reason"), "status": "succeeded"}
        self.store.db.execute("INSERT INTO refunds (id, intent_id, created, body) VALUES (?, ?, ?, ?)",
                              (refund["id"], pi["id"], now, json.dumps(refund)))
        pi["amount_refunded"] += amount
        self.store.put_intent(pi)
        self._balance("refund", pi, -amount, 0, refund["id"])
        self._event("charge.refunded", self._charge(pi), request.headers.get("Idempotency-Key"))
        return 200, refund, pi["id"]

    def _charge(self, pi: dict[str, Any]) -> dict[str, Any]:
        rows = self.store.db.execute("SELECT body FROM refunds WHERE intent_id=? ORDER BY created, rowid",
                                     (pi["id"],)).fetchall()
        return {"id": pi["latest_charge"], "object": "charge", "amount": pi["amount"],
                "amount_captured": pi["amount_received"], "amount_refunded": pi["amount_refunded"],
                "captured": pi["amount_received"] > 0, "currency": pi["currency"], "metadata": pi["metadata"],
                "payment_intent": pi["id"], "refunded": pi["amount_refunded"] >= pi["amount_received"],
                "refunds": {"object": "list", "data": [json.loads(r[0]) for r in rows]},
                "status": "succeeded"}

    async def get_refund(self, request: web.Request) -> web.Response:
        row = self.store.db.execute("SELECT body FROM refunds WHERE id=?", (request.match_info["id"],)).fetchone()
        if row is None:
            raise ApiError(404, "invalid_request_error", f"No such refund: '{request.match_info['id']}'",
                           code="resource_missing", param="id")
        return _json(json.loads(row[0]))

    async def list_refunds(self, request: web.Request) -> web.Response:
        pi_id = request.query.get("payment_intent")
        limit = _limit(request)
        if pi_id:
            rows = self.store.db.execute("SELECT body FROM refunds WHERE intent_id=? ORDER BY created DESC, "
                                         "rowid DESC LIMIT ?", (pi_id, limit + 1)).fetchall()
        else:
            rows = self.store.db.execute("SELECT body FROM refunds ORDER BY created DESC, rowid DESC LIMIT ?",
                                         (limit + 1,)).fetchall()
        data = [json.loads(r[0]) for r in rows]
        return _json({"object": "list", "url": "/v1/refunds", "has_more": len(data) > limit, "data": data[:limit]})

    # ---- settlement

    async def settlement(self, request: web.Request) -> web.Response:
        day = request.query.get("date", "")
        try:
            datetime.strptime(day, "%Y-%m-%d")
        except ValueError:
            raise ApiError(400, "invalid_request_error", "date must be YYYY-MM-DD (UTC).", param="date") from None
        rows = self.store.db.execute(
            "SELECT id, created, type, intent_id, charge_id, refund_id, ref, currency, amount, fee, net "
            "FROM balance_txns WHERE day=? ORDER BY created, rowid", (day,)).fetchall()
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["balance_transaction_id", "created_utc", "reporting_category", "payment_intent_id",
                    "charge_id", "refund_id", "merchant_reference", "currency", "gross", "fee", "net"])
        for r in rows:
            created = datetime.fromtimestamp(r[1], UTC).isoformat().replace("+00:00", "Z")
            w.writerow([r[0], created, r[2], r[3], r[4], r[5] or "", r[6], r[7], r[8], r[9], r[10]])
        return web.Response(body=out.getvalue().encode(), content_type="text/csv",
                            headers={"Content-Disposition": f'attachment; filename="settlement-{day}.csv"'})

    # ---- events and webhooks

    def _event(self, type_: str, obj: dict[str, Any], key: str | None) -> None:
        now = _now()
        event = {"id": _new_id("evt"), "object": "event", "api_version": API_VERSION, "created": now,
                 "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
                 "request": {"id": None, "idempotency_key": key}, "type": type_}
        db = self.store.db
        db.execute("INSERT INTO events (id, type, created, body) VALUES (?, ?, ?, ?)",
                   (event["id"], type_, now, json.dumps(event)))
        if not self.config.webhook_url:
            return
        f = self.faults
        copies = 2 if f.duplicate_webhooks and self.rng.random() < f.duplicate_webhooks else 1
        dropped = bool(f.drop_webhooks) and self.rng.random() < f.drop_webhooks
        state = "dropped" if dropped else ("held" if f.out_of_order_webhooks else "pending")
        for _ in range(copies):
            cur = db.execute("INSERT INTO deliveries (event_id, state, attempts, next_at, seq, held_at) "
                             "VALUES (?, ?, 0, ?, 0, ?)", (event["id"], state, time.time(), time.time()))
            db.execute("UPDATE deliveries SET seq=id WHERE id=?", (cur.lastrowid,))

    async def list_events(self, request: web.Request) -> web.Response:
        limit = _limit(request)
        type_ = request.query.get("type")
        if type_:
            rows = self.store.db.execute("SELECT body FROM events WHERE type=? ORDER BY created DESC, rowid DESC "
                                         "LIMIT ?", (type_, limit + 1)).fetchall()
        else:
            rows = self.store.db.execute("SELECT body FROM events ORDER BY created DESC, rowid DESC LIMIT ?",
                                         (limit + 1,)).fetchall()
        data = [json.loads(r[0]) for r in rows]
        return _json({"object": "list", "url": "/v1/events", "has_more": len(data) > limit, "data": data[:limit]})

    async def get_event(self, request: web.Request) -> web.Response:
        row = self.store.db.execute("SELECT body FROM events WHERE id=?", (request.match_info["id"],)).fetchone()
        if row is None:
            raise ApiError(404, "invalid_request_error", f"No such event: '{request.match_info['id']}'",
                           code="resource_missing", param="id")
        return _json(json.loads(row[0]))

    async def _dispatcher_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        task = asyncio.create_task(self._dispatch_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.session.close()
        self.store.close()

    def _release_held(self) -> None:
        f = self.faults
        db = self.store.db
        held = db.execute("SELECT id, held_at FROM deliveries WHERE state='held' ORDER BY id").fetchall()
        if not held:
            return
        if f.out_of_order_webhooks and len(held) < f.out_of_order_batch and (
                time.time() - held[0][1] < f.out_of_order_window_ms / 1000):
            return
        now = time.time()
        with self.store.tx():
            for delivery_id, _ in held:  # newest first: the batch goes out reversed
                db.execute("UPDATE deliveries SET state='pending', next_at=?, seq=? WHERE id=?",
                           (now, -delivery_id, delivery_id))

    async def _dispatch_loop(self) -> None:
        db = self.store.db
        while True:
            self.wake.clear()
            self._release_held()
            due = db.execute("SELECT d.id, d.attempts, e.body FROM deliveries d JOIN events e ON e.id = d.event_id "
                             "WHERE d.state='pending' AND d.next_at <= ? ORDER BY d.next_at, d.seq LIMIT 50",
                             (time.time(),)).fetchall()
            for delivery_id, attempts, body in due:
                await self._deliver(delivery_id, attempts, body)
            nxt = db.execute("SELECT MIN(next_at) FROM deliveries WHERE state='pending'").fetchone()[0]
            wait = 1.0 if nxt is None else max(0.0, min(1.0, nxt - time.time()))
            if db.execute("SELECT 1 FROM deliveries WHERE state='held' LIMIT 1").fetchone():
                wait = min(wait, 0.1)
            if due and wait == 0.0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=wait or 0.05)

    async def _deliver(self, delivery_id: int, attempts: int, body: str) -> None:
        assert self.session is not None
        payload = body.encode()
        headers = {"Content-Type": "application/json", "User-Agent": "sysdesign-sim-psp/1.0",
                   "Stripe-Signature": sign_payload(payload, self.config.webhook_secret)}
        status: int | None = None
        error = ""
        try:
            async with self.session.post(self.config.webhook_url, data=payload, headers=headers) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        attempts += 1
        if status is not None and 200 <= status < 300:
            state, next_at = "delivered", time.time()
        elif attempts >= self.config.webhook_max_attempts:
            state, next_at = "failed", time.time()
        else:
            backoff = min(self.config.webhook_retry_cap_ms, self.config.webhook_retry_base_ms * 2 ** (attempts - 1))
            state, next_at = "pending", time.time() + backoff / 1000
            error = error or f"HTTP {status}"
        self.store.db.execute("UPDATE deliveries SET state=?, attempts=?, next_at=?, last_status=?, last_error=? "
                              "WHERE id=?", (state, attempts, next_at, status, error, delivery_id))

    # ---- simulator control

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(asdict(self.faults))

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await self._body(request))
        except ApiError as e:
            return web.Response(status=e.status, body=_dumps(e.body), content_type="application/json")
        self.wake.set()
        return _json(asdict(self.faults))

    async def list_deliveries(self, request: web.Request) -> web.Response:
        rows = self.store.db.execute(
            "SELECT d.id, d.event_id, e.type, d.state, d.attempts, d.last_status, d.last_error FROM deliveries d "
            "JOIN events e ON e.id = d.event_id ORDER BY d.id").fetchall()
        return _json({"object": "list", "data": [
            {"id": r[0], "event": r[1], "type": r[2], "state": r[3], "attempts": r[4], "last_status": r[5],
             "last_error": r[6] or None} for r in rows]})

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})


def _luhn(digits: list[int]) -> int:
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10


def _pm(card: str | None) -> str | None:
    return None if card is None else f"pm_card_{card[-4:]}"


def _pm_details(card: str | None) -> dict[str, Any] | None:
    if card is None:
        return None
    brand = {"4": "visa", "5": "mastercard", "3": "amex"}.get(card[0], "unknown")
    return {"type": "card", "card": {"brand": brand, "last4": card[-4:]}}


def _public(pi: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pi.items() if not k.startswith("_")}


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json")


def _limit(request: web.Request) -> int:
    try:
        n = int(request.query.get("limit", "10"))
    except ValueError:
        raise ApiError(400, "invalid_request_error", "limit must be an integer from 1 to 100.",
                       param="limit") from None
    if not 1 <= n <= 100:
        raise ApiError(400, "invalid_request_error", "limit must be an integer from 1 to 100.", param="limit")
    return n


def settlement_day(unix: int) -> str:
    """The settlement report date (UTC) a charge or refund made at `unix` is listed under."""
    return datetime.fromtimestamp(unix, UTC).date().isoformat()


def purge_expired_keys(store: Store, now: int | None = None) -> int:
    """Forget idempotency keys older than 24 h; returns how many."""
    cutoff = (now or _now()) - IDEMPOTENCY_TTL_S
    return store.db.execute("DELETE FROM idem WHERE created <= ?", (cutoff,)).rowcount


def run(config: PspConfig, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    psp = Psp(config)
    purge_expired_keys(psp.store)
    app = psp.app()

    async def announce(_: web.Application) -> None:
        if ready:
            ready(f"http://{config.host}:{config.port}")

    app.on_startup.append(announce)
    if config.listen_fd is not None:
        sock = socket.socket(fileno=config.listen_fd)
        web.run_app(app, sock=sock, print=None, access_log=None, shutdown_timeout=2)
        return
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None,
                shutdown_timeout=2)


__all__ = ["Faults", "PspConfig", "SignatureVerificationError", "run", "settlement_day", "sign_payload",
           "verify_signature"]
