"""The HTTP front door (aiohttp): short-link redirects and raw pastes.

    GET /{code}        301/302 to the long URL, counted like ResolveShortUrl
                       (referrer, user agent, client address); 404 unknown,
                       410 Gone expired or out of visits.
    GET /p/{paste_id}  the raw paste as text/plain; charset=utf-8, with ETag,
                       Last-Modified and Cache-Control; 304 on If-None-Match.
    GET /healthz       200 when the backends answer.

The edge talks to Redis and the stores directly through the same domain
code as the gRPC services: a redirect costs one Redis round trip, not a gRPC
hop.
"""

from __future__ import annotations

import asyncio
import html
import time
from email.utils import formatdate
from typing import Any

import structlog
from aiohttp import web

from servers.platform.errors import FailedPrecondition, InvalidArgument, NotFound
from servers.platform.interceptors import BACKEND_ERRORS
from servers.platform.limits import EDGE
from servers.platform.metrics import HTTP_REQUESTS
from servers.platform.runtime import Runtime
from servers.shortener.core import REDIRECT_PERMANENT, ShortenerCore
from servers.shortener.paste import PasteCore

log = structlog.get_logger("sysdesign.edge")

# A request whose backends do not answer in this time gets a 503.
EDGE_TIMEOUT_SECONDS = 10.0
_EDGE_UNAVAILABLE: tuple[type[BaseException], ...] = (TimeoutError, *BACKEND_ERRORS)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{status} {title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;color:#222}}
h1{{font-size:1.4em}}code{{background:#f3f3f3;padding:0 .3em}}</style></head>
<body><h1>{status} {title}</h1><p>{message}</p></body></html>
"""


def page(status: int, title: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="text/html", charset="utf-8",
                        text=_PAGE.format(status=status, title=html.escape(title),
                                          message=html.escape(message)),
                        headers={"Cache-Control": "no-store"})


def client_ip(request: web.Request, trusted_proxies: frozenset[str]) -> str:
    """The client's address; X-Forwarded-For only counts when a trusted proxy sent it."""
    remote = request.remote or ""
    fwd = request.headers.get("X-Forwarded-For")
    if fwd and remote in trusted_proxies:
        return fwd.split(",")[0].strip()
    return remote


def build_app(rt: Runtime) -> web.Application:
    links = ShortenerCore.for_runtime(rt)
    pastes = PasteCore(rt)
    class _Counter:  # label children cached: the redirect path runs this on every request
        def __init__(self) -> None:
            self._children: dict[tuple[str, str], Any] = {}

        def labels(self, route: str, status: str) -> Any:
            child = self._children.get((route, status))
            if child is None:
                child = self._children[(route, status)] = HTTP_REQUESTS.labels(route, status)
            return child

    counter = _Counter()
    trusted = frozenset(rt.config.trusted_proxies)

    async def redirect(request: web.Request) -> web.StreamResponse:
        code = request.match_info["code"]
        try:
            r = await links.resolve(code, referrer=request.headers.get("Referer", ""),
                                    user_agent=request.headers.get("User-Agent", ""),
                                    client_ip=client_ip(request, trusted),
                                    count=request.method != "HEAD")
        except (NotFound, InvalidArgument):
            counter.labels("redirect", "404").inc()
            return page(404, "Not Found", f"There is no short link /{code}.")
        except FailedPrecondition as e:
            counter.labels("redirect", "410").inc()
            return page(410, "Gone", e.message)
        status = 301 if r.redirect_type == REDIRECT_PERMANENT else 302
        counter.labels("redirect", str(status)).inc()
        headers = {"Location": r.long_url}
        if status == 302 or r.max_visits:
            # every visit must reach us: counted, and refused once the limit is reached
            headers["Cache-Control"] = "private, no-cache"
        else:
            max_age = 86400
            if r.expire_ms:
                max_age = max(0, min(max_age, int(r.expire_ms / 1000 - time.time())))
            headers["Cache-Control"] = f"public, max-age={max_age}"
        return web.Response(status=status, headers=headers)

    async def raw_paste(request: web.Request) -> web.StreamResponse:
        paste_id = request.match_info["paste_id"]
        try:
            row = await pastes.get_meta(paste_id)
        except (NotFound, InvalidArgument):
            counter.labels("paste", "404").inc()
            return page(404, "Not Found", f"There is no paste {paste_id}.")
        except FailedPrecondition as e:
            counter.labels("paste", "410").inc()
            return page(410, "Gone", e.message)
        etag = f'"{row["etag"]}"'
        now = time.time()
        max_age = 86400
        if row["expire_ms"]:
            max_age = max(0, min(max_age, int(row["expire_ms"] / 1000 - now)))
        headers = {
            "ETag": etag,
            "Last-Modified": formatdate(row["create_ms"] / 1000, usegmt=True),
            # Pastes are immutable: caches may keep them until they expire.
            "Cache-Control": f"public, max-age={max_age}, immutable",
            "X-Content-Type-Options": "nosniff",
        }
        inm = request.headers.get("If-None-Match", "")
        if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            counter.labels("paste", "304").inc()
            return web.Response(status=304, headers=headers)
        try:
            body = b"" if request.method == "HEAD" else await pastes.read_blob(row)
        except NotFound:
            counter.labels("paste", "404").inc()
            return page(404, "Not Found", f"There is no paste {paste_id}.")
        counter.labels("paste", "200").inc()
        resp = web.Response(status=200, body=body, headers=headers,
                            content_type="text/plain", charset="utf-8")
        if request.method == "HEAD":
            resp.headers["Content-Length"] = str(row["size_bytes"])
        return resp

    async def healthz(request: web.Request) -> web.Response:
        try:
            await rt.redis.ping()
            await rt.tables.ping()
            await rt.blobs.ping()
        except Exception as exc:
            return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
        return web.json_response({"status": "ok"})

    async def index(request: web.Request) -> web.Response:
        return page(200, "sysdesign edge",
                    "Short links live at /{code}, raw pastes at /p/{id}. "
                    "Create them over gRPC (see the README).")

    @web.middleware
    async def backend_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            async with asyncio.timeout(EDGE_TIMEOUT_SECONDS):
                return await handler(request)
        except _EDGE_UNAVAILABLE as exc:
            log.warning("backend_unavailable", path=request.path, error=repr(exc))
            counter.labels("error", "503").inc()
            resp = page(503, "Service Unavailable", "A backend is unavailable; try again shortly.")
            resp.headers["Retry-After"] = "5"
            return resp

    api_limits = rt.api_limits

    @web.middleware
    async def limited(request: web.Request, handler: Any) -> web.StreamResponse:
        """The anonymous tier's `edge` rule, per client IP (servers/platform/limits.py)."""
        if api_limits is None or request.path == "/healthz":
            return await handler(request)
        verdict = await api_limits.check(EDGE, user_id=None, username=None,
                                         ip=client_ip(request, trusted))
        if not verdict.allowed:
            counter.labels("limited", "429").inc()
            resp = page(429, "Too Many Requests", "Too many requests from this address; "
                        "retry after the number of seconds in Retry-After.")
            resp.headers.update(verdict.headers())
            return resp
        resp = await handler(request)
        if not resp.prepared:
            resp.headers.update(verdict.headers())
        return resp

    app = web.Application(middlewares=[limited, backend_errors])
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/p/{paste_id}", raw_paste)
    from servers.systems import SYSTEMS

    for system in SYSTEMS.values():
        if system.edge_routes is not None:
            system.edge_routes(app, rt)
    # Last: one path segment that no other route claimed is a short code.
    app.router.add_get(CODE_ROUTE, redirect)
    return app


CODE_ROUTE = "/{code}"


def route_prefixes(rt: Runtime) -> frozenset[str]:
    """The first path segments the edge's own routes claim (``p``, ``media``, ``chat``, ``healthz``, …).

    Read from the route table :func:`build_app` builds, every system's
    ``edge_routes`` included, so a prefix a new system adds is reserved the
    moment it is routed: a short code equal to one would never be reached.
    """
    out: set[str] = set()
    for resource in build_app(rt).router.resources():
        path = resource.canonical
        if path == CODE_ROUTE:
            continue
        first = path.lstrip("/").split("/", 1)[0]
        if first and "{" not in first:
            out.add(first.lower())
    return frozenset(out)
