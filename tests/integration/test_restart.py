"""Every acknowledged write survives a graceful restart (SIGTERM) and a crash (SIGKILL)."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata
from tests.stack import StackProcess

pytestmark = pytest.mark.tables


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def edge_location(base: str, code: str) -> str:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(f"{base}/{code}", timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code in (301, 302), e.code
        return str(e.headers["Location"])
    raise AssertionError("no redirect")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_everything_survives_a_restart(tmp_path: Path, how: signal.Signals) -> None:
    s = StackProcess(tmp_path / "data").start()
    try:
        # a user registered with a password, links, pastes, clicks
        ident = ipbg.IdentityServiceStub(s.channel())
        ident.RegisterUser(ipb.RegisterUserRequest(username="carol", password="correct horse"))
        token = s.token("dave")
        md = grpc_metadata(token)
        short = pbg.ShortenerServiceStub(s.channel())
        pastes = pbg.PasteServiceStub(s.channel())
        links = {}
        for i in range(30):
            req = pb.CreateShortUrlRequest(long_url=f"https://example.com/{i}",
                                           custom_alias=f"keep{i:03d}" if i % 3 == 0 else "")
            links[short.CreateShortUrl(req, metadata=md).short_url.code] = f"https://example.com/{i}"
        for code in list(links)[:5]:
            short.ResolveShortUrl(pb.ResolveShortUrlRequest(code=code))
        paste_ids = {
            pastes.CreatePaste(pb.CreatePasteRequest(content=f"paste {i} ✓\n" * (i + 1)),
                               metadata=md).paste.paste_id: f"paste {i} ✓\n" * (i + 1)
            for i in range(10)
        }
        deleted = next(iter(links))
        short.DeleteShortUrl(pb.DeleteShortUrlRequest(code=deleted), metadata=md)
        if how == signal.SIGTERM:
            assert s.stop(how) == 0, s.logs()
        else:
            # a crash: the embedded Valkey child is orphaned and the next start must stop it
            orphan = int((tmp_path / "data" / "valkey" / "valkey.pid").read_text())
            s.stop(how)
            assert Path(f"/proc/{orphan}").exists()
        s2 = StackProcess(tmp_path / "data")
        s2.start()
        try:
            if how == signal.SIGKILL:
                assert not Path(f"/proc/{orphan}").exists(), "the orphaned Valkey still runs"
            short2 = pbg.ShortenerServiceStub(s2.channel())
            for code, url in links.items():
                if code == deleted:
                    with pytest.raises(grpc.RpcError) as e:
                        short2.ResolveShortUrl(pb.ResolveShortUrlRequest(code=code))
                    assert e.value.code() == grpc.StatusCode.NOT_FOUND
                    continue
                assert short2.ResolveShortUrl(pb.ResolveShortUrlRequest(code=code)).long_url == url
                assert edge_location(s2.http_base, code) == url
            pastes2 = pbg.PasteServiceStub(s2.channel())
            for pid, text in paste_ids.items():
                assert pastes2.GetPaste(pb.GetPasteRequest(paste_id=pid)).paste.content == text
            # clicks counted before the restart are still there (Redis AOF)
            md2 = grpc_metadata(s2.token("dave"))
            survivor = list(links)[1]
            st = short2.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=survivor), metadata=md2)
            assert st.total_clicks == 3  # one before the restart; one RPC and one edge hit after
            login = ipbg.IdentityServiceStub(s2.channel()).Login(
                ipb.LoginRequest(username="carol", password="correct horse"))
            assert login.access_token
            # new codes never collide with codes handed out before the restart
            fresh = {short2.CreateShortUrl(pb.CreateShortUrlRequest(long_url="https://example.com/n"),
                                           metadata=md2).short_url.code for _ in range(20)}
            assert not fresh & set(links)
        finally:
            assert s2.stop() == 0, s2.logs()
    finally:
        if s.proc and s.proc.poll() is None:
            s.stop(signal.SIGKILL)



def test_flushed_redis_loses_no_link_and_reuses_no_code(tmp_path: Path) -> None:
    """Redis is a cache and a counter: after FLUSHALL every link still resolves and new codes are fresh."""
    import redis

    s = StackProcess(tmp_path / "data").start()
    try:
        md = grpc_metadata(s.token("erin"))
        short = pbg.ShortenerServiceStub(s.channel())
        before = {}
        for i in range(25):
            link = short.CreateShortUrl(pb.CreateShortUrlRequest(long_url=f"https://example.com/f{i}"),
                                        metadata=md).short_url
            before[link.code] = link.long_url
        url = (tmp_path / "data" / "valkey" / "url").read_text().strip()
        redis.Redis.from_url(url).flushall()
        for code, long_url in before.items():
            assert short.ResolveShortUrl(pb.ResolveShortUrlRequest(code=code)).long_url == long_url
        # a second server process reserves its block from the flushed counter too
        s2 = StackProcess(tmp_path / "data2", extra_env={"SYSDESIGN_REDIS_URL": url,
                                                         "SYSDESIGN_DATA_DIR": str(tmp_path / "data")})
        s2.start(["serve", "--services", "shortener"])
        try:
            short2 = pbg.ShortenerServiceStub(s2.channel())
            after = [stub.CreateShortUrl(pb.CreateShortUrlRequest(long_url="https://example.com/new"),
                                         metadata=md).short_url.code
                     for stub in (short, short2) for _ in range(25)]
        finally:
            assert s2.stop() == 0, s2.logs()
        assert len(set(after)) == len(after)
        assert not set(after) & set(before)
        # the new block was reserved above the one handed out before the flush, not over it
        assert int(redis.Redis.from_url(url).get("{ctr:shorturl}") or 0) >= 2000
    finally:
        assert s.stop() == 0, s.logs()
