"""Tiered API limits (servers/platform/limits.py) on a live stack: per user, per tier, per IP, the edge."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from sysdesign.chat.v1 import chat_pb2 as cpb
from sysdesign.chat.v1 import chat_pb2_grpc as cpbg
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.shortener.v1 import shortener_pb2 as pb
from sysdesign.shortener.v1 import shortener_pb2_grpc as pbg

from servers.platform import limits
from tests.integration.helpers import details_of, expect_error, grpc_metadata
from tests.integration.test_chat_support import Device
from tests.stack import ROOT, StackProcess

CREATE = "sysdesign.shortener.v1.ShortenerService/CreateShortUrl"
LIMITS = f"""
failure_mode: allow
tiers:
  anonymous:
    "*": {{requests: 1000, unit: minute}}
    sysdesign.identity.v1.IdentityService/Login: {{requests: 3, unit: minute}}
    edge: {{requests: 5, unit: minute}}
  free:
    "*": {{requests: 1000, unit: minute}}
    {CREATE}: {{requests: 3, unit: hour}}
    sysdesign.chat.v1.ChatService/SendMessage: {{requests: 2, unit: hour}}
  pro:
    "*": {{requests: 1000, unit: minute}}
    {CREATE}: {{requests: 6, unit: hour, algorithm: token_bucket}}
users:
  carol: pro
"""


@pytest.fixture(scope="module")
def lstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    root = tmp_path_factory.mktemp("limits")
    (root / "limits.yaml").write_text(LIMITS)
    s = StackProcess(root / "data", extra_env={"SYSDESIGN_API_LIMITS": "on",
                                               "SYSDESIGN_API_LIMITS_FILE": str(root / "limits.yaml")})
    s.start()
    yield s
    assert s.stop() == 0, s.logs()


def _create(stub: pbg.ShortenerServiceStub, token: str, n: int,
            timeout: float = 10) -> pb.CreateShortUrlResponse:
    return stub.CreateShortUrl(pb.CreateShortUrlRequest(long_url=f"https://example.com/{n}"),
                               metadata=grpc_metadata(token), timeout=timeout)


def _count(stub: pbg.ShortenerServiceStub, token: str) -> int:
    return len(stub.ListShortUrls(pb.ListShortUrlsRequest(page_size=100), metadata=grpc_metadata(token),
                                  timeout=10).short_urls)


def test_a_user_over_a_method_limit_is_refused_with_retry_and_quota_details(lstack: StackProcess) -> None:
    alice, bob = lstack.token("alice"), lstack.token("bob")
    with lstack.channel() as ch:
        stub = pbg.ShortenerServiceStub(ch)
        for i in range(3):
            _create(stub, alice, i)
        err = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, _create, stub, alice, 99)
        [retry] = details_of(err, error_details_pb2.RetryInfo)
        # (a sliding window: a hit leaves the count as the window slides past it, up to two windows)
        assert 0 < retry.retry_delay.seconds <= 7200
        [quota] = details_of(err, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject.startswith("user:")
        assert "3 per hour" in quota.violations[0].description and "CreateShortUrl" in \
            quota.violations[0].description
        trailers = dict(err.trailing_metadata() or ())
        assert int(trailers["retry-after"]) >= 1
        assert trailers["ratelimit-policy"] == '"CreateShortUrl";q=3;w=3600'
        # Nothing was stored for the refused call; other methods still answer.
        assert _count(stub, alice) == 3
        # Another user of the same tier has a budget of their own.
        _create(stub, bob, 1)


def test_a_pro_user_gets_the_pro_tier(lstack: StackProcess) -> None:
    carol = lstack.token("carol")
    with lstack.channel() as ch:
        stub = pbg.ShortenerServiceStub(ch)
        for i in range(6):
            _create(stub, carol, i)
        err = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, _create, stub, carol, 99)
        [quota] = details_of(err, error_details_pb2.QuotaFailure)
        assert "6 per hour" in quota.violations[0].description
        assert _count(stub, carol) == 6


def test_anonymous_calls_are_limited_per_address(lstack: StackProcess) -> None:
    with lstack.channel() as ch:
        ids = ipbg.IdentityServiceStub(ch)
        bad = ipb.LoginRequest(username="nobody_here", password="wrong-password")
        for _ in range(3):
            expect_error(grpc.StatusCode.UNAUTHENTICATED, ids.Login, bad, timeout=10)
        err = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ids.Login, bad, timeout=10)
        [quota] = details_of(err, error_details_pb2.QuotaFailure)
        assert quota.violations[0].subject == "ip:127.0.0.1"


def _get(url: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_the_edge_answers_429_with_the_ratelimit_headers(lstack: StackProcess) -> None:
    seen = [_get(lstack.http_base + "/") for _ in range(5)]
    assert [s for s, _ in seen] == [200] * 5
    assert seen[0][1]["RateLimit-Policy"] == '"edge";q=5;w=60'
    assert [int(h["RateLimit"].rsplit("r=", 1)[1].split(";")[0]) for _, h in seen] == [4, 3, 2, 1, 0]
    status, headers = _get(lstack.http_base + "/")
    assert status == 429
    # (a sliding window: the hits leave the count as the window slides past them, up to two windows)
    assert 1 <= int(headers["Retry-After"]) <= 120
    # Health checks are never limited.
    assert _get(lstack.http_base + "/healthz")[0] == 200


def test_counts_survive_a_restart(lstack: StackProcess) -> None:
    dave = lstack.token("dave")
    with lstack.channel() as ch:
        stub = pbg.ShortenerServiceStub(ch)
        for i in range(3):
            _create(stub, dave, i)
    assert lstack.stop(signal.SIGKILL) != 0
    lstack.start()
    with lstack.channel() as ch:
        expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, _create, pbg.ShortenerServiceStub(ch), dave, 9)


def test_a_bad_limits_file_stops_the_start_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "limits.yaml").write_text("tiers:\n  free:\n    '*': {requests: -1, unit: minute}\n")
    s = StackProcess(tmp_path / "data", extra_env={"SYSDESIGN_API_LIMITS": "on",
                                                   "SYSDESIGN_API_LIMITS_FILE": str(tmp_path / "limits.yaml")})
    env = s.env()
    out = subprocess.run([sys.executable, "-m", "clients.cli", "up"], env=env, capture_output=True,
                         cwd=str(ROOT), timeout=120)
    assert out.returncode != 0
    assert "tiers.free.*.requests" in out.stdout.decode() + out.stderr.decode()


def test_the_default_limits_parse_and_exempt_envoys_calls() -> None:
    found = limits.parse(limits.DEFAULT_LIMITS)
    assert found.exempt_method("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
    assert not found.exempt_method("/sysdesign.shortener.v1.ShortenerService/CreateShortUrl")
    assert [r.scope for r in found.rules_for("free", CREATE)] == ["*", CREATE]
    assert [r.scope for r in found.rules_for("anonymous", "edge")] == ["edge"]
    assert found.tier_of(None) == "anonymous" and found.tier_of("someone") == "free"


def test_the_documented_defaults_are_the_defaults() -> None:
    units = {"min": "minute", "hour": "hour", "s": "second", "day": "day"}
    tiers = ["anonymous", "free", "pro"]
    rows = [line for line in (ROOT / "docs" / "ratelimit.md").read_text().splitlines()
            if line.startswith("| ") and ("/min" in line or "/hour" in line)]
    documented: dict[tuple[str, str], tuple[int, str]] = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        scope = "*" if '"*"' in cells[0] else "edge" if "`edge`" in cells[0] else \
            cells[0].split("`")[1]
        for tier, cell in zip(tiers, cells[1:], strict=True):
            if cell:
                n, unit = cell.split("/")
                documented[(tier, scope)] = (int(n.replace(",", "")), units[unit])
    actual = {}
    for tier in tiers:
        for scope, rule in limits.DEFAULT_LIMITS["tiers"][tier].items():
            short = scope if scope in ("*", "edge") else scope.split(".")[-1]
            actual[(tier, short)] = (rule["requests"], rule["unit"])
    assert documented == actual


def test_messages_on_the_chat_stream_spend_the_send_budget(lstack: StackProcess) -> None:
    erin, frank = lstack.token("erin"), lstack.token("frank")
    with lstack.channel() as ch:
        conv = cpbg.ChatServiceStub(ch).CreateConversation(cpb.CreateConversationRequest(
            type=cpb.CONVERSATION_TYPE_DIRECT, member_usernames=["frank"]),
            metadata=grpc_metadata(erin), timeout=30).conversation.conversation_id
    assert frank

    async def go() -> list[cpb.ServerEvent]:
        dev = await Device(lstack.grpc_addr, erin, "erin-phone").connect()
        try:
            await dev.wait_for(dev.synced.is_set, what="synced")
            answers = [await dev.send(conv, f"hi {i}") for i in range(3)]
            # The stream is still open after the refusal.
            dev.put(cpb.ClientEvent(heartbeat=cpb.HeartbeatEvent()))
            await dev.wait_for(lambda: bool(dev.of_kind("heartbeat_ack")), what="heartbeat ack")
            return answers
        finally:
            await dev.close()

    answers = asyncio.run(go())
    assert [a.WhichOneof("event") for a in answers] == ["send_ack", "send_ack", "error"]
    refused = answers[2].error
    assert refused.code == 8 and refused.reason == "RATE_LIMITED" and "2 per hour" in refused.message
