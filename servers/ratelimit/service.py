"""envoy.service.ratelimit.v3.RateLimitService: Envoy's rate limit service, on sysdesign's limiter.

Any Envoy (``envoy.filters.http.ratelimit`` with a ``grpc_service``) calls
ShouldRateLimit unchanged. The request semantics are envoyproxy/ratelimit's
(src/service/ratelimit.go): every descriptor is matched against the domain's
configuration (servers/ratelimit/config.py), ``replaces`` drops the replaced
limits, unlimited descriptors answer OK with ``limit_remaining`` = 2^32-1,
descriptors without a limit answer OK with no ``current_limit``, a per-request
``limit`` override wins over the configuration, the overall code is
OVER_LIMIT if any descriptor is (quota-mode descriptors only when all of
them are), and shadow mode (per limit, or SYSDESIGN_RATELIMIT_SHADOW_MODE for
all) counts what would have been refused but answers OK.
tests/integration/test_ratelimit_envoy_compat.py runs the same requests
through envoyproxy/ratelimit itself and compares the answers.

Each limit is checked by servers/platform/ratelimit.py (one atomic Lua call,
Redis's clock, over-limit keys cached in process). When Redis fails or takes
longer than SYSDESIGN_RATELIMIT_REDIS_TIMEOUT_MS, the failure mode decides
(SYSDESIGN_RATELIMIT_FAILURE_MODE): ``allow`` answers OK, ``deny`` answers
OVER_LIMIT, ``error`` answers UNAVAILABLE as envoyproxy/ratelimit does (and
Envoy's own ``failure_mode_deny`` decides).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2 as pb
from envoy.service.ratelimit.v3 import rls_pb2_grpc as pb_grpc
from google.protobuf.duration_pb2 import Duration
from prometheus_client import Counter

from servers.platform.errors import InvalidArgument, Unavailable, Violations
from servers.platform.ratelimit import (
    MAX_HITS,
    Check,
    Decision,
    OverLimitCache,
    RateLimitBackendError,
    RateLimiter,
    ceil_seconds,
)
from servers.platform.runtime import Runtime
from servers.ratelimit.config import (
    UNIT_NUMBER,
    UNIT_SECONDS,
    ConfigError,
    Limit,
    RateLimitConfig,
    load_directory,
    snapshot,
)

log = structlog.get_logger("sysdesign.ratelimit")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RateLimitService"].full_name
# Envoy calls without sysdesign's bearer tokens (its own mTLS or the network policy guards the port).
PUBLIC_METHODS = {f"/{SERVICE_NAME}/ShouldRateLimit"}
TABLES: list[Any] = []

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_UINT32 = 2**32 - 1
# An override's unit (envoy.type.v3.RateLimitUnit, the numbers of
# RateLimitResponse.RateLimit.Unit; WEEK = 7 is newer than some generated stubs).
UNIT_NAME = {n: name for name, n in UNIT_NUMBER.items() if n}
# Bounds on a request (Envoy's own header values are at most 16 KiB).
MAX_DESCRIPTORS = 128
MAX_ENTRIES = 64
MAX_TEXT_BYTES = 16384
NEAR_LIMIT_DEFAULT = 0.8

# -- metrics -----------------------------------------------------------------
#
# envoyproxy/ratelimit's statsd names, as its statsd-exporter mapping names
# them for Prometheus, with the descriptor key as a label instead of key1/key2:
#   ratelimit.service.rate_limit.<domain>.<key>.<stat>
#   -> ratelimit_service_rate_limit_<stat>_total{domain="<domain>", key="<key>"}

_LABELS = ["domain", "key"]
TOTAL_HITS = Counter("ratelimit_service_rate_limit_total_hits", "Hits on a limit", _LABELS)
OVER_LIMIT = Counter("ratelimit_service_rate_limit_over_limit", "Hits over a limit", _LABELS)
NEAR_LIMIT = Counter("ratelimit_service_rate_limit_near_limit",
                     "Hits over the near-limit ratio but within the limit", _LABELS)
WITHIN_LIMIT = Counter("ratelimit_service_rate_limit_within_limit", "Hits within a limit", _LABELS)
OVER_LIMIT_LOCAL = Counter("ratelimit_service_rate_limit_over_limit_with_local_cache",
                           "Over-limit hits answered from the local cache", _LABELS)
SHADOW_MODE = Counter("ratelimit_service_rate_limit_shadow_mode",
                      "Over-limit hits let through by shadow_mode", _LABELS)
DOMAIN_NOT_FOUND = Counter("ratelimit_service_rate_limit_domain_not_found",
                           "Requests for a domain no configuration declares", ["domain"])
CONFIG_LOAD_SUCCESS = Counter("ratelimit_service_config_load_success", "Configurations loaded")
CONFIG_LOAD_ERROR = Counter("ratelimit_service_config_load_error",
                            "Configurations refused (the last good one stays)")
SHOULD_RATE_LIMIT_ERROR = Counter("ratelimit_service_should_rate_limit_error",
                                  "Calls that hit an error", ["err_type"])
FAILURE_MODE = Counter("ratelimit_service_failure_mode",
                       "Descriptors answered by the failure mode while Redis failed", ["mode"])
GLOBAL_SHADOW_MODE = Counter("ratelimit_service_global_shadow_mode",
                             "OVER_LIMIT answers turned OK by the global shadow mode")

# A label value from a request (detailed_metric, unknown domains) is bounded,
# and so is the number of series: past MAX_SERIES new keys share one.
MAX_LABEL = 200
MAX_SERIES = 10_000
_STAT_UNSAFE = re.compile(r"[:|]")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip() or default


@dataclass
class Settings:
    """SYSDESIGN_RATELIMIT_* variables (docs/ratelimit.md)."""

    config_dir: Path = field(default_factory=lambda: Path(_env("SYSDESIGN_RATELIMIT_CONFIG_DIR",
                                                                str(EXAMPLES_DIR))))
    poll_seconds: float = field(default_factory=lambda: float(_env("SYSDESIGN_RATELIMIT_CONFIG_POLL_SECONDS", "1")))
    failure_mode: str = field(default_factory=lambda: _env("SYSDESIGN_RATELIMIT_FAILURE_MODE", "allow").lower())
    redis_timeout_ms: float = field(default_factory=lambda: float(_env("SYSDESIGN_RATELIMIT_REDIS_TIMEOUT_MS", "250")))
    local_cache_entries: int = field(default_factory=lambda: int(_env("SYSDESIGN_RATELIMIT_LOCAL_CACHE_ENTRIES", "100000")))
    # concurrent requests' checks share one Redis script call per batch (servers/platform/ratelimit.py)
    coalesce: bool = field(default_factory=lambda: _env("SYSDESIGN_RATELIMIT_COALESCE", "1") not in ("0", "false", "no"))
    near_limit_ratio: float = field(default_factory=lambda: float(_env("SYSDESIGN_RATELIMIT_NEAR_LIMIT_RATIO", "0.8")))
    shadow_mode: bool = field(default_factory=lambda: _env("SYSDESIGN_RATELIMIT_SHADOW_MODE", "0") not in ("0", "false", "no"))
    merge_domains: bool = field(default_factory=lambda: _env("SYSDESIGN_RATELIMIT_MERGE_DOMAINS", "0") not in ("0", "false", "no"))
    response_headers: bool = field(default_factory=lambda: _env("SYSDESIGN_RATELIMIT_RESPONSE_HEADERS", "1") not in ("0", "false", "no"))
    key_prefix: str = field(default_factory=lambda: os.environ.get("SYSDESIGN_RATELIMIT_KEY_PREFIX", "").strip())

    def __post_init__(self) -> None:
        if self.failure_mode not in ("allow", "deny", "error"):
            raise ValueError(f"SYSDESIGN_RATELIMIT_FAILURE_MODE={self.failure_mode!r}: allow, deny or error")


class _Stats:
    """The per-key counters, resolved once per key (a label lookup per hit is costly)."""

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[Any, ...]] = {}
        self._not_found: dict[str, Any] = {}

    def of(self, full_key: str) -> tuple[Any, ...]:
        got = self._by_key.get(full_key)
        if got is None:
            domain, _, k = _STAT_UNSAFE.sub("_", full_key).partition(".")
            if len(self._by_key) >= MAX_SERIES:
                k = "_overflow"
            domain, k = domain[:MAX_LABEL], k[:MAX_LABEL]
            got = tuple(c.labels(domain, k) for c in (TOTAL_HITS, OVER_LIMIT, NEAR_LIMIT, WITHIN_LIMIT,
                                                      OVER_LIMIT_LOCAL, SHADOW_MODE))
            if len(self._by_key) < MAX_SERIES:
                self._by_key[full_key] = got
        return got

    def not_found(self, domain: str) -> Any:
        """The domain_not_found counter of a domain from a request (bounded like the keys)."""
        got = self._not_found.get(domain)
        if got is None:
            label = _STAT_UNSAFE.sub("_", domain)[:MAX_LABEL] if len(self._not_found) < MAX_SERIES else "_overflow"
            got = DOMAIN_NOT_FOUND.labels(label)
            if len(self._not_found) < MAX_SERIES:
                self._not_found[domain] = got
        return got

    def clear(self) -> None:
        self._by_key.clear()


class ConfigHolder:
    """The current configuration of a directory, reloaded when its files change.

    A change is seen by polling the files' contents (a mounted ConfigMap
    changes by a symlink swap, which inotify on the files would miss). A bad
    file refuses the whole new set, logged with the file, line and reason and
    counted in ``ratelimit_service_config_load_error_total``; the last good
    configuration stays.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = RateLimitConfig()
        self.last_error: ConfigError | None = None
        self.generation = 0
        self._seen: tuple[tuple[str, bytes], ...] | None = None
        self.on_change: list[Any] = []

    def reload(self) -> bool:
        """Load the directory if it changed; True when a new configuration took effect."""
        d = self.settings.config_dir
        now = snapshot(d)
        if now == self._seen:
            return False
        self._seen = now
        try:
            cfg = load_directory(d, merge_domains=self.settings.merge_domains)
        except ConfigError as e:
            self.last_error = e
            CONFIG_LOAD_ERROR.inc()
            log.error("ratelimit_config_refused", file=e.file, line=e.line, reason=e.reason,
                      kept_domains=sorted(self.config.domains))
            return False
        self.config = cfg
        self.last_error = None
        self.generation += 1
        CONFIG_LOAD_SUCCESS.inc()
        log.info("ratelimit_config_loaded", dir=str(d), files=[Path(f).name for f in cfg.files],
                 domains=sorted(cfg.domains))
        for cb in self.on_change:
            cb()
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                await asyncio.to_thread(self.reload)
            except Exception as exc:  # never let the watcher die
                log.warning("ratelimit_config_watch_failed", error=repr(exc))


@dataclass
class _Item:
    """One descriptor of a request, through the pipeline of ShouldRateLimit."""

    limit: Limit | None
    unlimited: bool = False
    hits: int = 1
    name: str = ""
    decision: Decision | None = None


def _entries_text(domain: str, entries: list[tuple[str, str]], patterns: tuple[str, ...]) -> str:
    """The counter's identity, as envoyproxy/ratelimit's cache key (without the window)."""
    parts = [domain]
    for i, (k, v) in enumerate(entries):
        use = patterns[i] if i < len(patterns) and patterns[i] else v
        parts.append(f"{k}_{use}")
    return "_".join(parts)


def _sf_string(s: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, with \\ and " escaped."""
    s = "".join(ch if 0x20 <= ord(ch) < 0x7F else "_" for ch in s)[:MAX_LABEL]
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _duration(seconds: float) -> Duration:
    d = Duration()
    whole = int(seconds)
    d.seconds, d.nanos = whole, round((seconds - whole) * 1e9)
    if d.nanos >= 1_000_000_000:
        d.seconds, d.nanos = d.seconds + 1, 0
    return d


class RateLimitServicer(pb_grpc.RateLimitServiceServicer):
    def __init__(self, rt: Runtime, settings: Settings, holder: ConfigHolder) -> None:
        self.rt = rt
        self.settings = settings
        self.holder = holder
        self.cache = OverLimitCache(settings.local_cache_entries)
        self.limiter = RateLimiter(rt.redis, prefix=settings.key_prefix,
                                   timeout_s=settings.redis_timeout_ms / 1000, local_cache=self.cache,
                                   coalesce=settings.coalesce)
        self.stats = _Stats()
        # A new configuration may raise a limit: what the cache knew is void.
        holder.on_change.append(self.cache.clear)
        holder.on_change.append(self.stats.clear)

    # -- validation ---------------------------------------------------------

    @staticmethod
    def _validate(request: pb.RateLimitRequest) -> None:
        v = Violations()
        if not request.domain:
            v.add("domain", "rate limit domain must not be empty")
        elif len(request.domain.encode()) > MAX_TEXT_BYTES:
            v.add("domain", f"must be at most {MAX_TEXT_BYTES} bytes")
        if not request.descriptors:
            v.add("descriptors", "rate limit descriptor list must not be empty")
        elif len(request.descriptors) > MAX_DESCRIPTORS:
            v.add("descriptors", f"at most {MAX_DESCRIPTORS} descriptors per request")
        for i, d in enumerate(request.descriptors[:MAX_DESCRIPTORS]):
            if not d.entries:
                v.add(f"descriptors[{i}].entries", "a descriptor needs at least one entry")
            elif len(d.entries) > MAX_ENTRIES:
                v.add(f"descriptors[{i}].entries", f"at most {MAX_ENTRIES} entries per descriptor")
            for j, e in enumerate(d.entries[:MAX_ENTRIES]):
                if not e.key:
                    v.add(f"descriptors[{i}].entries[{j}].key", "must not be empty")
                elif len(e.key.encode()) > MAX_TEXT_BYTES:
                    v.add(f"descriptors[{i}].entries[{j}].key", f"must be at most {MAX_TEXT_BYTES} bytes")
                if len(e.value.encode()) > MAX_TEXT_BYTES:
                    v.add(f"descriptors[{i}].entries[{j}].value", f"must be at most {MAX_TEXT_BYTES} bytes")
            if d.HasField("limit"):
                if d.limit.unit not in UNIT_NAME:
                    v.add(f"descriptors[{i}].limit.unit",
                          "must be SECOND, MINUTE, HOUR, DAY, WEEK, MONTH or YEAR")
            if d.HasField("hits_addend") and d.hits_addend.value > MAX_HITS:
                v.add(f"descriptors[{i}].hits_addend", f"must be at most {MAX_HITS}")
        v.raise_if_any()

    # -- the call -----------------------------------------------------------

    def _items(self, request: pb.RateLimitRequest, config: RateLimitConfig) -> list[_Item]:
        domain = request.domain
        default_hits = max(1, request.hits_addend)
        known = config.has_domain(domain)
        if not known:
            self.stats.not_found(domain).inc()
        items: list[_Item] = []
        replacing: set[str] = set()
        for d in request.descriptors:
            entries = [(e.key, e.value) for e in d.entries]
            hits = d.hits_addend.value if d.HasField("hits_addend") else default_hits
            limit: Limit | None
            if not known:
                limit = None  # an override of an unknown domain is ignored too, as Envoy's service does
            elif d.HasField("limit"):
                # A per-request override: a fixed window, never in shadow mode (as Envoy's service).
                unit = UNIT_NAME[d.limit.unit]
                key = domain + "." + ".".join(k + ("_" + v if v else "") for k, v in entries)
                limit = Limit(full_key=key, requests_per_unit=d.limit.requests_per_unit, unit=unit)
            else:
                limit = config.get_limit(domain, entries)
            item = _Item(limit=limit, hits=hits)
            if limit is not None:
                replacing.update(limit.replaces)
                if limit.unlimited:
                    item.unlimited, item.limit = True, None
                else:
                    item.name = _entries_text(domain, entries, limit.share_patterns)
            items.append(item)
        for item in items:
            if item.limit is not None and item.limit.name and item.limit.name in replacing:
                item.limit = None
        return items

    async def ShouldRateLimit(self, request: pb.RateLimitRequest,
                              context: grpc.aio.ServicerContext) -> pb.RateLimitResponse:
        try:
            self._validate(request)
        except InvalidArgument:
            SHOULD_RATE_LIMIT_ERROR.labels("service_error").inc()
            raise
        items = self._items(request, self.holder.config)
        todo = [it for it in items if it.limit is not None]
        failed = False
        if todo:
            checks = [Check(it.name, it.limit.rule(), it.hits) for it in todo]  # type: ignore[union-attr]
            try:
                for it, d in zip(todo, await self.limiter.check(checks), strict=True):
                    it.decision = d
            except RateLimitBackendError as exc:
                failed = True
                SHOULD_RATE_LIMIT_ERROR.labels("redis_error").inc()
                FAILURE_MODE.labels(self.settings.failure_mode).inc(len(todo))
                log.warning("ratelimit_redis_failed", mode=self.settings.failure_mode, error=str(exc),
                            domain=request.domain)
                if self.settings.failure_mode == "error":
                    raise Unavailable("the rate limit backend (Redis) is unavailable",
                                      reason="BACKEND_UNAVAILABLE") from exc
        return self._response(items, failed)

    def _response(self, items: list[_Item], failed: bool) -> pb.RateLimitResponse:
        resp = pb.RateLimitResponse()
        over_rl = over_quota = total_quota = 0
        closest: tuple[tuple[int, int], _Item, pb.RateLimitResponse.DescriptorStatus] | None = None
        ratio = self.settings.near_limit_ratio
        for it in items:
            st = resp.statuses.add()
            if it.unlimited:
                st.code = pb.RateLimitResponse.OK
                st.limit_remaining = MAX_UINT32
                continue
            limit = it.limit
            if limit is None:
                st.code = pb.RateLimitResponse.OK
                continue
            st.current_limit.requests_per_unit = limit.requests_per_unit
            st.current_limit.unit = limit.unit_number  # type: ignore[assignment]
            if limit.name:
                st.current_limit.name = limit.name
            total, over, near, within, local, shadow = self.stats.of(limit.full_key)
            total.inc(it.hits)
            d = it.decision
            if d is None:  # Redis failed: the failure mode answers
                is_over = self.settings.failure_mode == "deny" and it.hits > 0
                st.limit_remaining = 0
                st.duration_until_reset.CopyFrom(_duration(float(UNIT_SECONDS[limit.unit])))
            else:
                is_over = not d.allowed
                st.limit_remaining = min(MAX_UINT32, d.remaining)
                st.duration_until_reset.CopyFrom(_duration(d.reset_after_s))
                self._count(it, d, over, near, within, local, ratio)
            if is_over and limit.shadow_mode:
                q = limit.requests_per_unit
                crossed = d is not None and not d.local and d.before < q < d.after  # a fixed window's count
                shadow.inc(d.after - q if crossed else it.hits)  # type: ignore[union-attr]
                is_over = False
            st.code = pb.RateLimitResponse.OVER_LIMIT if is_over else pb.RateLimitResponse.OK
            quota = limit.quota_mode
            if is_over:
                if quota:
                    over_quota += 1
                else:
                    over_rl += 1
            if quota:
                total_quota += 1
            # the headers speak of the limit closest to refusing (a refusing one first)
            rank = (0 if is_over else 1, st.limit_remaining)
            if closest is None or rank < closest[0]:
                closest = (rank, it, st)
        over_all = over_rl > 0 or (total_quota > 0 and total_quota == over_quota)
        if over_all and self.settings.shadow_mode:
            GLOBAL_SHADOW_MODE.inc()
            over_all = False
        resp.overall_code = pb.RateLimitResponse.OVER_LIMIT if over_all else pb.RateLimitResponse.OK
        if self.settings.response_headers and closest is not None and not failed:
            resp.response_headers_to_add.extend(self._headers(items, closest[1], closest[2]))
        return resp

    @staticmethod
    def _count(it: _Item, d: Decision, over: Any, near: Any, within: Any, local: Any, ratio: float) -> None:
        """envoyproxy/ratelimit's statistics (base_limiter.go): which of the hits were over,
        near (above ratio x limit) or within the limit."""
        hits = it.hits
        limit = d.limit
        if d.local:
            over.inc(hits)
            local.inc(hits)
            return
        near_t = int(limit * ratio)
        if not d.allowed:
            if d.before >= limit or d.after <= limit:  # all over (windows that do not count refusals)
                over.inc(hits)
            else:  # a fixed window crossed its limit with these hits
                over.inc(d.after - limit)
                near.inc(max(0, limit - max(near_t, d.before)))
        else:
            if d.after > near_t:
                near.inc(hits if d.before >= near_t else d.after - near_t)
            within.inc(hits)

    def _headers(self, items: list[_Item], it: _Item,
                 st: pb.RateLimitResponse.DescriptorStatus) -> list[base_pb2.HeaderValue]:
        """The IETF draft's RateLimit-Policy (every limit of the request) and RateLimit
        (the one closest to refusing) for the proxy to add to its response."""
        policies: list[str] = []
        seen: set[str] = set()

        def policy_name(limit: Limit) -> str:
            return _sf_string(limit.name or limit.full_key.partition(".")[2] or limit.full_key)

        for other in items:
            if other.limit is None:
                continue
            lim = other.limit
            p = f"{policy_name(lim)};q={lim.requests_per_unit};w={UNIT_SECONDS[lim.unit]}"
            if lim.burst:
                p += f";burst={lim.burst}"
            if p not in seen:
                seen.add(p)
                policies.append(p)
        assert it.limit is not None
        d = it.decision
        t = ceil_seconds(d.retry_after_s if d is not None and not d.allowed else
                         st.duration_until_reset.seconds + st.duration_until_reset.nanos / 1e9)
        return [
            base_pb2.HeaderValue(key="RateLimit-Policy", value=", ".join(policies)),
            base_pb2.HeaderValue(key="RateLimit",
                                 value=f"{policy_name(it.limit)};r={st.limit_remaining};t={t}"),
        ]


def register(server: grpc.aio.Server, rt: Runtime) -> list[str]:
    settings = Settings()
    holder = ConfigHolder(settings)
    holder.reload()
    if holder.last_error is not None:
        log.error("ratelimit_started_without_config", dir=str(settings.config_dir),
                  error=str(holder.last_error))
    rt.shared["ratelimit_config"] = holder
    rt.background.append(asyncio.create_task(holder.watch(), name="ratelimit-config-watch"))
    pb_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(rt, settings, holder), server)
    return [SERVICE_NAME]


__all__ = ["PUBLIC_METHODS", "SERVICE_NAME", "TABLES", "ConfigHolder", "RateLimitServicer", "Settings",
           "register"]
