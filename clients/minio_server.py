"""A real MinIO server on loopback, built from the Go module proxy.

    python scripts/minio.py build                 # go install, once; prints the binary's path
    python scripts/minio.py start [--dir DIR]     # prints the SYSDESIGN_S3_* variables
    python scripts/minio.py stop [--dir DIR]
    python scripts/minio.py run [--dir DIR] -- COMMAND...   # start, run COMMAND with the variables, stop

MinIO publishes no binary to a package registry, but its source is a Go module,
so ``go install github.com/minio/minio@<pinned version>`` builds the server
from the Go module proxy (``clients/gotools.py``): about 3.5 minutes on two
cores the first time, then the binary is kept under
``~/.cache/sysdesign/go/minio-<version>/`` and later runs skip Go.
MinIO is AGPL-licensed: the project only builds and runs it, as a user would,
and carries none of its code.

The tests use ``build`` (``make test`` runs it) and start their own servers
through :func:`start_server`; where Go is missing the MinIO half is skipped
with one line saying why, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from clients import gotools
from clients.loopback import free_port

ACCESS_KEY = "sysdesign"
SECRET_KEY = "sysdesign-minio-secret"
START_TIMEOUT = float(os.environ.get("SYSDESIGN_MINIO_START_TIMEOUT", "60"))
TOOL = gotools.TOOLS["minio"]


def log(msg: str) -> None:
    print(f"minio: {msg}", file=sys.stderr, flush=True)


def missing_tools() -> str:
    """Why MinIO cannot be built here, or "" when it can (or already is)."""
    return gotools.missing_go(TOOL)


def build() -> Path:
    """The MinIO binary, built with ``go install`` on first use (clients/gotools.py)."""
    return gotools.build("minio")



def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/minio/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class MinioServer:
    """One MinIO server process (single drive) on free loopback ports."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def env(self) -> dict[str, str]:
        """The variables that point the stack (and boto3) at this server."""
        return {"SYSDESIGN_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> MinioServer:
        exe = build()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MINIO_ROOT_USER": ACCESS_KEY, "MINIO_ROOT_PASSWORD": SECRET_KEY,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_REGION": "us-east-1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "server", str(self.data_dir), "--quiet", "--address", f"127.0.0.1:{self.port}",
                 "--console-address", f"127.0.0.1:{free_port()}"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(self.endpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"minio exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"minio did not answer on {self.endpoint} in {START_TIMEOUT:.0f} s:\n"
                                   f"{self.logs()}")
            time.sleep(0.2)
        return self

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _state_file(d: Path) -> Path:
    return d / "server.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/minio.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "start", "stop", "run"])
    ap.add_argument("--dir", type=Path, default=None, help="data dir (default ./data/minio)")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    d = (args.dir or Path(os.environ.get("SYSDESIGN_DATA_DIR", "data")) / "minio").resolve()

    if args.command == "build":
        why = missing_tools()
        if why:
            return gotools.unavailable("MinIO half", why, prefix="minio: ")
        print(build())
        return 0
    if args.command == "start":
        server = MinioServer(d / "data")
        server.start()
        assert server.proc is not None
        _state_file(d).write_text(json.dumps({"pid": server.proc.pid, "port": server.port}))
        for k, v in server.env().items():
            print(f"export {k}={v}")
        return 0
    if args.command == "stop":
        try:
            st: dict[str, Any] = json.loads(_state_file(d).read_text())
        except OSError:
            log(f"no server recorded under {d}")
            return 0
        try:
            os.kill(int(st["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        _state_file(d).unlink(missing_ok=True)
        return 0
    # run
    if not command:
        ap.error("run needs a command after --")
    server = MinioServer(d / "data").start()
    try:
        return subprocess.run(command, env={**os.environ, **server.env()}).returncode
    finally:
        server.stop()
