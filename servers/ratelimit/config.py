"""envoyproxy/ratelimit's YAML configuration, read unchanged, plus per-limit algorithms.

A directory of ``*.yaml`` / ``*.yml`` files (dotfiles skipped, as a mounted
ConfigMap's ``..data`` links are), each one domain:

    domain: messaging
    descriptors:
      - key: message_type
        value: marketing
        descriptors:
          - key: to_number
            rate_limit: {unit: day, requests_per_unit: 5}
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 100
          algorithm: sliding_window       # sysdesign: fixed_window (default) |
          # burst: 20                     # sliding_window | token_bucket (+ burst)

Every key of envoyproxy/ratelimit's format is accepted with its meaning
(``shadow_mode``, ``quota_mode``, ``replaces``, ``detailed_metric``,
``value_to_metric``, ``share_threshold``, wildcard values, ``metadata``); its
validation rules are kept (unknown keys, empty keys, duplicate composite keys,
bad units, a unit on an unlimited limit, bad ``replaces``, duplicate domains).
An error names the file, the line and the reason (``ConfigError``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from servers.platform.ratelimit import MAX_REQUESTS, UNIT_SECONDS, Algorithm, Rule

UNIT_NUMBER = {"UNKNOWN": 0, "SECOND": 1, "MINUTE": 2, "HOUR": 3, "DAY": 4, "MONTH": 5, "YEAR": 6,
               "WEEK": 7}

VALID_KEYS = {
    "domain", "key", "value", "descriptors", "rate_limit", "unit", "requests_per_unit", "unlimited",
    "shadow_mode", "quota_mode", "name", "replaces", "detailed_metric", "value_to_metric",
    "share_threshold", "metadata",
    # sysdesign's additions
    "algorithm", "burst",
}


class ConfigError(Exception):
    """A refused file: ``file:line: reason``."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Limit:
    """A configured (or overridden) limit, as envoyproxy/ratelimit's config.RateLimit."""

    full_key: str  # stats key: "<domain>.<key_value>[.<key_value>...]"
    requests_per_unit: int
    unit: str  # SECOND ... YEAR ("" when unlimited)
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    burst: int = 0
    unlimited: bool = False
    shadow_mode: bool = False
    quota_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False
    # per entry index: the wildcard value shared by every match (share_threshold)
    share_patterns: tuple[str, ...] = ()

    def rule(self) -> Rule:
        return Rule(self.requests_per_unit, UNIT_SECONDS[self.unit], self.algorithm, self.burst)

    @property
    def unit_number(self) -> int:
        return UNIT_NUMBER.get(self.unit, 0)


@dataclass
class _Node:
    descriptors: dict[str, _Node] = field(default_factory=dict)
    limit: Limit | None = None
    wildcards: list[tuple[str, list[str]]] = field(default_factory=list)
    value_to_metric: bool = False
    share_threshold: bool = False
    wildcard_pattern: str = ""


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings remember their line and their keys' lines."""


class _Map(dict[Any, Any]):
    line: int = 0
    key_lines: dict[Any, int]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    m = _Map()
    m.line = node.start_mark.line + 1
    m.key_lines = {}
    for key_node, value_node in node.value:
        k = loader.construct_object(key_node, deep=True)
        try:
            hash(k)
        except TypeError:
            raise ConfigError("", key_node.start_mark.line + 1, "config error, key is not of type string") from None
        m[k] = loader.construct_object(value_node, deep=True)
        m.key_lines[k] = key_node.start_mark.line + 1
    return m


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)  # type: ignore[arg-type]


def _line(m: Any, k: str | None = None) -> int:
    if isinstance(m, _Map):
        return m.key_lines.get(k, m.line) if k is not None else m.line
    return 0


def _validate_keys(file: str, m: _Map) -> None:
    """envoyproxy/ratelimit's validateYamlKeys: known string keys, lists of maps only."""
    for k, v in m.items():
        if not isinstance(k, str):
            raise ConfigError(file, _line(m, k), f"config error, key is not of type string: {k!r}")
        if k not in VALID_KEYS:
            raise ConfigError(file, _line(m, k), f"config error, unknown key '{k}'")
        if k == "metadata":
            continue
        if isinstance(v, list):
            for e in v:
                if not isinstance(e, _Map):
                    raise ConfigError(file, _line(m, k),
                                      f"config error, yaml file contains list of type other than map: {e!r}")
                _validate_keys(file, e)
        elif isinstance(v, _Map):
            _validate_keys(file, v)
        elif v is not None and not isinstance(v, str | int | bool | float):
            raise ConfigError(file, _line(m, k), "error checking config")


def _str(file: str, m: _Map, k: str) -> str:
    v = m.get(k)
    if v is None:
        return ""
    if isinstance(v, _Map | list):
        raise ConfigError(file, _line(m, k), f"'{k}' must be a string")
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _bool(file: str, m: _Map, k: str) -> bool:
    v = m.get(k, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ConfigError(file, _line(m, k), f"'{k}' must be true or false")
    return v


def _uint(file: str, m: _Map, k: str, hi: int) -> int:
    v = m.get(k, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise ConfigError(file, _line(m, k), f"'{k}' must be an integer 0..{hi}, got {v!r}")
    return v


class RateLimitConfig:
    """The loaded domains, and the lookup of a request's descriptor (config_impl.go's GetLimit)."""

    def __init__(self, *, merge_domains: bool = False) -> None:
        self.domains: dict[str, _Node] = {}
        self.merge_domains = merge_domains
        self.files: list[str] = []

    # -- loading ------------------------------------------------------------

    def load_text(self, file: str, text: str) -> None:
        try:
            root = yaml.load(text, Loader=_Loader)
        except ConfigError as e:
            raise ConfigError(file, e.line, e.reason) from None
        except yaml.YAMLError as e:
            # The line where the broken construct starts (an unclosed quote or
            # bracket is only found at the end of the file).
            context, problem = getattr(e, "context_mark", None), getattr(e, "problem_mark", None)
            mark = context or problem
            line = mark.line + 1 if mark is not None else 0
            reason = getattr(e, "problem", None) or str(e)
            if context is not None and problem is not None and problem.line != context.line:
                reason += f" (line {problem.line + 1}, {getattr(e, 'context', '')})"
            raise ConfigError(file, line, f"error loading config file: {reason}") from None
        if root is None:
            root = _Map()
            root.line, root.key_lines = 1, {}
        if not isinstance(root, _Map):
            raise ConfigError(file, 1, "error loading config file: the document is not a map")
        _validate_keys(file, root)
        domain = _str(file, root, "domain")
        if not domain:
            raise ConfigError(file, _line(root, "domain") or 1, "config file cannot have empty domain")
        descriptors = root.get("descriptors") or []
        if not isinstance(descriptors, list):
            raise ConfigError(file, _line(root, "descriptors"), "'descriptors' must be a list")
        node = self.domains.get(domain)
        if node is not None and not self.merge_domains:
            raise ConfigError(file, _line(root, "domain"), f"duplicate domain '{domain}' in config file")
        if node is None:
            node = self.domains[domain] = _Node()
        self._load_descriptors(file, node, domain + ".", descriptors)
        self.files.append(file)

    def _load_descriptors(self, file: str, parent: _Node, parent_key: str, descriptors: list[Any]) -> None:
        for d in descriptors:
            line = _line(d)
            k = _str(file, d, "key")
            if not k:
                raise ConfigError(file, line, "descriptor has empty key")
            value = _str(file, d, "value")
            final = k + ("_" + value if value else "")
            full = parent_key + final
            if final in parent.descriptors:
                raise ConfigError(file, line, f"duplicate descriptor composite key '{full}'")
            limit = None
            rl = d.get("rate_limit")
            if rl is not None:
                if not isinstance(rl, _Map):
                    raise ConfigError(file, _line(d, "rate_limit"), "'rate_limit' must be a map")
                limit = self._limit(file, d, rl, full)
            share = _bool(file, d, "share_threshold")
            if share and "*" not in final:
                raise ConfigError(file, _line(d, "share_threshold"),
                                  "share_threshold can only be used with wildcard values (containing '*'), "
                                  f"but found key '{final}'")
            if "*" in final:
                parent.wildcards.append((final, final.split("*")))
            metadata = d.get("metadata")
            if metadata is not None and not isinstance(metadata, _Map):
                raise ConfigError(file, _line(d, "metadata"), "error parsing metadata: not a map")
            child = _Node(limit=limit, value_to_metric=_bool(file, d, "value_to_metric"),
                          share_threshold=share, wildcard_pattern=final if share else "")
            nested = d.get("descriptors") or []
            if not isinstance(nested, list):
                raise ConfigError(file, _line(d, "descriptors"), "'descriptors' must be a list")
            self._load_descriptors(file, child, full + ".", nested)
            parent.descriptors[final] = child

    def _limit(self, file: str, d: _Map, rl: _Map, full: str) -> Limit:
        unlimited = _bool(file, rl, "unlimited")
        unit = _str(file, rl, "unit").upper()
        valid_unit = unit in UNIT_SECONDS
        if unlimited:
            if valid_unit:
                raise ConfigError(file, _line(rl, "unit"), "should not specify rate limit unit when unlimited")
            unit = ""
        elif not valid_unit:
            raise ConfigError(file, _line(rl, "unit") or _line(rl),
                              f"invalid rate limit unit '{_str(file, rl, 'unit')}'")
        name = _str(file, rl, "name")
        replaces_raw = rl.get("replaces") or []
        if not isinstance(replaces_raw, list):
            raise ConfigError(file, _line(rl, "replaces"), "'replaces' must be a list")
        replaces = []
        for r in replaces_raw:
            rname = _str(file, r, "name")
            if not rname:
                raise ConfigError(file, _line(r), "should not have an empty replaces entry")
            if rname == name:
                raise ConfigError(file, _line(r), "replaces should not contain name of same descriptor")
            replaces.append(rname)
        alg_name = _str(file, rl, "algorithm") or Algorithm.FIXED_WINDOW.value
        try:
            algorithm = Algorithm(alg_name)
        except ValueError:
            raise ConfigError(file, _line(rl, "algorithm"),
                              f"invalid algorithm '{alg_name}': fixed_window, sliding_window or "
                              "token_bucket") from None
        burst = _uint(file, rl, "burst", MAX_REQUESTS)
        if "burst" in rl and algorithm is not Algorithm.TOKEN_BUCKET:
            raise ConfigError(file, _line(rl, "burst"), "burst is only for algorithm: token_bucket")
        if "burst" in rl and burst < 1:
            raise ConfigError(file, _line(rl, "burst"), "burst must be at least 1")
        if unlimited and "algorithm" in rl:
            raise ConfigError(file, _line(rl, "algorithm"), "should not specify an algorithm when unlimited")
        return Limit(
            full_key=full, requests_per_unit=_uint(file, rl, "requests_per_unit", MAX_REQUESTS),
            unit=unit, algorithm=algorithm, burst=burst, unlimited=unlimited,
            shadow_mode=_bool(file, d, "shadow_mode"), quota_mode=_bool(file, d, "quota_mode"),
            name=name, replaces=tuple(replaces), detailed_metric=_bool(file, d, "detailed_metric"),
        )

    # -- lookup -------------------------------------------------------------

    def has_domain(self, domain: str) -> bool:
        return domain in self.domains

    def get_limit(self, domain: str, entries: Iterable[tuple[str, str]]) -> Limit | None:
        """The limit for a descriptor's (key, value) entries: the most specific match at
        the same depth (key_value, then a wildcard value, then the key alone)."""
        node = self.domains.get(domain)
        if node is None:
            return None
        entries = list(entries)
        limit: Limit | None = None
        detailed = [domain]
        by_value = [domain]
        shared: dict[int, str] = {}
        descriptors = node.descriptors
        prev = node
        for i, (k, v) in enumerate(entries):
            final = k + "_" + v
            detailed.append(final)
            nxt = descriptors.get(final)
            matched_wildcard = ""
            if nxt is None:
                for pattern, parts in prev.wildcards:
                    if _wildcard_match(parts, final):
                        nxt = descriptors.get(pattern)
                        matched_wildcard = pattern
                        break
            by_key_value = nxt is not None
            if nxt is None:
                nxt = descriptors.get(k)
                by_key_value = False
            if matched_wildcard and nxt is not None and nxt.share_threshold:
                shared[i] = nxt.wildcard_pattern.removeprefix(k + "_")
            if nxt is not None:
                if matched_wildcard:
                    if i in shared:
                        use = shared[i]
                    elif nxt.value_to_metric:
                        use = v
                    else:
                        use = matched_wildcard.removeprefix(k + "_")
                elif by_key_value:
                    use = v
                else:
                    use = v if nxt.value_to_metric else ""
                by_value.append(k + ("_" + use if use else ""))
            else:
                by_value.append(k)
            if nxt is not None and nxt.limit is not None and i == len(entries) - 1:
                limit = nxt.limit
            if nxt is not None and nxt.descriptors:
                descriptors = nxt.descriptors
                prev = nxt
            else:
                break
        if limit is None:
            return None
        patterns = tuple(shared.get(i, "") for i in range(len(entries))) if shared else ()
        full = limit.full_key
        if limit.detailed_metric:
            if shared:
                full = ".".join([domain] + [
                    (k + "_" + shared[i]) if i in shared else (k + ("_" + v if v else ""))
                    for i, (k, v) in enumerate(entries)])
            else:
                full = ".".join(detailed)
        elif ".".join(by_value) != limit.full_key:
            full = ".".join(by_value)
        if full != limit.full_key or patterns:
            limit = _replace(limit, full_key=full, share_patterns=patterns)
        return limit


def _replace(limit: Limit, **changes: Any) -> Limit:
    from dataclasses import replace

    return replace(limit, **changes)


def _wildcard_match(parts: list[str], value: str) -> bool:
    """Each '*' matches zero or more characters (config_impl.go's wildcardMatch)."""
    if len(parts) == 1:
        return parts[0] == value
    if not value.startswith(parts[0]) or not value.endswith(parts[-1]):
        return False
    if len(value) < sum(len(p) for p in parts):
        return False
    rest = value[len(parts[0]):]
    if parts[-1]:
        rest = rest[: len(rest) - len(parts[-1])]
    for part in parts[1:-1]:
        idx = rest.find(part)
        if idx < 0:
            return False
        rest = rest[idx + len(part):]
    return True


def config_files(directory: Path) -> list[Path]:
    """The directory's *.yaml / *.yml files, dotfiles skipped, in name order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file())


def load_directory(directory: Path, *, merge_domains: bool = False) -> RateLimitConfig:
    """Every file of the directory, or ConfigError for the first bad one (nothing half-loaded)."""
    cfg = RateLimitConfig(merge_domains=merge_domains)
    for path in config_files(directory):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), 0, f"cannot read: {exc}") from None
        cfg.load_text(str(path), text)
    return cfg


def snapshot(directory: Path) -> tuple[tuple[str, bytes], ...]:
    """What the files hold now (for change detection; symlink swaps included)."""
    out = []
    for path in config_files(directory):
        try:
            out.append((path.name, path.read_bytes()))
        except OSError:
            out.append((path.name, b""))
    return tuple(out)
