"""Starts the real stack (`sysdesign up`) as a subprocess on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StackProcess:
    data_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
        env.update({
            "SYSDESIGN_DATA_DIR": str(self.data_dir),
            "SYSDESIGN_GRPC_ADDR": self.grpc_addr,
            "SYSDESIGN_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
            "SYSDESIGN_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
            "SYSDESIGN_SHUTDOWN_GRACE_SECONDS": "5",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")]),
        })
        env.update(self.extra_env)
        return env

    def start(self, args: list[str] | None = None, timeout: float = 60) -> StackProcess:
        cmd = [sys.executable, "-m", "clients.cli", *(args or ["up"])]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT))
        log.close()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"stack exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with grpc.insecure_channel(self.grpc_addr) as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"stack not serving after {timeout}s ({last}):\n{self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_addr)

    def token(self, username: str) -> str:
        out = subprocess.run([sys.executable, "-m", "clients.cli", "token", username],
                             env=self.env(), capture_output=True, check=True, cwd=str(ROOT), timeout=60)
        return out.stdout.decode().strip()
