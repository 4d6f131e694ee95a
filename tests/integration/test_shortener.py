"""ShortenerService against the real stack: creates, resolves, analytics, ownership, races."""

from __future__ import annotations

import itertools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from servers.platform.ids import is_base62
from tests.integration.helpers import error_reason, grpc_metadata, violations
from tests.stack import StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]


@pytest.fixture(scope="module")
def stub(stack: StackProcess) -> pbg.ShortenerServiceStub:
    return pbg.ShortenerServiceStub(stack.channel())


def _alias() -> str:
    return "t" + uuid.uuid4().hex[:12]


def _in(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(int((time.time() + seconds) * 1000))
    return ts


def create(stub: pbg.ShortenerServiceStub, token: str, **kw: object) -> pb.ShortUrl:
    kw.setdefault("long_url", "https://example.com/a")
    return stub.CreateShortUrl(pb.CreateShortUrlRequest(**kw), metadata=grpc_metadata(token)).short_url  # type: ignore[arg-type]


def all_codes(stub: pbg.ShortenerServiceStub, token: str) -> list[str]:
    codes, page = [], ""
    while True:
        r = stub.ListShortUrls(pb.ListShortUrlsRequest(page_size=100, page_token=page),
                               metadata=grpc_metadata(token))
        codes += [u.code for u in r.short_urls]
        if not r.next_page_token:
            return codes
        page = r.next_page_token


def test_create_and_resolve(stub: pbg.ShortenerServiceStub, alice: str, stack: StackProcess) -> None:
    link = create(stub, alice, long_url="https://example.com/path?q=1#frag")
    assert len(link.code) == 7 and is_base62(link.code)
    assert link.short_url == f"{stack.http_base}/{link.code}"
    assert link.redirect_type == pb.REDIRECT_TYPE_FOUND
    r = stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))
    assert r.long_url == "https://example.com/path?q=1#frag"
    assert r.visit_count == 1
    assert stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code)).visit_count == 2


def test_generated_codes_are_unique_and_not_sequential(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    codes = [create(stub, alice, long_url=f"https://example.com/{i}").code for i in range(40)]
    assert len(set(codes)) == 40
    # Consecutive counter values must not give neighbouring codes.
    from servers.platform.ids import b62decode

    nums = [b62decode(c) for c in codes]
    gaps = [abs(b - a) for a, b in itertools.pairwise(nums)]
    assert min(gaps) > 1000


BAD_CREATES = [
    ({"long_url": ""}, "long_url"),
    ({"long_url": "ftp://example.com/file"}, "long_url"),
    ({"long_url": "javascript:alert(1)"}, "long_url"),
    ({"long_url": "data:text/html,<b>x</b>"}, "long_url"),
    ({"long_url": "https://"}, "long_url"),
    ({"long_url": "https://example.com/" + "a" * 2030}, "long_url"),
    ({"long_url": "https://exa mple.com/"}, "long_url"),
    ({"custom_alias": "abc"}, "custom_alias"),
    ({"custom_alias": "a" * 33}, "custom_alias"),
    ({"custom_alias": "bad-alias"}, "custom_alias"),
    ({"custom_alias": "admin"}, "custom_alias"),
    ({"max_visits": -1}, "max_visits"),
    ({"redirect_type": 7}, "redirect_type"),
    ({"expire_time": Timestamp(seconds=int(time.time()) - 60)}, "expire_time"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_CREATES)
def test_bad_create_is_refused_and_stores_nothing(
    stub: pbg.ShortenerServiceStub, stack: StackProcess, fields: dict, field: str
) -> None:
    token = stack.token("u" + uuid.uuid4().hex[:10])
    req = {"long_url": "https://example.com/ok", **fields}
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateShortUrl(pb.CreateShortUrlRequest(**req), metadata=grpc_metadata(token))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(e.value)
    assert all_codes(stub, token) == []
    if fields.get("custom_alias"):
        with pytest.raises(grpc.RpcError) as e2:
            stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=fields["custom_alias"]))
        assert e2.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def test_url_pointing_at_the_edge_is_refused(stub: pbg.ShortenerServiceStub, alice: str,
                                             stack: StackProcess) -> None:
    with pytest.raises(grpc.RpcError) as e:
        create(stub, alice, long_url=f"{stack.http_base}/abc")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "long_url" in violations(e.value)


def test_create_needs_a_token(stub: pbg.ShortenerServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateShortUrl(pb.CreateShortUrlRequest(long_url="https://example.com"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_custom_alias_and_clash(stub: pbg.ShortenerServiceStub, alice: str, bob: str) -> None:
    alias = _alias()
    link = create(stub, alice, custom_alias=alias, long_url="https://example.com/alice")
    assert link.code == alias and link.custom_alias
    with pytest.raises(grpc.RpcError) as e:
        create(stub, bob, custom_alias=alias, long_url="https://example.com/bob")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(e.value) == "ALIAS_TAKEN"
    assert stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=alias)).long_url == "https://example.com/alice"


def test_alias_race_exactly_one_wins(stub: pbg.ShortenerServiceStub, stack: StackProcess) -> None:
    alias = _alias()
    tokens = [stack.token(f"racer{i}") for i in range(12)]

    def attempt(i: int) -> str:
        try:
            create(stub, tokens[i], custom_alias=alias, long_url=f"https://example.com/racer{i}")
            return f"https://example.com/racer{i}"
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e
            return ""

    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(attempt, range(12)))
    winners = [r for r in results if r]
    assert len(winners) == 1
    assert stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=alias)).long_url == winners[0]
    owners = [i for i, t in enumerate(tokens) if alias in all_codes(stub, t)]
    assert len(owners) == 1 and results[owners[0]] == winners[0]


def test_unknown_code_is_not_found_and_negative_cached(stub: pbg.ShortenerServiceStub) -> None:
    for _ in range(2):  # the second answer comes from the negative cache
        with pytest.raises(grpc.RpcError) as e:
            stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code="Zz" + uuid.uuid4().hex[:8]))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_malformed_code_is_invalid(stub: pbg.ShortenerServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code="../etc"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "code" in violations(e.value)


def test_alias_created_after_a_negative_cache_entry_resolves(stub: pbg.ShortenerServiceStub,
                                                             alice: str) -> None:
    alias = _alias()
    with pytest.raises(grpc.RpcError):
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=alias))
    create(stub, alice, custom_alias=alias, long_url="https://example.com/late")
    assert stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=alias)).long_url == "https://example.com/late"


def test_expiry(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice, expire_time=_in(1.5))
    assert stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code)).visit_count == 1
    time.sleep(max(0.0, link.expire_time.ToMilliseconds() / 1000 - time.time()) + 0.2)
    with pytest.raises(grpc.RpcError) as e:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(e.value) == "SHORT_URL_EXPIRED"


def test_max_visits(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice, max_visits=3)
    counts = [stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code)).visit_count for _ in range(3)]
    assert counts == [1, 2, 3]
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as e:
            stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(e.value) == "SHORT_URL_VISITS_EXHAUSTED"
    stats = stub.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=link.code), metadata=grpc_metadata(alice))
    assert stats.total_clicks == 3


def test_max_visits_under_concurrency_never_overshoots(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice, max_visits=25)

    def hit(_: int) -> int:
        try:
            return stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code)).visit_count
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
            return 0

    with ThreadPoolExecutor(16) as ex:
        counts = [c for c in ex.map(hit, range(60)) if c]
    assert sorted(counts) == list(range(1, 26))


def test_stats(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice)
    visits = [("https://news.ycombinator.com/item?id=1", "1.1.1.1"),
              ("https://news.ycombinator.com/x", "2.2.2.2"),
              ("https://t.co/abc", "1.1.1.1"),
              ("", "3.3.3.3")]
    for ref, ip in visits:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code, referrer=ref, client_ip=ip,
                                                       user_agent="test"))
    s = stub.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=link.code), metadata=grpc_metadata(alice))
    assert s.total_clicks == 4
    assert s.unique_visitors == 3
    refs = {r.referrer: r.clicks for r in s.top_referrers}
    assert refs == {"news.ycombinator.com": 2, "t.co": 1, "(direct)": 1}
    assert s.top_referrers[0].referrer == "news.ycombinator.com"
    assert len(s.daily_clicks) == 1 and s.daily_clicks[0].clicks == 4
    assert s.daily_clicks[0].day == time.strftime("%Y-%m-%d", time.gmtime())


def test_stats_bad_arguments(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=link.code, days=400, top_referrers=-1),
                              metadata=grpc_metadata(alice))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"days", "top_referrers"} <= set(violations(e.value))


def test_other_users_links_are_out_of_reach(stub: pbg.ShortenerServiceStub, alice: str, bob: str) -> None:
    link = create(stub, alice)
    for call, req in ((stub.GetShortUrlStats, pb.GetShortUrlStatsRequest(code=link.code)),
                      (stub.GetShortUrl, pb.GetShortUrlRequest(code=link.code)),
                      (stub.DeleteShortUrl, pb.DeleteShortUrlRequest(code=link.code))):
        with pytest.raises(grpc.RpcError) as e:
            call(req, metadata=grpc_metadata(bob))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert link.code not in all_codes(stub, bob)
    assert stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code)).long_url == link.long_url


def test_delete_invalidates_the_cache_at_once(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice)
    stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))  # cached now
    stub.DeleteShortUrl(pb.DeleteShortUrlRequest(code=link.code), metadata=grpc_metadata(alice))
    with pytest.raises(grpc.RpcError) as e:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert link.code not in all_codes(stub, alice)
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteShortUrl(pb.DeleteShortUrlRequest(code=link.code), metadata=grpc_metadata(alice))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_pages_newest_first(stub: pbg.ShortenerServiceStub, stack: StackProcess) -> None:
    token = stack.token("lister" + uuid.uuid4().hex[:6])
    made = [create(stub, token, long_url=f"https://example.com/{i}").code for i in range(7)]
    pages, page = [], ""
    while True:
        r = stub.ListShortUrls(pb.ListShortUrlsRequest(page_size=3, page_token=page),
                               metadata=grpc_metadata(token))
        pages.append([u.code for u in r.short_urls])
        if not r.next_page_token:
            break
        page = r.next_page_token
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [c for p in pages for c in p] == list(reversed(made))


@pytest.mark.parametrize(("req", "field"), [
    (pb.ListShortUrlsRequest(page_token="not-a-token"), "page_token"),
    (pb.ListShortUrlsRequest(page_size=5000), "page_size"),
    (pb.ListShortUrlsRequest(page_size=-2), "page_size"),
])
def test_list_bad_arguments(stub: pbg.ShortenerServiceStub, alice: str, req: pb.ListShortUrlsRequest,
                            field: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.ListShortUrls(req, metadata=grpc_metadata(alice))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(e.value)


def test_short_url_get_by_owner(stub: pbg.ShortenerServiceStub, alice: str) -> None:
    link = create(stub, alice, max_visits=9, redirect_type=pb.REDIRECT_TYPE_PERMANENT)
    got = stub.GetShortUrl(pb.GetShortUrlRequest(code=link.code), metadata=grpc_metadata(alice)).short_url
    assert got == link
    assert got.max_visits == 9 and got.redirect_type == pb.REDIRECT_TYPE_PERMANENT


def test_buffered_clicks_survive_a_script_flush(stub: pbg.ShortenerServiceStub, alice: str,
                                                stack: StackProcess) -> None:
    """Clicks of cached links are written by a Lua script; a Redis that lost its scripts reloads it."""
    from servers.storage.redis_conn import primaries

    link = create(stub, alice)
    stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))  # miss: counted in Redis, now cached
    for node in primaries(stack.redis_url):  # every master of a cluster
        node.script_flush()
        node.close()
    for _ in range(9):  # cached hits: buffered, flushed in batches
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code, referrer="https://t.co/x"))
    s = stub.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=link.code), metadata=grpc_metadata(alice))
    assert s.total_clicks == 10
    assert {x.referrer: x.clicks for x in s.top_referrers} == {"t.co": 9, "(direct)": 1}


def test_deleted_alias_stays_retired(stub: pbg.ShortenerServiceStub, alice: str, bob: str) -> None:
    """A deleted alias cannot be taken over: old copies of the link must not lead elsewhere."""
    alias = _alias()
    create(stub, alice, custom_alias=alias, long_url="https://example.com/original")
    stub.DeleteShortUrl(pb.DeleteShortUrlRequest(code=alias), metadata=grpc_metadata(alice))
    for who in (bob, alice):
        with pytest.raises(grpc.RpcError) as e:
            create(stub, who, custom_alias=alias, long_url="https://attacker.example/phish")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert error_reason(e.value) == "ALIAS_RETIRED"
        assert "retired" in (e.value.details() or "")
    with pytest.raises(grpc.RpcError) as e:
        stub.ResolveShortUrl(pb.ResolveShortUrlRequest(code=alias))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.GetShortUrl(pb.GetShortUrlRequest(code=alias), metadata=grpc_metadata(alice))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert alias not in all_codes(stub, bob)


@pytest.mark.parametrize("alias", ["media", "chat", "Media", "healthz"])
def test_edge_route_prefixes_are_reserved(stub: pbg.ShortenerServiceStub, alice: str,
                                          alias: str) -> None:
    """The edge's own routes (read from its route table) can never be custom aliases."""
    with pytest.raises(grpc.RpcError) as e:
        create(stub, alice, custom_alias=alias)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved" in violations(e.value)["custom_alias"]
    assert alias not in all_codes(stub, alice)
