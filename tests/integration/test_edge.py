"""The HTTP edge against the real stack: redirects, click analytics, raw pastes, health."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata, violations
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]


@dataclass
class HttpResponse:
    status: int
    headers: Message
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def request(stack: StackProcess, method: str, path: str,
            headers: dict[str, str] | None = None) -> HttpResponse:
    """One plain HTTP request; redirects are never followed."""
    u = urlsplit(stack.http_base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return HttpResponse(resp.status, resp.headers, body)
    finally:
        conn.close()


def ts_in(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(int((time.time() + seconds) * 1000))
    return t


def wait_past(ts: Timestamp) -> None:
    """Sleep until the wall clock is past ts (then the thing is expired, whatever the load)."""
    while time.time() <= ts.ToMilliseconds() / 1000 + 0.1:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def channel(stack: StackProcess) -> Iterator[grpc.Channel]:
    with stack.channel() as ch:
        yield ch


@pytest.fixture(scope="module")
def links(channel: grpc.Channel) -> pbg.ShortenerServiceStub:
    return pbg.ShortenerServiceStub(channel)


@pytest.fixture(scope="module")
def pastes(channel: grpc.Channel) -> pbg.PasteServiceStub:
    return pbg.PasteServiceStub(channel)


def shorten(links: pbg.ShortenerServiceStub, token: str, long_url: str, **fields: object) -> pb.ShortUrl:
    req = pb.CreateShortUrlRequest(long_url=long_url, **fields)  # type: ignore[arg-type]
    return links.CreateShortUrl(req, metadata=grpc_metadata(token), timeout=30).short_url


def stats(links: pbg.ShortenerServiceStub, token: str, code: str) -> pb.GetShortUrlStatsResponse:
    return links.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=code), metadata=grpc_metadata(token),
                                  timeout=30)


def paste(pastes: pbg.PasteServiceStub, token: str, content: str, **fields: object) -> pb.Paste:
    req = pb.CreatePasteRequest(content=content, **fields)  # type: ignore[arg-type]
    return pastes.CreatePaste(req, metadata=grpc_metadata(token), timeout=30).paste


# --------------------------------------------------------------------------- redirects


def test_redirect_found(stack: StackProcess, links: pbg.ShortenerServiceStub, alice: str) -> None:
    target = "https://example.com/some/path?q=a%20b&x=1#frag"
    link = shorten(links, alice, target)
    assert link.short_url == f"{stack.http_base}/{link.code}"
    r = request(stack, "GET", f"/{link.code}")
    assert r.status == 302
    assert r.header("Location") == target


@pytest.mark.parametrize(("redirect_type", "status"), [
    (pb.REDIRECT_TYPE_UNSPECIFIED, 302),
    (pb.REDIRECT_TYPE_FOUND, 302),
    (pb.REDIRECT_TYPE_PERMANENT, 301),
])
def test_redirect_status_by_type(stack: StackProcess, links: pbg.ShortenerServiceStub, alice: str,
                                 redirect_type: int, status: int) -> None:
    link = shorten(links, alice, "https://example.org/typed", redirect_type=redirect_type)
    r = request(stack, "GET", f"/{link.code}")
    assert r.status == status
    assert r.header("Location") == "https://example.org/typed"


def test_non_ascii_long_url_redirects_to_ascii_location(stack: StackProcess,
                                                         links: pbg.ShortenerServiceStub,
                                                         alice: str) -> None:
    """Location is a URI-reference (RFC 9110 10.2.2): ASCII only, other characters percent-encoded.

    Refusing such a URL at create time (INVALID_ARGUMENT on long_url) is also acceptable.
    """
    target = "https://example.com/caf\u00e9?q=\u00fc"
    try:
        link = shorten(links, alice, target)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert set(violations(err)) == {"long_url"}
        return
    u = urlsplit(stack.http_base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    try:
        conn.request("GET", f"/{link.code}")
        resp = conn.getresponse()
        resp.read()
        raw_location = next(v for k, v in resp.getheaders() if k.lower() == "location")
    finally:
        conn.close()
    assert resp.status == 302
    # http.client decodes header bytes as latin-1: any byte >= 0x80 shows up as a non-ASCII char.
    assert raw_location.isascii(), f"Location carries raw non-ASCII bytes: {raw_location!r}"
    assert unquote(raw_location) == target


def test_head_returns_redirect(stack: StackProcess, links: pbg.ShortenerServiceStub, alice: str) -> None:
    link = shorten(links, alice, "https://example.net/head")
    r = request(stack, "HEAD", f"/{link.code}")
    assert r.status == 302
    assert r.header("Location") == "https://example.net/head"
    assert r.body == b""


def test_click_analytics(stack: StackProcess, links: pbg.ShortenerServiceStub, alice: str) -> None:
    link = shorten(links, alice, "https://example.com/analytics")
    visits = [
        {"X-Forwarded-For": "203.0.113.1", "User-Agent": "agent-a",
         "Referer": "https://news.example.com/item?id=1"},
        {"X-Forwarded-For": "203.0.113.1", "User-Agent": "agent-a",
         "Referer": "https://news.example.com/other"},
        {"X-Forwarded-For": "203.0.113.2, 10.0.0.1", "User-Agent": "agent-a",
         "Referer": "https://news.example.com/"},
        {"X-Forwarded-For": "203.0.113.1", "User-Agent": "agent-b",
         "Referer": "http://blog.example.org/post"},
        {"X-Forwarded-For": "203.0.113.3", "User-Agent": "agent-a"},
    ]
    for h in visits:
        r = request(stack, "GET", f"/{link.code}", h)
        assert r.status == 302
    s = stats(links, alice, link.code)
    assert s.code == link.code
    assert s.total_clicks == len(visits)
    # (203.0.113.1, a), (203.0.113.2, a), (203.0.113.1, b), (203.0.113.3, a)
    assert s.unique_visitors == 4
    refs = {r.referrer: r.clicks for r in s.top_referrers}
    assert refs == {"news.example.com": 3, "blog.example.org": 1, "(direct)": 1}
    assert s.top_referrers[0].referrer == "news.example.com"
    assert sum(d.clicks for d in s.daily_clicks) == len(visits)


def test_unknown_code_404_html(stack: StackProcess) -> None:
    for path in ("/NoSuchCode0000", "/bad.code", "/" + "x" * 40):
        r = request(stack, "GET", path)
        assert r.status == 404, path
        assert (r.header("Content-Type") or "").startswith("text/html"), path
        assert b"404" in r.body and b"<html" in r.body


def test_unknown_code_page_escapes_html(stack: StackProcess) -> None:
    r = request(stack, "GET", "/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert r.status == 404
    assert b"<script>" not in r.body


def test_expired_link_410(stack: StackProcess, links: pbg.ShortenerServiceStub, alice: str) -> None:
    exp = ts_in(1.5)
    link = shorten(links, alice, "https://example.com/soon-gone", expire_time=exp)
    wait_past(exp)
    r = request(stack, "GET", f"/{link.code}")
    assert r.status == 410
    assert (r.header("Content-Type") or "").startswith("text/html")
    assert r.header("Location") is None


def test_max_visits_exhausted_410(stack: StackProcess, links: pbg.ShortenerServiceStub,
                                  alice: str) -> None:
    link = shorten(links, alice, "https://example.com/twice", max_visits=2)
    assert request(stack, "GET", f"/{link.code}").status == 302
    assert request(stack, "GET", f"/{link.code}").status == 302
    for _ in range(2):
        r = request(stack, "GET", f"/{link.code}")
        assert r.status == 410
        assert r.header("Location") is None
    assert stats(links, alice, link.code).total_clicks == 2


def test_deleted_link_404(stack: StackProcess, links: pbg.ShortenerServiceStub, alice: str) -> None:
    link = shorten(links, alice, "https://example.com/deleted")
    assert request(stack, "GET", f"/{link.code}").status == 302
    links.DeleteShortUrl(pb.DeleteShortUrlRequest(code=link.code), metadata=grpc_metadata(alice),
                         timeout=30)
    assert request(stack, "GET", f"/{link.code}").status == 404


# --------------------------------------------------------------------------- raw pastes


def test_raw_paste(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str) -> None:
    content = "line one\nzw\u00f6lf \u20ac \U0001f600\n\ttabbed\n"
    p = paste(pastes, alice, content)
    path = urlsplit(p.raw_url).path
    assert path == f"/p/{p.paste_id}"
    r = request(stack, "GET", path)
    assert r.status == 200
    assert (r.header("Content-Type") or "").replace(" ", "").lower() == "text/plain;charset=utf-8"
    assert r.body == content.encode()
    assert r.body.decode("utf-8") == content
    etag = r.header("ETag")
    assert etag and etag.startswith('"') and etag.endswith('"')
    assert r.header("Cache-Control")
    last_modified = r.header("Last-Modified")
    assert last_modified
    lm = parsedate_to_datetime(last_modified).timestamp()
    assert abs(lm - p.create_time.ToMilliseconds() / 1000) < 1.0


def test_raw_paste_if_none_match_304(stack: StackProcess, pastes: pbg.PasteServiceStub,
                                     alice: str) -> None:
    p = paste(pastes, alice, "cache me")
    path = f"/p/{p.paste_id}"
    etag = request(stack, "GET", path).header("ETag")
    assert etag
    r = request(stack, "GET", path, {"If-None-Match": etag})
    assert r.status == 304
    assert r.body == b""
    assert r.header("ETag") == etag
    # Among a list, and '*', also match; another tag does not.
    assert request(stack, "GET", path, {"If-None-Match": f'"nope", {etag}'}).status == 304
    assert request(stack, "GET", path, {"If-None-Match": "*"}).status == 304
    other = request(stack, "GET", path, {"If-None-Match": '"some-other-etag"'})
    assert other.status == 200
    assert other.body == b"cache me"


def test_raw_paste_distinct_contents_distinct_etags(stack: StackProcess, pastes: pbg.PasteServiceStub,
                                                    alice: str) -> None:
    a = paste(pastes, alice, "content A")
    b = paste(pastes, alice, "content B")
    assert request(stack, "GET", f"/p/{a.paste_id}").header("ETag") != \
        request(stack, "GET", f"/p/{b.paste_id}").header("ETag")


def test_raw_paste_one_mib(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str) -> None:
    content = "\u20ac" * ((1024 * 1024 - 1) // 3) + "a"
    p = paste(pastes, alice, content)
    r = request(stack, "GET", f"/p/{p.paste_id}")
    assert r.status == 200
    assert len(r.body) == 1024 * 1024
    assert r.body == content.encode()


def test_raw_paste_head(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str) -> None:
    p = paste(pastes, alice, "h\u00e9ad")
    r = request(stack, "HEAD", f"/p/{p.paste_id}")
    assert r.status == 200
    assert r.body == b""
    assert r.header("Content-Length") == str(len("h\u00e9ad".encode()))
    assert r.header("ETag")


def test_raw_paste_unknown_404(stack: StackProcess) -> None:
    for path in ("/p/NoSuchPaste0", "/p/bad.id", "/p/" + "x" * 40):
        r = request(stack, "GET", path)
        assert r.status == 404, path
        assert (r.header("Content-Type") or "").startswith("text/html")


def test_raw_paste_deleted_404(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str) -> None:
    p = paste(pastes, alice, "to delete")
    assert request(stack, "GET", f"/p/{p.paste_id}").status == 200
    pastes.DeletePaste(pb.DeletePasteRequest(paste_id=p.paste_id), metadata=grpc_metadata(alice),
                       timeout=30)
    assert request(stack, "GET", f"/p/{p.paste_id}").status == 404


def test_raw_paste_expired_410(stack: StackProcess, pastes: pbg.PasteServiceStub, alice: str) -> None:
    exp = ts_in(1.5)
    p = paste(pastes, alice, "short-lived", expire_time=exp)
    wait_past(exp)
    r = request(stack, "GET", f"/p/{p.paste_id}")
    assert r.status == 410
    assert b"short-lived" not in r.body
    # A conditional request for an expired paste is not a 304 either.
    assert request(stack, "GET", f"/p/{p.paste_id}", {"If-None-Match": "*"}).status == 410


# --------------------------------------------------------------------------- health


def test_healthz(stack: StackProcess) -> None:
    r = request(stack, "GET", "/healthz")
    assert r.status == 200
    assert (r.header("Content-Type") or "").startswith("application/json")
    assert json.loads(r.body) == {"status": "ok"}


def test_head_is_not_counted_and_does_not_use_up_visits(stack: StackProcess,
                                                        links: pbg.ShortenerServiceStub,
                                                        alice: str) -> None:
    link = links.CreateShortUrl(pb.CreateShortUrlRequest(long_url="https://example.org/once", max_visits=1),
                                metadata=grpc_metadata(alice)).short_url
    u = urlsplit(stack.http_base)
    for method, expected in (("HEAD", 302), ("HEAD", 302), ("GET", 302), ("GET", 410), ("HEAD", 410)):
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
        try:
            conn.request(method, f"/{link.code}")
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        assert resp.status == expected, (method, resp.status)
        if expected == 302:
            # a limited link must never be cached by the browser
            assert "no-cache" in (resp.getheader("Cache-Control") or "")
    stats = links.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=link.code), metadata=grpc_metadata(alice))
    assert stats.total_clicks == 1
