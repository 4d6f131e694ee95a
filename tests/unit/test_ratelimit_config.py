"""servers/ratelimit/config.py: envoyproxy/ratelimit's YAML format, its README's examples and
its test/config files' errors, plus the algorithm additions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from servers.platform.ratelimit import Algorithm
from servers.ratelimit.config import ConfigError, RateLimitConfig, load_directory


def load(*texts: str, merge: bool = False) -> RateLimitConfig:
    cfg = RateLimitConfig(merge_domains=merge)
    for i, t in enumerate(texts):
        cfg.load_text(f"f{i}.yaml", textwrap.dedent(t))
    return cfg


def limit_of(cfg: RateLimitConfig, domain: str, *entries: tuple[str, str]) -> tuple[int, str, str] | None:
    lim = cfg.get_limit(domain, entries)
    return None if lim is None else (lim.requests_per_unit, lim.unit, lim.full_key)


def test_readme_example_1_and_3_most_specific_match_wins() -> None:
    cfg = load("""
        domain: mongo_cps
        descriptors:
          - key: database
            value: users
            rate_limit: {unit: second, requests_per_unit: 500}
          - key: database
            value: default
            rate_limit: {unit: second, requests_per_unit: 500}
        """, """
        domain: edge_proxy_per_ip
        descriptors:
          - key: remote_address
            rate_limit: {unit: second, requests_per_unit: 10}
          - key: remote_address
            value: 50.0.0.5
            rate_limit: {unit: second, requests_per_unit: 0}
        """)
    assert limit_of(cfg, "mongo_cps", ("database", "users")) == (500, "SECOND", "mongo_cps.database_users")
    assert limit_of(cfg, "mongo_cps", ("database", "other")) is None
    assert limit_of(cfg, "edge_proxy_per_ip", ("remote_address", "50.0.0.1")) == (
        10, "SECOND", "edge_proxy_per_ip.remote_address")
    assert limit_of(cfg, "edge_proxy_per_ip", ("remote_address", "50.0.0.5"))[0] == 0  # type: ignore[index]


def test_readme_example_2_nested_descriptors() -> None:
    cfg = load_directory(Path(__file__).resolve().parents[2] / "servers" / "ratelimit" / "examples")
    assert limit_of(cfg, "messaging", ("message_type", "marketing"), ("to_number", "2061111111")) == (
        5, "DAY", "messaging.message_type_marketing.to_number")
    assert limit_of(cfg, "messaging", ("to_number", "2061111111")) == (100, "DAY", "messaging.to_number")
    assert limit_of(cfg, "messaging", ("message_type", "marketing")) is None  # a placeholder level


def test_readme_example_4_depth_must_match() -> None:
    shallow = load("""
        domain: example4
        descriptors:
          - key: key
            value: value
            rate_limit: {requests_per_unit: 300, unit: second}
        """)
    assert limit_of(shallow, "example4", ("key", "value"), ("subkey", "subvalue")) is None
    deep = load("""
        domain: example4
        descriptors:
          - key: key
            value: value
            descriptors:
              - key: subkey
                rate_limit: {requests_per_unit: 300, unit: second}
        """)
    assert limit_of(deep, "example4", ("key", "value"), ("subkey", "subvalue"))[0] == 300  # type: ignore[index]


def test_readme_examples_5_to_7_unlimited_shadow_replaces() -> None:
    cfg = load("""
        domain: internal
        descriptors:
          - key: ldap
            rate_limit: {unlimited: true}
          - key: azure
            rate_limit: {unit: minute, requests_per_unit: 100}
        """, """
        domain: example6
        descriptors:
          - key: service
            descriptors:
              - key: user
                value: user-a
                rate_limit: {requests_per_unit: 10, unit: second}
                shadow_mode: true
              - key: user
                value: user-b
                rate_limit: {requests_per_unit: 20, unit: second}
        """, """
        domain: example7
        descriptors:
          - key: key_1
            value: value_1
            descriptors:
              - key: user
                value: bkthomps
                rate_limit: {name: specific_limit, requests_per_unit: 5, unit: second}
          - key: key_2
            value: value_2
            descriptors:
              - key: user
                value: bkthomps
                rate_limit:
                  replaces:
                    - name: specific_limit
                  requests_per_unit: 10
                  unit: second
        """)
    ldap = cfg.get_limit("internal", [("ldap", "x")])
    assert ldap is not None and ldap.unlimited
    a = cfg.get_limit("example6", [("service", "auth"), ("user", "user-a")])
    assert a is not None and a.shadow_mode and a.requests_per_unit == 10
    named = cfg.get_limit("example7", [("key_1", "value_1"), ("user", "bkthomps")])
    replacing = cfg.get_limit("example7", [("key_2", "value_2"), ("user", "bkthomps")])
    assert named is not None and named.name == "specific_limit"
    assert replacing is not None and replacing.replaces == ("specific_limit",)


def test_readme_example_8_detailed_metric() -> None:
    cfg = load("""
        domain: example8
        descriptors:
          - key: key1
            detailed_metric: true
            rate_limit: {unit: minute, requests_per_unit: 10}
          - key: key1
            value: value1
            rate_limit: {unit: minute, requests_per_unit: 20}
        """)
    assert limit_of(cfg, "example8", ("key1", "unspecified_value")) == (
        10, "MINUTE", "example8.key1_unspecified_value")
    assert limit_of(cfg, "example8", ("key1", "value1")) == (20, "MINUTE", "example8.key1_value1")


def test_readme_example_9_wildcards() -> None:
    cfg = load("""
        domain: example9
        descriptors:
          - key: key1
            value: value*
            rate_limit: {unit: minute, requests_per_unit: 20}
          - key: path
            value: /api/*/action
            rate_limit: {unit: minute, requests_per_unit: 21}
          - key: route
            value: /api/*/resource/*/action
            rate_limit: {unit: minute, requests_per_unit: 22}
        """)
    assert limit_of(cfg, "example9", ("key1", "valueXYZ"))[0] == 20  # type: ignore[index]
    assert limit_of(cfg, "example9", ("key1", "vXYZ")) is None
    assert limit_of(cfg, "example9", ("path", "/api/123/action"))[0] == 21  # type: ignore[index]
    assert limit_of(cfg, "example9", ("path", "/api/123/other")) is None
    assert limit_of(cfg, "example9", ("route", "/api/v1/resource/123/action"))[0] == 22  # type: ignore[index]
    assert limit_of(cfg, "example9", ("route", "/api/v1/resource/123")) is None


def test_readme_examples_10_and_11_metric_keys_and_shared_thresholds() -> None:
    cfg = load("""
        domain: example10
        descriptors:
          - key: route
            value_to_metric: true
            descriptors:
              - key: http_method
                value_to_metric: true
                descriptors:
                  - key: subject_id
                    rate_limit: {unit: minute, requests_per_unit: 60}
        """, """
        domain: example11
        descriptors:
          - key: files
            value: files/*
            share_threshold: true
            rate_limit: {unit: hour, requests_per_unit: 10}
          - key: files_no_share
            value: files_no_share/*
            share_threshold: false
            rate_limit: {unit: hour, requests_per_unit: 10}
        """)
    assert limit_of(cfg, "example10", ("route", "api"), ("http_method", "GET"), ("subject_id", "123"))[2] == \
        "example10.route_api.http_method_GET.subject_id"  # type: ignore[index]
    shared = cfg.get_limit("example11", [("files", "files/a.pdf")])
    assert shared is not None and shared.share_patterns == ("files/*",)
    isolated = cfg.get_limit("example11", [("files_no_share", "files_no_share/a.pdf")])
    assert isolated is not None and isolated.share_patterns == ()


def test_the_algorithm_additions() -> None:
    cfg = load("""
        domain: algo
        descriptors:
          - key: a
            rate_limit: {unit: minute, requests_per_unit: 60, algorithm: sliding_window}
          - key: b
            rate_limit: {unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 50}
          - key: c
            rate_limit: {unit: week, requests_per_unit: 1}
        """)
    a, b, c = (cfg.get_limit("algo", [(k, "x")]) for k in "abc")
    assert a is not None and a.algorithm is Algorithm.SLIDING_WINDOW and a.rule().window_s == 60
    assert b is not None and b.rule().capacity == 50 and b.rule().requests == 10
    assert c is not None and c.algorithm is Algorithm.FIXED_WINDOW and c.rule().window_s == 7 * 86400


BAD = [
    # envoyproxy/ratelimit's test/config files and their errors
    ("domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    rate_limit:\n"
     "      unit: foo\n      requests_per_unit: 5\n", 6, "invalid rate limit unit 'foo'"),
    ("'''\n", 1, "error loading config file"),
    ("descriptors:\n", 1, "config file cannot have empty domain"),
    ("domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n\n  - key: key1\n    value: value1\n",
     6, "duplicate descriptor composite key 'test-domain.key1_value1'"),
    ("domain: test-domain\ndescriptors:\n  - value: value1\n", 3, "descriptor has empty key"),
    ("domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    ratelimit:\n      unit: day\n",
     5, "unknown key 'ratelimit'"),
    ("domain: test-domain\ndescriptors:\n  - key: key1\n    rate_limit:\n      unit: day\n"
     "      requestsperunit: 5\n", 6, "unknown key 'requestsperunit'"),
    ("domain: test-domain\ndescriptors:\n  - a\n  - b\n", 2, "list of type other than map"),
    ("0.25: test-domain\ndescriptors: []\n", 1, "key is not of type string"),
    ("domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      name: self\n      replaces:\n        - name:\n"
     "      unit: second\n      requests_per_unit: 5\n", 7, "should not have an empty replaces entry"),
    ("domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      name: self\n      replaces:\n        - name: self\n"
     "      unit: second\n      requests_per_unit: 5\n", 7, "replaces should not contain name of same descriptor"),
    ("domain: d\ndescriptors:\n  - key: foo\n    rate_limit:\n      unlimited: true\n      unit: day\n", 6,
     "should not specify rate limit unit when unlimited"),
    ("domain: d\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n", 5,
     "share_threshold can only be used with wildcard values"),
    # the additions
    ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: 5, algorithm: leaky}\n",
     4, "invalid algorithm 'leaky'"),
    ("domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: day\n      requests_per_unit: 5\n"
     "      burst: 3\n", 7, "burst is only for algorithm: token_bucket"),
    ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: -1}\n", 4,
     "'requests_per_unit' must be an integer"),
    ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: 5\n", 4,
     "error loading config file"),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD, ids=[r for _, _, r in BAD])
def test_bad_files_are_refused_with_the_line_and_the_reason(text: str, line: int, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        RateLimitConfig().load_text("bad.yaml", text)
    assert err.value.file == "bad.yaml"
    assert reason in err.value.reason, err.value.reason
    assert err.value.line == line, (err.value.line, err.value.reason)


def test_duplicate_domains_are_refused_unless_merged() -> None:
    a = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: day, requests_per_unit: 1}\n"
    b = "domain: d\ndescriptors:\n  - key: b\n    rate_limit: {unit: day, requests_per_unit: 2}\n"
    with pytest.raises(ConfigError, match="duplicate domain 'd'"):
        load(a, b)
    merged = load(a, b, merge=True)
    assert merged.get_limit("d", [("a", "")]) and merged.get_limit("d", [("b", "")])


def test_a_directory_loads_yaml_files_only_and_skips_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("domain: a\n")
    (tmp_path / "b.yml").write_text("domain: b\n")
    (tmp_path / ".hidden.yaml").write_text("domain: [broken\n")
    (tmp_path / "notes.txt").write_text("not config")
    assert set(load_directory(tmp_path).domains) == {"a", "b"}
