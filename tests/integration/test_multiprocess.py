"""Two server processes on one Redis and one table store, as replicas behind a load balancer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from tests.integration.helpers import grpc_metadata
from tests.stack import StackProcess

pytestmark = pytest.mark.tables


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StackProcess, StackProcess]]:
    base = tmp_path_factory.mktemp("pair")
    a = StackProcess(base / "data").start()
    url = (base / "data" / "valkey" / "url").read_text().strip()
    b = StackProcess(base / "b", extra_env={"SYSDESIGN_REDIS_URL": url,
                                            "SYSDESIGN_DATA_DIR": str(base / "data")})
    b.start(["serve", "--services", "identity,shortener"])
    yield a, b
    assert b.stop() == 0, b.logs()
    assert a.stop() == 0, a.logs()


def test_delete_on_one_replica_reaches_the_others_cache(pair: tuple[StackProcess, StackProcess]) -> None:
    a, b = pair
    md = grpc_metadata(a.token("replica"))
    sa, sb = pbg.ShortenerServiceStub(a.channel()), pbg.ShortenerServiceStub(b.channel())
    link = sa.CreateShortUrl(pb.CreateShortUrlRequest(long_url="https://example.com/r"), metadata=md).short_url
    for _ in range(3):  # now in b's in-process cache
        assert sb.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code)).long_url == link.long_url
    sa.DeleteShortUrl(pb.DeleteShortUrlRequest(code=link.code), metadata=md)
    deadline = time.monotonic() + 5
    while True:  # the invalidation travels over Redis pub/sub
        try:
            sb.ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline, "replica b still redirects a deleted link"
        time.sleep(0.02)


def test_clicks_on_every_replica_are_counted(pair: tuple[StackProcess, StackProcess], tmp_path: Path) -> None:
    a, b = pair
    md = grpc_metadata(a.token("counter"))
    sa, sb = pbg.ShortenerServiceStub(a.channel()), pbg.ShortenerServiceStub(b.channel())
    link = sa.CreateShortUrl(pb.CreateShortUrlRequest(long_url="https://example.com/c"), metadata=md).short_url
    for i in range(40):
        (sa if i % 2 else sb).ResolveShortUrl(pb.ResolveShortUrlRequest(code=link.code, client_ip=f"10.0.0.{i % 7}"))
    deadline = time.monotonic() + 30
    while True:  # b flushes its buffered clicks every few tens of milliseconds
        s = sa.GetShortUrlStats(pb.GetShortUrlStatsRequest(code=link.code), metadata=md)
        if s.total_clicks == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert s.total_clicks == 40
    assert s.unique_visitors == 7
    assert sum(d.clicks for d in s.daily_clicks) == 40
