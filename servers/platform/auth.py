"""Bearer tokens and the caller.

Tokens are compact JWS (JWT, HS256) signed with the deployment's secret:
claims ``sub`` (user id), ``name`` (username), ``iat``, ``exp``. Any JWT
library can read them. The interceptor verifies the
``authorization: Bearer <token>`` metadata and puts the caller into a context
variable; handlers ask ``current_caller()`` and never trust a user id in a
request body.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from servers.platform.errors import Unauthenticated


@dataclass(frozen=True)
class Caller:
    user_id: int
    username: str
    expires_at: int


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller | None:
    return _caller.get()


def require_caller() -> Caller:
    caller = _caller.get()
    if caller is None:
        raise Unauthenticated("this call needs a bearer token: authorization: Bearer <token>",
                              reason="TOKEN_MISSING")
    return caller


def set_caller(caller: Caller | None) -> contextvars.Token[Caller | None]:
    return _caller.set(caller)


def reset_caller(token: contextvars.Token[Caller | None]) -> None:
    try:
        _caller.reset(token)
    except ValueError:  # an async generator finished in another context
        _caller.set(None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())


class TokenSigner:
    def __init__(self, secret: bytes, ttl_seconds: int = 3600) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self._cache: dict[str, Caller] = {}

    def mint(self, user_id: int, username: str, *, ttl_seconds: int | None = None,
             now: float | None = None) -> tuple[str, int]:
        now_s = int(now if now is not None else time.time())
        exp = now_s + (ttl_seconds if ttl_seconds is not None else self.ttl_seconds)
        claims = {"sub": str(user_id), "name": username, "iat": now_s, "exp": exp}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{_HEADER}.{payload}"
        sig = hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(sig)}", exp

    def verify(self, token: str, *, now: float | None = None) -> Caller:
        now_s = now if now is not None else time.time()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at <= now_s:
                raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED")
            return cached
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated("malformed token", reason="TOKEN_MALFORMED")
        header, payload, sig = parts
        try:
            expected = hmac.new(self._secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(sig)):
                raise Unauthenticated("bad token signature", reason="TOKEN_INVALID")
            hdr = json.loads(_unb64(header))
            if hdr.get("alg") != "HS256":
                raise Unauthenticated("unsupported token algorithm", reason="TOKEN_INVALID")
            claims = json.loads(_unb64(payload))
            caller = Caller(user_id=int(claims["sub"]), username=str(claims["name"]),
                            expires_at=int(claims["exp"]))
        except Unauthenticated:
            raise
        except Exception as exc:
            raise Unauthenticated("malformed token", reason="TOKEN_MALFORMED") from exc
        if caller.expires_at <= now_s:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED")
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[token] = caller
        return caller


def bearer_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an ``authorization: Bearer …`` entry; '' when the entry is not a bearer."""
    for k, v in metadata or ():
        if k == "authorization":
            value = v.decode() if isinstance(v, bytes) else v
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return ""
            return token.strip()
    return None
