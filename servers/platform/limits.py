"""Tiered rate limits on every sysdesign API: per user from the token, per IP without one.

Every gRPC call the platform middleware wraps, and every request to the HTTP
edge, is checked here on the shared limiter (servers/platform/ratelimit.py,
one atomic Redis script for all of a call's limits, so every replica counts
against the same budget):

- a caller with a token is limited per user, by the rules of the user's tier
  (``free`` unless the limits file names the user under another tier);
- a call without a token (registering, logging in, the edge's short links)
  is limited per client IP by the ``anonymous`` tier;
- each tier has a rule for everything (``"*"``) and may add a tighter rule per
  method (``sysdesign.shortener.v1.ShortenerService/CreateShortUrl``) or for
  the edge (``edge``); a call must pass every rule that applies to it.

Over the limit, gRPC answers RESOURCE_EXHAUSTED with ``RetryInfo`` and a
``QuotaFailure`` naming the subject and the rule; the edge answers 429 with
``Retry-After`` and the IETF draft's ``RateLimit`` / ``RateLimit-Policy``
headers. When Redis does not answer in time, the ``failure_mode`` decides:
``allow`` (the default: an API stays up when only its limiter is down) or
``deny``; either way ``sysdesign_api_limit_backend_errors_total`` counts it.

The limits come from the YAML file ``SYSDESIGN_API_LIMITS_FILE`` (the same
shape as DEFAULT_LIMITS below), or the defaults; ``SYSDESIGN_API_LIMITS=off``
turns them off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml
from google.rpc import error_details_pb2
from prometheus_client import Counter

from servers.platform.errors import ResourceExhausted
from servers.platform.ratelimit import (
    UNIT_SECONDS,
    Algorithm,
    Check,
    Decision,
    OverLimitCache,
    RateLimitBackendError,
    RateLimiter,
    Rule,
    ceil_seconds,
)

log = structlog.get_logger("limits")

API_LIMITED = Counter("sysdesign_api_limited_total", "Calls refused by the API rate limits",
                      ["tier", "rule"])
API_LIMIT_BACKEND_ERRORS = Counter("sysdesign_api_limit_backend_errors_total",
                                   "API limit checks Redis did not answer (the failure mode decided)",
                                   ["mode"])

ANONYMOUS = "anonymous"
DEFAULT_TIER = "free"
EDGE = "edge"
ANY = "*"
_UNITS = {unit.lower(): seconds for unit, seconds in UNIT_SECONDS.items()}

# The defaults (README, "Rate limits"). Generous for a person at a keyboard or
# a script, tight where a call is expensive (argon2 on register and login,
# media uploads) or is what spam is made of (links, posts, messages).
DEFAULT_LIMITS: dict[str, Any] = {
    "failure_mode": "allow",
    "tiers": {
        ANONYMOUS: {
            ANY: {"requests": 120, "unit": "minute"},
            "sysdesign.identity.v1.IdentityService/RegisterUser": {"requests": 30, "unit": "hour"},
            "sysdesign.identity.v1.IdentityService/Login": {"requests": 30, "unit": "minute"},
            EDGE: {"requests": 1200, "unit": "minute"},
        },
        DEFAULT_TIER: {
            ANY: {"requests": 3000, "unit": "minute"},
            "sysdesign.shortener.v1.ShortenerService/CreateShortUrl": {"requests": 100, "unit": "minute"},
            "sysdesign.shortener.v1.ShortenerService/CreatePaste": {"requests": 60, "unit": "minute"},
            "sysdesign.feed.v1.PostService/CreatePost": {"requests": 30, "unit": "minute"},
            "sysdesign.chat.v1.ChatService/SendMessage": {"requests": 120, "unit": "minute"},
            "sysdesign.chat.v1.ChatService/Connect": {"requests": 30, "unit": "minute"},
            "sysdesign.media.v1.MediaService/CreateUpload": {"requests": 60, "unit": "hour"},
        },
        "pro": {
            ANY: {"requests": 30000, "unit": "minute"},
            "sysdesign.shortener.v1.ShortenerService/CreateShortUrl": {"requests": 1000, "unit": "minute"},
            "sysdesign.shortener.v1.ShortenerService/CreatePaste": {"requests": 600, "unit": "minute"},
            "sysdesign.feed.v1.PostService/CreatePost": {"requests": 300, "unit": "minute"},
            "sysdesign.chat.v1.ChatService/SendMessage": {"requests": 1200, "unit": "minute"},
            "sysdesign.chat.v1.ChatService/Connect": {"requests": 300, "unit": "minute"},
            "sysdesign.media.v1.MediaService/CreateUpload": {"requests": 600, "unit": "hour"},
        },
    },
    # Infrastructure, not people: Envoy asks the rate limit service on every
    # request it proxies, so that service is never limited by these.
    "exempt": ["envoy.service.ratelimit.v3.RateLimitService/*"],
    # username: tier
    "users": {},
}


class LimitsConfigError(ValueError):
    """A limits file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class NamedRule:
    scope: str  # "*", "edge" or a method "pkg.Service/Method"
    rule: Rule

    def describe(self) -> str:
        unit = next((u for u, s in _UNITS.items() if s == self.rule.window_s), f"{self.rule.window_s}s")
        what = "every call" if self.scope == ANY else ("the edge" if self.scope == EDGE else self.scope)
        return f"{self.rule.requests} per {unit} for {what}"


@dataclass(frozen=True)
class Limits:
    tiers: dict[str, dict[str, NamedRule]]
    users: dict[str, str] = field(default_factory=dict)
    exempt: tuple[str, ...] = ()
    failure_mode: str = "allow"

    def tier_of(self, username: str | None) -> str:
        if username is None:
            return ANONYMOUS
        return self.users.get(username, DEFAULT_TIER)

    def rules_for(self, tier: str, scope: str) -> list[NamedRule]:
        rules = self.tiers.get(tier) or self.tiers.get(DEFAULT_TIER, {})
        out = []
        if scope != EDGE and ANY in rules:
            out.append(rules[ANY])
        if scope in rules:
            out.append(rules[scope])
        return out

    def exempt_method(self, method: str) -> bool:
        name = method.lstrip("/")
        return any(name == e or (e.endswith("/*") and name.startswith(e[:-1])) for e in self.exempt)


def _rule(where: str, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise LimitsConfigError(f"{where}: must be a mapping with requests and unit")
    unknown = set(raw) - {"requests", "unit", "algorithm", "burst"}
    if unknown:
        raise LimitsConfigError(f"{where}: unknown keys {sorted(unknown)}")
    requests, unit = raw.get("requests"), raw.get("unit")
    if not isinstance(requests, int) or isinstance(requests, bool) or requests < 0:
        raise LimitsConfigError(f"{where}.requests: must be a whole number >= 0")
    if unit not in _UNITS:
        raise LimitsConfigError(f"{where}.unit: must be one of {', '.join(_UNITS)}")
    try:
        algorithm = Algorithm(raw.get("algorithm", Algorithm.SLIDING_WINDOW.value))
        return Rule(requests, _UNITS[unit], algorithm, int(raw.get("burst", 0)))
    except ValueError as exc:
        raise LimitsConfigError(f"{where}: {exc}") from exc


def parse(raw: Any) -> Limits:
    """Limits from the YAML document's data; LimitsConfigError names what is wrong."""
    if not isinstance(raw, dict):
        raise LimitsConfigError("the limits file must be a mapping")
    unknown = set(raw) - {"failure_mode", "tiers", "exempt", "users"}
    if unknown:
        raise LimitsConfigError(f"unknown keys {sorted(unknown)}")
    mode = raw.get("failure_mode", "allow")
    if mode not in ("allow", "deny"):
        raise LimitsConfigError("failure_mode: must be allow or deny")
    tiers: dict[str, dict[str, NamedRule]] = {}
    for tier, rules in (raw.get("tiers") or {}).items():
        if not isinstance(rules, dict):
            raise LimitsConfigError(f"tiers.{tier}: must map '*', 'edge' or methods to rules")
        tiers[str(tier)] = {}
        for scope, rule in rules.items():
            scope = str(scope).lstrip("/")
            if scope not in (ANY, EDGE) and scope.count("/") != 1:
                raise LimitsConfigError(f"tiers.{tier}.{scope}: a scope is '*', 'edge' or package.Service/Method")
            tiers[str(tier)][scope] = NamedRule(scope, _rule(f"tiers.{tier}.{scope}", rule))
    users = raw.get("users") or {}
    if not isinstance(users, dict):
        raise LimitsConfigError("users: must map usernames to tiers")
    for name, tier in users.items():
        if tier not in tiers:
            raise LimitsConfigError(f"users.{name}: no tier {tier!r} in tiers")
    exempt = raw.get("exempt") or []
    if not isinstance(exempt, list) or not all(isinstance(e, str) for e in exempt):
        raise LimitsConfigError("exempt: must be a list of methods (package.Service/Method or Service/*)")
    return Limits(tiers, {str(k): str(v) for k, v in users.items()}, tuple(e.lstrip("/") for e in exempt),
                  mode)


def load() -> Limits | None:
    """The process's limits: the file, the defaults, or None when turned off."""
    if os.environ.get("SYSDESIGN_API_LIMITS", "on").strip().lower() in ("off", "0", "false", "no"):
        return None
    path = os.environ.get("SYSDESIGN_API_LIMITS_FILE", "").strip()
    if not path:
        return parse(DEFAULT_LIMITS)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LimitsConfigError(f"{path}: {exc}") from exc
    try:
        return parse(raw)
    except LimitsConfigError as exc:
        raise LimitsConfigError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class Verdict:
    """The outcome of one call's checks: the tightest decision, and its rule."""

    allowed: bool
    tier: str
    subject: str
    rule: NamedRule | None = None
    decision: Decision | None = None

    def headers(self) -> dict[str, str]:
        """The IETF draft's RateLimit and RateLimit-Policy fields, plus Retry-After when refused."""
        if self.rule is None or self.decision is None:
            return {}
        d, r = self.decision, self.rule.rule
        name = self.rule.scope if self.rule.scope in (ANY, EDGE) else self.rule.scope.rsplit("/", 1)[-1]
        name = "all" if name == ANY else name
        out = {
            "RateLimit-Policy": f'"{name}";q={r.requests};w={r.window_s}',
            "RateLimit": f'"{name}";r={max(0, d.remaining)};t={ceil_seconds(d.reset_after_s)}',
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, ceil_seconds(d.retry_after_s)))
        return out

    def error(self) -> ResourceExhausted:
        assert self.rule is not None and self.decision is not None
        return ApiLimitExceeded(self)


class ApiLimitExceeded(ResourceExhausted):
    def __init__(self, verdict: Verdict) -> None:
        assert verdict.rule is not None and verdict.decision is not None
        self.verdict = verdict
        retry = max(verdict.decision.retry_after_s, 0.001)
        super().__init__(f"rate limit: {verdict.rule.describe()} ({verdict.tier} tier); "
                         f"retry in {ceil_seconds(retry)} s", retry_after_seconds=retry)
        self.metadata = {"tier": verdict.tier, "limit": verdict.rule.describe()}
        # gRPC trailers beside the status (interceptors._abort): the same fields the edge sends.
        self.trailers = tuple((k.lower(), v) for k, v in verdict.headers().items())

    def details(self) -> list[object]:
        v = self.verdict
        assert v.rule is not None
        return [*super().details(), error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.rule.describe())])]


@dataclass
class ApiLimiter:
    """Checks one call against the limits that apply to it (see the module docstring)."""

    limits: Limits
    limiter: RateLimiter
    _rule_labels: dict[tuple[str, str], Any] = field(default_factory=dict)

    @classmethod
    def create(cls, limits: Limits, redis: Any) -> ApiLimiter:
        return cls(limits, RateLimiter(redis, prefix="api", local_cache=OverLimitCache()))

    async def check(self, scope: str, *, user_id: int | None, username: str | None,
                    ip: str) -> Verdict:
        tier = self.limits.tier_of(username)
        subject = f"user:{user_id}" if user_id is not None else f"ip:{ip}"
        rules = self.limits.rules_for(tier, scope)
        if not rules:
            return Verdict(True, tier, subject)
        checks = [Check(f"{subject}:{r.scope}", r.rule) for r in rules]
        try:
            decisions = await self.limiter.check(checks)
        except RateLimitBackendError as exc:
            mode = self.limits.failure_mode
            API_LIMIT_BACKEND_ERRORS.labels(mode).inc()
            log.warning("api_limit_backend_error", mode=mode, error=str(exc))
            if mode == "deny":
                d = Decision(False, rules[0].rule.requests, 0, 1.0, 1.0, 0, 0)
                return Verdict(False, tier, subject, rules[0], d)
            return Verdict(True, tier, subject)
        # Refused by any rule: the one whose wait is longest; else the one with least left.
        refused = [(d.retry_after_s, i) for i, d in enumerate(decisions) if not d.allowed]
        if refused:
            _, i = max(refused)
            key = (tier, rules[i].scope)
            counter = self._rule_labels.get(key)
            if counter is None:
                counter = self._rule_labels[key] = API_LIMITED.labels(*key)
            counter.inc()
            return Verdict(False, tier, subject, rules[i], decisions[i])
        i = min(range(len(decisions)), key=lambda j: decisions[j].remaining)
        return Verdict(True, tier, subject, rules[i], decisions[i])


def peer_ip(peer: str) -> str:
    """The address of a gRPC peer string: ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.index("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return rest or peer
