"""Provider stand-ins started as real processes for tests (`sysdesign sim ...`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from clients.loopback import free_port

ROOT = Path(__file__).resolve().parents[1]
SYSDESIGN = str(Path(sys.executable).parent / "sysdesign")
KEY = "sk_test_integration"
WHSEC = "whsec_integration"


class SimPsp:
    def __init__(self, data_dir: Path, *extra: str, webhook_url: str = "") -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.webhook_url = webhook_url
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SimPsp:
        cmd = [SYSDESIGN, "sim", "psp", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--secret-key", KEY, "--webhook-secret", WHSEC, "--seed", "7",
               "--webhook-retry-base-ms", "200", *self.extra]
        if self.webhook_url:
            cmd += ["--webhook-url", self.webhook_url]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "sim.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sim psp exited {self.proc.returncode}: {self.logs()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"sim psp did not listen: {self.logs()}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def logs(self) -> str:
        return (self.data_dir / "sim.log").read_text(errors="replace")
