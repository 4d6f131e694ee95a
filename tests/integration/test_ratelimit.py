"""Envoy's RateLimitService against real `sysdesign serve --services ratelimit` processes.

Each test module's servers read a config dir of their own (written here), on
the session's Valkey; requests are built with the envoy.service.ratelimit.v3
stubs, byte-for-byte Envoy's contract. Fixed windows are per year, so that none
rolls over during a test (no timing assertions).
"""

from __future__ import annotations

import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis as redis_lib
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as dpb
from envoy.service.ratelimit.v3 import rls_pb2 as pb
from envoy.service.ratelimit.v3 import rls_pb2_grpc as pbg
from google.protobuf.wrappers_pb2 import UInt64Value
from grpc_health.v1 import health_pb2, health_pb2_grpc

from servers.storage.redis_conn import EmbeddedValkey
from tests.integration.helpers import expect_error, violations
from tests.stack import StackProcess, free_port

pytestmark = [pytest.mark.redis_cluster]

OK, OVER = pb.RateLimitResponse.OK, pb.RateLimitResponse.OVER_LIMIT

BASE = textwrap.dedent("""\
    domain: test
    descriptors:
      - key: user
        rate_limit: {unit: year, requests_per_unit: 3}
      - key: sliding
        rate_limit: {unit: hour, requests_per_unit: 3, algorithm: sliding_window}
      - key: bucket
        rate_limit: {unit: hour, requests_per_unit: 3, algorithm: token_bucket, burst: 2}
      - key: remote_address
        value: 50.0.0.5
        rate_limit: {unit: second, requests_per_unit: 0}
      - key: shadow
        shadow_mode: true
        rate_limit: {unit: year, requests_per_unit: 1}
      - key: internal
        rate_limit: {unlimited: true}
      - key: path
        value: /api/*/action
        rate_limit: {unit: year, requests_per_unit: 2}
      - key: files
        value: files/*
        share_threshold: true
        rate_limit: {unit: year, requests_per_unit: 2}
      - key: key_1
        value: value_1
        descriptors:
          - key: user
            rate_limit: {name: specific_limit, unit: year, requests_per_unit: 1}
      - key: key_2
        value: value_2
        descriptors:
          - key: user
            rate_limit:
              replaces: [{name: specific_limit}]
              unit: year
              requests_per_unit: 2
    """)


def uid() -> str:
    return uuid.uuid4().hex[:12]


def desc(*entries: tuple[str, str], hits: int | None = None,
         limit: tuple[int, int] | None = None) -> dpb.RateLimitDescriptor:
    d = dpb.RateLimitDescriptor(entries=[dpb.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries])
    if hits is not None:
        d.hits_addend.CopyFrom(UInt64Value(value=hits))
    if limit is not None:
        d.limit.requests_per_unit, d.limit.unit = limit  # type: ignore[assignment]
    return d


def call(stub: pbg.RateLimitServiceStub, *descriptors: dpb.RateLimitDescriptor, domain: str = "test",
         hits_addend: int = 0) -> pb.RateLimitResponse:
    return stub.ShouldRateLimit(pb.RateLimitRequest(domain=domain, descriptors=list(descriptors),
                                                    hits_addend=hits_addend), timeout=30)


def codes(stub: pbg.RateLimitServiceStub, n: int, *descriptors: dpb.RateLimitDescriptor) -> list[int]:
    return [call(stub, *descriptors).overall_code for _ in range(n)]


def ratelimit_server(data_dir: Path, config_dir: Path, **env: str) -> StackProcess:
    extra = {"SYSDESIGN_RATELIMIT_CONFIG_DIR": str(config_dir),
             "SYSDESIGN_RATELIMIT_CONFIG_POLL_SECONDS": "0.2", **env}
    return StackProcess(data_dir, extra_env=extra)


def metrics(s: StackProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def metric(s: StackProcess, series: str) -> float:
    """One sample, named as in the exposition: ``name`` or ``name{label="v"}``."""
    for line in metrics(s).splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, valkey_url: str) -> Iterator[StackProcess]:
    root = tmp_path_factory.mktemp("ratelimit")
    cfg = root / "config"
    cfg.mkdir()
    (cfg / "test.yaml").write_text(BASE)
    s = ratelimit_server(root / "data", cfg, SYSDESIGN_REDIS_URL=valkey_url,
                         SYSDESIGN_RATELIMIT_KEY_PREFIX=f"t{uid()}:")
    s.start(["serve", "--services", "ratelimit"])
    yield s
    assert s.stop() == 0, s.logs()


@pytest.fixture(scope="module")
def stub(server: StackProcess) -> pbg.RateLimitServiceStub:
    return pbg.RateLimitServiceStub(server.channel())


# -- the contract --------------------------------------------------------------------


def test_health_and_reflection_name_envoys_service(server: StackProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with server.channel() as ch:
        st = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService"), timeout=10)
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert "envoy.service.ratelimit.v3.RateLimitService" in names


def test_fixed_window_limit_with_statuses_and_headers(stub: pbg.RateLimitServiceStub) -> None:
    d = desc(("user", uid()))
    rs = [call(stub, d) for _ in range(4)]
    assert [r.overall_code for r in rs] == [OK, OK, OK, OVER]
    assert [r.statuses[0].limit_remaining for r in rs] == [2, 1, 0, 0]
    st = rs[0].statuses[0]
    assert (st.current_limit.requests_per_unit, st.current_limit.unit) == (3, pb.RateLimitResponse.RateLimit.YEAR)
    assert 0 < st.duration_until_reset.seconds <= 365 * 86400
    headers = {h.key: h.value for h in rs[0].response_headers_to_add}
    assert headers["RateLimit-Policy"] == '"user";q=3;w=31536000'
    assert headers["RateLimit"].startswith('"user";r=2;t=')
    over = {h.key: h.value for h in rs[3].response_headers_to_add}
    assert over["RateLimit"].startswith('"user";r=0;t=')


def test_sliding_window_and_token_bucket_from_the_config(stub: pbg.RateLimitServiceStub) -> None:
    assert codes(stub, 4, desc(("sliding", uid()))) == [OK, OK, OK, OVER]
    assert codes(stub, 3, desc(("bucket", uid()))) == [OK, OK, OVER]  # burst 2
    r = call(stub, desc(("bucket", uid())))
    assert '"bucket";q=3;w=3600;burst=2' in {h.value for h in r.response_headers_to_add}


def test_several_descriptors_are_all_limited_and_answered_in_order(stub: pbg.RateLimitServiceStub) -> None:
    a, b = desc(("user", uid())), desc(("sliding", uid()))
    for _ in range(3):
        assert call(stub, a).overall_code == OK
    r = call(stub, b, a, desc(("nothing", "configured")))
    assert r.overall_code == OVER
    assert [s.code for s in r.statuses] == [OK, OVER, OK]
    assert not r.statuses[2].HasField("current_limit")
    # the headers speak of the refusing one
    headers = {h.key: h.value for h in r.response_headers_to_add}
    assert headers["RateLimit"].startswith('"user";r=0;')
    assert headers["RateLimit-Policy"] == '"sliding";q=3;w=3600, "user";q=3;w=31536000'


def test_blocked_address_unlimited_shadow_and_unknown(stub: pbg.RateLimitServiceStub) -> None:
    assert call(stub, desc(("remote_address", "50.0.0.5"))).overall_code == OVER  # 0 per second
    assert call(stub, desc(("remote_address", "50.0.0.6"))).overall_code == OK  # no such limit
    r = call(stub, desc(("internal", "x")))
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 2**32 - 1
    d = desc(("shadow", uid()))
    rs = [call(stub, d) for _ in range(3)]
    assert [r.overall_code for r in rs] == [OK, OK, OK]
    assert [r.statuses[0].limit_remaining for r in rs] == [0, 0, 0]
    # an unknown domain is not an error: every descriptor is OK, without a limit
    r = call(stub, desc(("user", "x")), domain="no-such-domain")
    assert r.overall_code == OK and not r.statuses[0].HasField("current_limit")


def test_wildcards_share_threshold_and_replaces(stub: pbg.RateLimitServiceStub) -> None:
    p = uid()
    assert codes(stub, 3, desc(("path", f"/api/{p}/action"))) == [OK, OK, OVER]
    assert call(stub, desc(("path", f"/api/{p}/other"))).overall_code == OK  # not matched
    # every value of files/* shares one counter (share_threshold)
    assert [call(stub, desc(("files", f"files/{uid()}"))).overall_code for _ in range(3)] == [OK, OK, OVER]
    u = uid()
    assert codes(stub, 2, desc(("key_1", "value_1"), ("user", u))) == [OK, OVER]
    # with both, the replaced 1/hour limit is dropped: the 2/hour one decides
    r = call(stub, desc(("key_1", "value_1"), ("user", u)), desc(("key_2", "value_2"), ("user", u)))
    assert r.overall_code == OK
    assert [s.code for s in r.statuses] == [OK, OK] and not r.statuses[0].HasField("current_limit")


def test_hits_addend_request_wide_per_descriptor_and_zero(stub: pbg.RateLimitServiceStub) -> None:
    u = uid()
    r = call(stub, desc(("user", u)), hits_addend=2)
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 1
    r = call(stub, desc(("user", u), hits=0), hits_addend=5)  # a check that counts nothing
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 1
    assert call(stub, desc(("user", u), hits=2)).overall_code == OVER
    # an addend as large as the uint32 field holds (what a negative int32 becomes on the wire)
    r = call(stub, desc(("user", uid())), hits_addend=2**32 - 1)
    assert r.overall_code == OVER


def test_a_per_request_limit_override_wins(stub: pbg.RateLimitServiceStub) -> None:
    d = desc(("user", uid()), limit=(1, pb.RateLimitResponse.RateLimit.DAY))
    rs = [call(stub, d) for _ in range(2)]
    assert [r.overall_code for r in rs] == [OK, OVER]
    assert rs[0].statuses[0].current_limit.requests_per_unit == 1
    # WEEK (7), which envoy.type.v3.RateLimitUnit gained after DAY..YEAR, as Envoy's service takes it
    r = call(stub, desc(("user", uid()), limit=(2, pb.RateLimitResponse.RateLimit.WEEK)))
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 1
    assert r.statuses[0].current_limit.unit == pb.RateLimitResponse.RateLimit.WEEK
    assert 0 < r.statuses[0].duration_until_reset.seconds <= 7 * 86400
    # as Envoy's service: an unknown domain has no limits, overrides included
    r = call(stub, d, domain="no-such-domain")
    assert r.overall_code == OK and not r.statuses[0].HasField("current_limit")


# -- bad input ------------------------------------------------------------------------


BAD = [
    (pb.RateLimitRequest(domain="", descriptors=[desc(("user", "a"))]), "domain"),
    (pb.RateLimitRequest(domain="test"), "descriptors"),
    (pb.RateLimitRequest(domain="test", descriptors=[dpb.RateLimitDescriptor()]), "descriptors[0].entries"),
    (pb.RateLimitRequest(domain="test", descriptors=[desc(("user", "a")), desc(("", "b"))]),
     "descriptors[1].entries[0].key"),
    (pb.RateLimitRequest(domain="test", descriptors=[desc(("user", "v" * 20_000))]),
     "descriptors[0].entries[0].value"),
    (pb.RateLimitRequest(domain="test", descriptors=[desc(("user", "a"), hits=2**40)]),
     "descriptors[0].hits_addend"),
    (pb.RateLimitRequest(domain="test", descriptors=[desc(("user", "a"), limit=(5, 0))]),
     "descriptors[0].limit.unit"),
    (pb.RateLimitRequest(domain="test", descriptors=[desc(("user", "a"))] * 200), "descriptors"),
]


@pytest.mark.parametrize(("request_", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_requests_are_invalid_argument_with_the_field(stub: pbg.RateLimitServiceStub,
                                                         request_: pb.RateLimitRequest, field: str) -> None:
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ShouldRateLimit, request_)
    assert field in violations(err), violations(err)


def test_a_bad_request_counts_nothing(stub: pbg.RateLimitServiceStub) -> None:
    u = uid()
    bad = pb.RateLimitRequest(domain="test", descriptors=[desc(("user", u)), desc(("", "x"))])
    for _ in range(5):
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, stub.ShouldRateLimit, bad)
    assert call(stub, desc(("user", u))).statuses[0].limit_remaining == 2


def test_huge_but_allowed_values_are_limited_like_any_other(stub: pbg.RateLimitServiceStub) -> None:
    v = "x" * 16_000 + uid()
    assert codes(stub, 4, desc(("user", v))) == [OK, OK, OK, OVER]
    assert call(stub, desc(("user", v[:-1] + "!"))).overall_code == OK


def test_metrics_are_named_like_envoyproxy_ratelimits(server: StackProcess,
                                                      stub: pbg.RateLimitServiceStub) -> None:
    d = desc(("user", uid()))
    for _ in range(5):
        call(stub, d)
    text = metrics(server)
    for stat in ("total_hits", "over_limit", "near_limit", "within_limit"):
        assert f'ratelimit_service_rate_limit_{stat}_total{{domain="test",key="user"}}' in text, stat
    # test_blocked_address_unlimited_shadow_and_unknown: 3 hits on a limit of 1, 2 let through
    assert metric(server, 'ratelimit_service_rate_limit_shadow_mode_total{domain="test",key="shadow"}') == 2
    assert 'ratelimit_service_rate_limit_over_limit_with_local_cache_total{domain="test",key="user"}' in text
    assert 'ratelimit_service_rate_limit_domain_not_found_total{domain="no-such-domain"}' in text
    assert "ratelimit_service_config_load_success_total" in text


# -- configuration reload ------------------------------------------------------------------


def wait_for(pred: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_reload_on_change_and_a_bad_file_keeps_the_last_good(tmp_path: Path, valkey_url: str) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "a.yaml").write_text("domain: reload\ndescriptors:\n  - key: k\n"
                                "    rate_limit: {unit: year, requests_per_unit: 1}\n")
    s = ratelimit_server(tmp_path / "data", cfg, SYSDESIGN_REDIS_URL=valkey_url,
                         SYSDESIGN_RATELIMIT_KEY_PREFIX=f"t{uid()}:")
    s.start(["serve", "--services", "ratelimit"])
    try:
        stub = pbg.RateLimitServiceStub(s.channel())
        k = desc(("k", uid()))
        assert [call(stub, k, domain="reload").overall_code for _ in range(2)] == [OK, OVER]
        # a new limit takes effect without a restart
        (cfg / "a.yaml").write_text("domain: reload\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: hour, requests_per_unit: 3}\n")
        wait_for(lambda: call(stub, desc(("k", uid())), domain="reload").statuses[0].current_limit
                 .requests_per_unit == 3, "the new limit")
        # a bad file (unknown key on line 4) is refused: file, line and reason in the log
        (cfg / "b.yaml").write_text("domain: other\ndescriptors:\n  - key: k\n    rate_limt: {}\n")
        wait_for(lambda: metric(s, "ratelimit_service_config_load_error_total") >= 1, "the refusal")
        assert f"{cfg / 'b.yaml'}" in s.logs() and '"line": 4' in s.logs()
        assert "unknown key 'rate_limt'" in s.logs()
        r = call(stub, desc(("k", uid())), domain="reload")
        assert r.statuses[0].current_limit.requests_per_unit == 3  # the last good one stays
        # a file that is not YAML at all, the same
        (cfg / "b.yaml").write_text("domain: [unclosed\n")
        wait_for(lambda: metric(s, "ratelimit_service_config_load_error_total") >= 2, "the second refusal")
        assert call(stub, desc(("k", uid())), domain="reload").statuses[0].current_limit.requests_per_unit == 3
        # fixed, it loads
        (cfg / "b.yaml").write_text("domain: other\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: hour, requests_per_unit: 7}\n")
        wait_for(lambda: call(stub, desc(("k", "x")), domain="other").statuses[0].current_limit
                 .requests_per_unit == 7, "the fixed file")
    finally:
        assert s.stop() == 0, s.logs()


# -- Redis down ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["allow", "deny", "error"])
def test_redis_down_answers_the_failure_mode_quickly_and_recovers(tmp_path: Path, mode: str) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "t.yaml").write_text(BASE)
    # A Valkey of the test's own on a fixed port, so that it comes back where it was
    # (a single server also under --redis=cluster: the failure mode is the same).
    redis = EmbeddedValkey(tmp_path / "valkey", port=free_port())
    url = redis.start()
    s = ratelimit_server(tmp_path / "data", cfg, SYSDESIGN_REDIS_URL=url,
                         SYSDESIGN_RATELIMIT_FAILURE_MODE=mode)
    s.start(["serve", "--services", "ratelimit"])
    try:
        stub = pbg.RateLimitServiceStub(s.channel())
        d = desc(("user", uid()))
        assert call(stub, d).overall_code == OK
        redis.stop()
        for _ in range(3):
            if mode == "error":
                expect_error(grpc.StatusCode.UNAVAILABLE, stub.ShouldRateLimit,
                             pb.RateLimitRequest(domain="test", descriptors=[d]))
            else:
                r = call(stub, d)
                assert r.overall_code == (OK if mode == "allow" else OVER)
        # descriptors without a limit never need Redis
        assert call(stub, desc(("nothing", "x"))).overall_code == OK
        assert call(stub, desc(("internal", "x"))).overall_code == OK
        assert metric(s, f'ratelimit_service_failure_mode_total{{mode="{mode}"}}') >= 3
        assert metric(s, 'ratelimit_service_should_rate_limit_error_total{err_type="redis_error"}') >= 3
        # Redis back (same port, same data): counting resumes where it was
        url2 = redis.start()
        assert url2 == url
        wait_for(lambda: call(stub, desc(("user", uid()))).statuses[0].limit_remaining == 2, "Redis back")
        assert call(stub, d).statuses[0].limit_remaining == 1
        # Redis up but not answering (writes paused: the script waits): the timeout gives the failure mode
        before = metric(s, f'ratelimit_service_failure_mode_total{{mode="{mode}"}}')
        admin = redis_lib.Redis.from_url(url)
        admin.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        try:
            slow = desc(("user", uid()))
            if mode == "error":
                expect_error(grpc.StatusCode.UNAVAILABLE, stub.ShouldRateLimit,
                             pb.RateLimitRequest(domain="test", descriptors=[slow]))
            else:
                assert call(stub, slow).overall_code == (OK if mode == "allow" else OVER)
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
        assert metric(s, f'ratelimit_service_failure_mode_total{{mode="{mode}"}}') == before + 1
    finally:
        s.stop()
        redis.stop()


# -- two replicas, one Redis --------------------------------------------------------------


def test_two_replicas_sharing_redis_never_admit_more_than_the_limit(tmp_path: Path, valkey_url: str) -> None:
    """Concurrent calls spread over two processes: exactly the limit is admitted, per algorithm.

    The bound: each check is one atomic script on Redis, so replicas add no
    error; with failure mode deny (as here) a Redis timeout refuses, so
    nothing is admitted uncounted either (with allow, every call answered
    while Redis failed is admitted on top of the limit).
    """
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "r.yaml").write_text(textwrap.dedent("""\
        domain: replicas
        descriptors:
          - key: fixed
            rate_limit: {unit: year, requests_per_unit: 50}
          - key: sliding
            rate_limit: {unit: hour, requests_per_unit: 50, algorithm: sliding_window}
          - key: bucket
            rate_limit: {unit: day, requests_per_unit: 50, algorithm: token_bucket}
        """))
    prefix = f"t{uid()}:"
    env = dict(SYSDESIGN_REDIS_URL=valkey_url, SYSDESIGN_RATELIMIT_KEY_PREFIX=prefix,
               SYSDESIGN_RATELIMIT_FAILURE_MODE="deny", SYSDESIGN_RATELIMIT_REDIS_TIMEOUT_MS="5000")
    replicas = [ratelimit_server(tmp_path / f"data{i}", cfg, **env) for i in range(2)]
    for r in replicas:
        r.start(["serve", "--services", "ratelimit"])
    try:
        stubs = [pbg.RateLimitServiceStub(r.channel()) for r in replicas]
        for kind in ("fixed", "sliding", "bucket"):
            v = uid()

            def one(i: int, kind: str = kind, v: str = v) -> int:
                r = stubs[i % 2].ShouldRateLimit(pb.RateLimitRequest(
                    domain="replicas", descriptors=[desc((kind, v))]), timeout=30)
                return int(r.overall_code == OK)

            with ThreadPoolExecutor(16) as pool:
                admitted = sum(pool.map(one, range(200)))
            assert admitted == 50, kind
    finally:
        for r in replicas:
            assert r.stop() == 0, r.logs()


def test_a_replica_sigkilled_mid_flood_never_lets_more_than_the_limit_through(tmp_path: Path,
                                                                             valkey_url: str) -> None:
    """300 concurrent calls over two replicas, one SIGKILLed after 100: the clients retry
    on the survivor (as Envoy would on another endpoint). Admitted: never more than
    the limit; fewer by at most the calls in flight on the killed replica (counted
    on Redis, never answered)."""
    import signal
    import threading

    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "k.yaml").write_text(textwrap.dedent("""\
        domain: kill
        descriptors:
          - key: sliding
            rate_limit: {unit: hour, requests_per_unit: 150, algorithm: sliding_window}
        """))
    env = dict(SYSDESIGN_REDIS_URL=valkey_url, SYSDESIGN_RATELIMIT_KEY_PREFIX=f"t{uid()}:",
               SYSDESIGN_RATELIMIT_FAILURE_MODE="deny", SYSDESIGN_RATELIMIT_REDIS_TIMEOUT_MS="5000")
    replicas = [ratelimit_server(tmp_path / f"data{i}", cfg, **env) for i in range(2)]
    for r in replicas:
        r.start(["serve", "--services", "ratelimit"])
    stubs = [pbg.RateLimitServiceStub(r.channel()) for r in replicas]
    killed = threading.Event()
    lock = threading.Lock()
    sent = 0
    req = pb.RateLimitRequest(domain="kill", descriptors=[desc(("sliding", uid()))])
    threads = 12

    def one(i: int) -> int:
        nonlocal sent
        with lock:
            sent += 1
            if sent == 100 and not killed.is_set():
                assert replicas[0].proc is not None
                replicas[0].proc.send_signal(signal.SIGKILL)
                killed.set()
        for target in (i % 2, 1):
            try:
                return int(stubs[target].ShouldRateLimit(req, timeout=30).overall_code == OK)
            except grpc.RpcError as err:
                assert target == 0 and err.code() == grpc.StatusCode.UNAVAILABLE, err
        raise AssertionError("unreachable")

    try:
        with ThreadPoolExecutor(threads) as pool:
            admitted = sum(pool.map(one, range(300)))
        assert killed.is_set() and replicas[0].proc is not None and replicas[0].proc.wait(10) == -signal.SIGKILL
        assert 150 - threads <= admitted <= 150
    finally:
        for r in replicas:
            r.stop()


def test_sysdesign_up_serves_it_with_the_example_limits(stack: StackProcess) -> None:
    with stack.channel() as ch:
        st = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ratelimit.v3.RateLimitService"), timeout=10)
        assert st.status == health_pb2.HealthCheckResponse.SERVING
        r = call(pbg.RateLimitServiceStub(ch), desc(("tier", "free"), ("user", uid())), domain="sysdesign")
        assert r.overall_code == OK
        assert r.statuses[0].current_limit.requests_per_unit == 60 and r.statuses[0].limit_remaining == 59


def test_the_example_configs_load() -> None:
    from servers.ratelimit.config import load_directory
    from servers.ratelimit.service import EXAMPLES_DIR

    cfg = load_directory(EXAMPLES_DIR)
    assert {"sysdesign", "messaging"} <= set(cfg.domains)
    root = Path(__file__).resolve().parents[2]
    k8s = load_directory(root / "k8s" / "base" / "systems" / "ratelimit" / "limits")
    assert "sysdesign" in k8s.domains
