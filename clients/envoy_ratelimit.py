"""envoyproxy/ratelimit, Envoy's reference rate limit service, on loopback, built from the Go module proxy.

    python -m clients.envoy_ratelimit build       # go install, once; prints the binary's path
    python -m clients.envoy_ratelimit run --config-dir DIR --redis-url redis://127.0.0.1:6379 \\
        [-- COMMAND...]                           # start it; run COMMAND with ENVOY_RATELIMIT_ADDR, or wait

The reference answers the same ``envoy.service.ratelimit.v3.RateLimitService``
as ``sysdesign serve --services ratelimit`` and reads the same YAML, so the
conformance test (tests/integration/test_ratelimit_envoy_compat.py) and
``sysdesign bench ratelimit`` run both side by side. ``go install
github.com/envoyproxy/ratelimit/src/service_cmd@<pinned version>``
(clients/gotools.py) builds it in about 45 s on two cores with empty Go
caches; the binary is kept under ``~/.cache/sysdesign/go/``. It is
Apache-2.0 licensed; the project only builds and runs it.

:class:`EnvoyRateLimit` lays a config directory out the way the service
reads it (``RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config/*.yaml``, watched in
place: ``RUNTIME_WATCH_ROOT=false``), points it at one Redis over TCP, keeps
its statistics as Prometheus metrics (``USE_STATSD=false``,
``USE_PROMETHEUS=true``: no statsd to send to, and without a sink it would
log every timer), listens on four free loopback ports (gRPC, HTTP with
``/healthcheck`` and ``/json``, debug, metrics), and waits until its gRPC
health service says SERVING. Everything else is the reference's own default
(``settings.go``): a Redis pool of 10 connections, no pipelining window,
near-limit ratio 0.8, expiry jitter up to 300 s, the local over-limit cache
off unless ``local_cache_bytes`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from clients import gotools
from clients.loopback import free_port

TOOL = gotools.TOOLS["envoy-ratelimit"]
START_TIMEOUT = float(os.environ.get("SYSDESIGN_ENVOY_RATELIMIT_START_TIMEOUT", "60"))
# The name its grpc.health.v1 service answers for (server_impl.go).
HEALTH_SERVICE = "ratelimit"
SUBDIRECTORY = "ratelimit"
# Only these of the caller's variables reach the process: the reference reads ~100
# variables (PORT, REDIS_URL, ...), and a stray one of the caller's must not change it.
_PASS_ENV = ("PATH", "HOME", "TMPDIR", "TZ", "LANG")


def log(msg: str) -> None:
    print(f"envoy-ratelimit: {msg}", file=sys.stderr, flush=True)


def missing_tools() -> str:
    """Why envoyproxy/ratelimit cannot be built here, or "" when it can (or already is)."""
    return gotools.missing_go(TOOL)


def build() -> Path:
    """The service binary, built with ``go install`` on first use (clients/gotools.py)."""
    return gotools.build(TOOL.name)


def redis_address(url: str) -> tuple[str, str]:
    """``host:port`` and the password of a single server's ``redis://`` URL (as REDIS_URL and
    REDIS_AUTH want them); ValueError for what the reference's TCP mode cannot take."""
    if "," in url:
        raise ValueError("one Redis server, not a cluster's seed list")
    u = urlsplit(url if "://" in url else f"redis://{url}")
    if u.scheme not in ("redis", ""):
        raise ValueError(f"a redis:// URL, got {url!r}")
    db = u.path.strip("/")
    if db not in ("", "0"):
        raise ValueError(f"database {db}: the reference always uses database 0 (use a key prefix)")
    if not u.hostname or not u.port:
        raise ValueError(f"host and port, got {url!r}")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    password = unquote(u.password) if u.password else ""
    if u.username and u.username != "default":
        password = f"{unquote(u.username)}:{password}"
    return f"{host}:{u.port}", password


class EnvoyRateLimit:
    """One envoyproxy/ratelimit process on free loopback ports.

    ``config_dir``'s ``*.yaml`` / ``*.yml`` files are copied into the runtime
    layout under ``work_dir`` at :meth:`start` (and again by
    :meth:`sync_config`, which the service picks up as a change). Counters are
    kept in Redis under ``key_prefix``, so it can share a Redis with another
    service without their counts meeting.
    """

    def __init__(self, work_dir: Path, config_dir: Path, redis_url: str, *, key_prefix: str = "",
                 local_cache_bytes: int = 0, log_level: str = "warn",
                 extra_env: dict[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.config_dir = Path(config_dir)
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.local_cache_bytes = local_cache_bytes
        self.log_level = log_level
        self.extra_env = dict(extra_env or {})
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.debug_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def runtime_root(self) -> Path:
        return self.work_dir / "runtime"

    @property
    def runtime_config(self) -> Path:
        return self.runtime_root / SUBDIRECTORY / "config"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "envoy-ratelimit.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        """The variables the process runs with (settings.go's names)."""
        host, password = redis_address(self.redis_url)
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        env.update({
            "HOST": "127.0.0.1", "PORT": str(self.http_port),
            "GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(self.grpc_port),
            "DEBUG_HOST": "127.0.0.1", "DEBUG_PORT": str(self.debug_port),
            "RUNTIME_ROOT": str(self.runtime_root), "RUNTIME_SUBDIRECTORY": SUBDIRECTORY,
            "RUNTIME_WATCH_ROOT": "false", "RUNTIME_IGNOREDOTFILES": "true",
            "REDIS_SOCKET_TYPE": "tcp", "REDIS_TYPE": "single", "REDIS_URL": host,
            "USE_STATSD": "false", "USE_PROMETHEUS": "true",
            "PROMETHEUS_ADDR": f"127.0.0.1:{self.metrics_port}",
            "LOG_LEVEL": self.log_level, "LOG_FORMAT": "json",
            "LOCAL_CACHE_SIZE_IN_BYTES": str(self.local_cache_bytes),
            "CACHE_KEY_PREFIX": self.key_prefix,
        })
        if password:
            env["REDIS_AUTH"] = password
        env.update(self.extra_env)
        return env

    def sync_config(self) -> None:
        """Copy the config dir's YAML files into the runtime layout (removed ones go too)."""
        dst = self.runtime_config
        dst.mkdir(parents=True, exist_ok=True)
        wanted = {p.name: p for p in sorted(self.config_dir.iterdir())
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()}
        for old in dst.iterdir():
            if old.name not in wanted:
                old.unlink()
        for name, src in wanted.items():
            tmp = dst / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            tmp.replace(dst / name)

    def start(self) -> EnvoyRateLimit:
        exe = build()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.sync_config()
        env = self.env()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([str(exe)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=self.work_dir,
                                         start_new_session=True)
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        with grpc.insecure_channel(self.grpc_addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"envoyproxy/ratelimit exited with {self.proc.returncode}:\n"
                                       f"{self.logs()}")
                try:
                    if stub.Check(req, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"envoyproxy/ratelimit did not serve on {self.grpc_addr} in "
                                       f"{START_TIMEOUT:.0f} s:\n{self.logs()}")
                time.sleep(0.1)

    def logs(self, limit: int | None = 4000) -> str:
        """The end of its log (``limit`` characters; None: all of it)."""
        try:
            text = self.log_path.read_text(errors="replace")
            return text if limit is None else text[-limit:]
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (it drains gRPC and exits 0), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> EnvoyRateLimit:
        return self if self.running() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clients.envoy_ratelimit",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "run"])
    ap.add_argument("--config-dir", type=Path, help="the rate limit YAML files (run)")
    ap.add_argument("--redis-url", default=os.environ.get("SYSDESIGN_REDIS_URL", ""),
                    help="one Redis server (default $SYSDESIGN_REDIS_URL)")
    ap.add_argument("--key-prefix", default="")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default ./data/envoy-ratelimit)")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "build":
        why = missing_tools()
        if why:
            return gotools.unavailable("envoyproxy/ratelimit", why, prefix="envoy-ratelimit: ")
        print(build())
        return 0
    if args.config_dir is None or not args.redis_url:
        ap.error("run needs --config-dir and --redis-url")
    d = (args.dir or Path(os.environ.get("SYSDESIGN_DATA_DIR", "data")) / "envoy-ratelimit").resolve()
    server = EnvoyRateLimit(d, args.config_dir, args.redis_url, key_prefix=args.key_prefix).start()
    log(f"serving gRPC on {server.grpc_addr}, HTTP on {server.http_base} (pid {server.pid})")
    try:
        if command:
            env = {**os.environ, "ENVOY_RATELIMIT_ADDR": server.grpc_addr}
            return subprocess.run(command, env=env).returncode
        assert server.proc is not None
        return server.proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
