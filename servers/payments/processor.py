"""The card processor, seen through one narrow port.

Payments speaks to its processor only through ``Processor``: one call sends
one money-moving request with its idempotency key and says what came of it.
``HttpProcessor`` is the adapter for a Stripe-shaped HTTP API (what `sysdesign
sim psp` serves, servers/sim/psp.py); another processor is another adapter of
the same shape.

An answer is one of three kinds, and the difference is the whole point:

* ``done``: the processor did it (or did it before: the same key answers the
  first answer again) and ``obj`` is its object;
* ``refused``: the processor will never do it (a decline, a request it
  rejects); ``obj`` is what it says, with the intent as it stands when it
  names one;
* ``unknown``: no answer that says either (a timeout, a connection cut, a
  5xx, a rate limit, the key still in flight). The money may or may not
  have moved: the caller keeps the request and its key and sends them again
  later, which either does it once or answers what was done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import structlog

log = structlog.get_logger("sysdesign.payments.processor")

DEFAULT_URL = "http://127.0.0.1:12111"
# Stripe's default tolerance for a webhook's timestamp (replays older than this are refused).
WEBHOOK_TOLERANCE_S = 300


@dataclass(frozen=True)
class Request:
    """A processor request as stored with the intent until it is answered."""

    method: str  # "POST"
    path: str  # "/v1/payment_intents", "/v1/payment_intents/pi_x/capture", "/v1/refunds"
    body: dict[str, Any]
    key: str  # the idempotency key, derived from the intent and the operation's number

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "body": self.body, "key": self.key}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Request:
        return cls(str(d["method"]), str(d["path"]), dict(d["body"]), str(d["key"]))


@dataclass(frozen=True)
class Answer:
    kind: str  # done, refused, unknown
    obj: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    error: dict[str, Any] = field(default_factory=dict)
    why: str = ""  # for unknown: what went wrong

    @property
    def done(self) -> bool:
        return self.kind == "done"

    @property
    def refused(self) -> bool:
        return self.kind == "refused"

    @property
    def unknown(self) -> bool:
        return self.kind == "unknown"


class Processor(Protocol):
    async def send(self, request: Request) -> Answer: ...

    async def settlement_report(self, date: str) -> str: ...

    def verify_webhook(self, raw: bytes, headers: Mapping[str, str]) -> None:
        """Raises WebhookRejected unless the body is signed by the processor."""

    async def close(self) -> None: ...


class WebhookRejected(ValueError):
    pass


@dataclass(frozen=True)
class ProcessorSettings:
    url: str = field(default_factory=lambda: os.environ.get("SYSDESIGN_PSP_URL", DEFAULT_URL).rstrip("/"))
    secret_key: str = field(default_factory=lambda: os.environ.get("SYSDESIGN_PSP_SECRET_KEY", "sk_test_sim"))
    webhook_secret: str = field(
        default_factory=lambda: os.environ.get("SYSDESIGN_PSP_WEBHOOK_SECRET", "whsec_sim"))
    # A call not answered in this time is unknown (and sent again later with its key).
    timeout_s: float = field(default_factory=lambda: float(os.environ.get("SYSDESIGN_PSP_TIMEOUT_SECONDS", "10")))


class HttpProcessor:
    """A Stripe-shaped processor over HTTP (JSON bodies, bearer key, Idempotency-Key)."""

    def __init__(self, settings: ProcessorSettings | None = None) -> None:
        self.s = settings or ProcessorSettings()
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.s.secret_key}"},
                timeout=aiohttp.ClientTimeout(total=self.s.timeout_s),
                connector=aiohttp.TCPConnector(limit=256))
        return self._session

    async def send(self, request: Request) -> Answer:
        try:
            async with self._http().request(
                    request.method, self.s.url + request.path, data=json.dumps(request.body),
                    headers={"Idempotency-Key": request.key, "Content-Type": "application/json"}) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Answer("unknown", why=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return Answer("unknown", status=status, why=f"HTTP {status} with a body that is not JSON")
        if 200 <= status < 300:
            return Answer("done", body, status)
        err = body.get("error", {}) if isinstance(body, dict) else {}
        if status == 402:
            # A decline: final for this request. Stripe names the intent in the error.
            return Answer("refused", err.get("payment_intent") or {}, status, err)
        if status == 400 and err.get("type") != "idempotency_error":
            return Answer("refused", err.get("payment_intent") or {}, status, err)
        if status == 404:
            return Answer("refused", {}, status, err)
        # 401 (our key is wrong), 409 (the key is in flight), 429, 5xx, an idempotency error:
        # nothing says whether the money moved; the request is sent again later.
        if status == 401:
            log.error("processor_rejects_our_api_key", url=self.s.url)
        return Answer("unknown", status=status, error=err, why=f"HTTP {status} {err.get('code') or ''}".strip())

    async def settlement_report(self, date: str) -> str:
        async with self._http().get(self.s.url + "/v1/reports/settlement", params={"date": date}) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"settlement report for {date}: HTTP {resp.status}: {text[:200]}")
            return text

    def verify_webhook(self, raw: bytes, headers: Mapping[str, str]) -> None:
        # Stripe's scheme: Stripe-Signature: t=<unix>,v1=<HMAC-SHA256(secret, "<t>.<body>")>.
        from servers.sim.psp import SignatureVerificationError, verify_signature

        try:
            verify_signature(raw, headers.get("Stripe-Signature", ""), self.s.webhook_secret,
                             tolerance_s=WEBHOOK_TOLERANCE_S)
        except SignatureVerificationError as exc:
            raise WebhookRejected(str(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
