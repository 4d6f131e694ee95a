"""Input rules of the shortener and the pastebin; every rule reports a field violation."""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit

from servers.platform.errors import Violations
from servers.platform.ids import is_base62

MAX_URL_LEN = 2048
ALIAS_MIN, ALIAS_MAX = 4, 32
RESERVED_ALIASES = frozenset(
    a.lower() for a in (
        "api", "admin", "static", "assets", "health", "healthz", "metrics", "login", "logout",
        "signup", "register", "help", "about", "robots", "favicon", "sysdesign", "www",
    )
)
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
LANGUAGE_RE = re.compile(r"^[a-z0-9+#.\-]{1,32}$")
MAX_PASTE_BYTES = 1024 * 1024
MAX_TITLE = 200


def check_long_url(url: str, v: Violations, *, edge_base: str = "", field: str = "long_url") -> None:
    if not url:
        v.add(field, "is required")
        return
    if len(url) > MAX_URL_LEN:
        v.add(field, f"must be at most {MAX_URL_LEN} characters (got {len(url)})")
        return
    if _CONTROL.search(url):
        v.add(field, "must not contain spaces or control characters")
        return
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("javascript", "data", "vbscript", "file"):
        v.add(field, f"the {scheme}: scheme is not allowed; use http or https")
        return
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises on a bad port
    except ValueError:
        v.add(field, "is not a valid URL")
        return
    if parts.scheme.lower() not in ("http", "https"):
        v.add(field, "must be an http or https URL")
        return
    if not host:
        v.add(field, "must have a host")
        return
    if edge_base:
        edge = urlsplit(edge_base)
        if parts.netloc.lower() == edge.netloc.lower():
            v.add(field, "must not point at this shortener (it would redirect to itself)")


def check_alias(alias: str, v: Violations, field: str = "custom_alias") -> None:
    if not ALIAS_MIN <= len(alias) <= ALIAS_MAX:
        v.add(field, f"must be {ALIAS_MIN}-{ALIAS_MAX} characters (got {len(alias)})")
    elif not is_base62(alias):
        v.add(field, "must use only Base62 characters: 0-9, A-Z, a-z")
    elif alias.lower() in RESERVED_ALIASES:
        v.add(field, f"{alias!r} is reserved")


def check_future(ms: int | None, v: Violations, field: str) -> None:
    if ms is not None and ms <= int(time.time() * 1000):
        v.add(field, "must be in the future")


def check_code(code: str, v: Violations, field: str = "code") -> None:
    if not code:
        v.add(field, "is required")
    elif not (1 <= len(code) <= ALIAS_MAX and is_base62(code)):
        v.add(field, f"must be 1-{ALIAS_MAX} Base62 characters")
