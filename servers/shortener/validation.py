"""Input rules of the shortener and the pastebin; every rule reports a field violation."""

from __future__ import annotations

import re
import time
import unicodedata
from urllib.parse import quote, urlsplit, urlunsplit

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


_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
# RFC 3986 reserved + unreserved characters and '%': everything else is percent-encoded.
_URL_SAFE = "/:@!$&'()*+,;=-._~?#[]%"


def to_ascii_url(url: str) -> str:
    """The URL as an ASCII URI (IDNA host, percent-encoded path, query and fragment).

    HTTP's Location header must be ASCII (RFC 9110 10.2.2); storing the ASCII
    form means every reader (edge, gRPC, analytics) sees one spelling.
    """
    if url.isascii():
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError("the host is not a valid internationalised domain name") from exc
    netloc = host if ":" not in host else f"[{host}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username is not None:
        userinfo = quote(parts.username, safe=_URL_SAFE)
        if parts.password is not None:
            userinfo += ":" + quote(parts.password, safe=_URL_SAFE)
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=_URL_SAFE),
                       quote(parts.query, safe=_URL_SAFE), quote(parts.fragment, safe=_URL_SAFE)))


def _same_origin(a_host: str, a_port: int | None, b_host: str, b_port: int | None) -> bool:
    if a_port != b_port:
        return False
    a, b = a_host.lower(), b_host.lower()
    return a == b or (a in _LOOPBACK and b in _LOOPBACK)


def check_long_url(url: str, v: Violations, *, edge_base: str = "", field: str = "long_url") -> None:
    if not url:
        v.add(field, "is required")
        return
    if len(url) > MAX_URL_LEN:
        v.add(field, f"must be at most {MAX_URL_LEN} characters (got {len(url)})")
        return
    if _CONTROL.search(url) or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Zs") for c in url):
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
    try:
        to_ascii_url(url)
    except ValueError as exc:
        v.add(field, str(exc))
        return
    if edge_base:
        edge = urlsplit(edge_base)
        default = {"http": 80, "https": 443}
        if _same_origin(host, parts.port or default.get(parts.scheme.lower()),
                        edge.hostname or "", edge.port or default.get(edge.scheme.lower())):
            v.add(field, "must not point at this shortener (it would redirect to itself)")


def check_alias(alias: str, v: Violations, field: str = "custom_alias") -> None:
    if not ALIAS_MIN <= len(alias) <= ALIAS_MAX:
        v.add(field, f"must be {ALIAS_MIN}-{ALIAS_MAX} characters (got {len(alias)})")
    elif not is_base62(alias):
        v.add(field, "must use only Base62 characters: 0-9, A-Z, a-z")
    elif alias.lower() in RESERVED_ALIASES:
        v.add(field, f"{alias!r} is reserved")


def check_title(title: str, v: Violations, field: str = "title") -> None:
    if len(title) > MAX_TITLE:
        v.add(field, f"must be at most {MAX_TITLE} characters")
    elif any(unicodedata.category(c) == "Cc" for c in title):
        v.add(field, "must not contain control characters")


def check_future(ms: int | None, v: Violations, field: str) -> None:
    if ms is not None and ms <= int(time.time() * 1000):
        v.add(field, "must be in the future")


def check_code(code: str, v: Violations, field: str = "code") -> None:
    if not code:
        v.add(field, "is required")
    elif not (1 <= len(code) <= ALIAS_MAX and is_base62(code)):
        v.add(field, f"must be 1-{ALIAS_MAX} Base62 characters")
