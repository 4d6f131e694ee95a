"""The system under test: `sysdesign up` on private loopback ports and a private data dir.

The bench starts the stack itself, as any user would (``<venv>/bin/sysdesign
up``), with ``SYSDESIGN_DATA_DIR``, ``SYSDESIGN_GRPC_ADDR``,
``SYSDESIGN_HTTP_ADDR`` and ``SYSDESIGN_METRICS_ADDR`` set; every other
``SYSDESIGN_*`` variable of the caller is dropped (a benchmark must not write
into someone's real Redis or Cassandra by accident) unless passed explicitly
in ``extra_env``. It waits for grpc.health.v1 ``Check("")`` to answer
SERVING, and stops the stack with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from clients.bench.loadgen import HarnessError
from clients.loopback import free_port

STACK_VARS = ("SYSDESIGN_DATA_DIR", "SYSDESIGN_GRPC_ADDR", "SYSDESIGN_HTTP_ADDR",
              "SYSDESIGN_METRICS_ADDR")



def sysdesign_command() -> list[str]:
    """``<venv>/bin/sysdesign`` next to this interpreter, else ``python -m clients.cli``."""
    exe = Path(sys.executable).parent / "sysdesign"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "clients.cli"]


def read_rss_kb(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children of every thread, recursively)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


@dataclass
class RssSample:
    """RSS of the server process and of each descendant, in MiB."""

    server_mib: float
    children: dict[str, float]  # "name[pid]" -> MiB

    @property
    def valkey_mib(self) -> float:
        return sum(v for k, v in self.children.items() if "valkey" in k or "redis" in k)

    @property
    def total_mib(self) -> float:
        return self.server_mib + sum(self.children.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "server_mib": round(self.server_mib, 1),
            "valkey_mib": round(self.valkey_mib, 1),
            "total_mib": round(self.total_mib, 1),
            "children": {k: round(v, 1) for k, v in self.children.items()},
        }


def rss_tree(pid: int) -> RssSample:
    kids = {f"{process_name(c)}[{c}]": read_rss_kb(c) / 1024 for c in descendants(pid)}
    return RssSample(read_rss_kb(pid) / 1024, kids)


@dataclass
class Stack:
    data_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    command: list[str] = field(default_factory=lambda: [*sysdesign_command(), "up"])
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

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
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
        # A benchmark measures the system, not the API limits refusing its load.
        env["SYSDESIGN_API_LIMITS"] = "off"
        env.update(self.extra_env)
        env.update({
            "SYSDESIGN_DATA_DIR": str(self.data_dir),
            "SYSDESIGN_GRPC_ADDR": self.grpc_addr,
            "SYSDESIGN_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
            "SYSDESIGN_METRICS_ADDR": f"127.0.0.1:{self.metrics_port}",
        })
        return env

    def log_tail(self, limit: int = 6000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-limit:].decode(errors="replace")

    def start(self, timeout_s: float = 90.0) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is None:
            self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.command, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            self.wait_serving(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_serving(self, timeout_s: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"`{' '.join(self.command)}` exited with {self.proc.returncode}:\n"
                    f"{self.log_tail()}"
                )
            try:
                with grpc.insecure_channel(self.grpc_addr) as ch:
                    resp = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0
                    )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}"  # type: ignore[attr-defined]
            time.sleep(0.2)
        raise HarnessError(
            f"the stack was not SERVING within {timeout_s:.0f} s (last: {last}):\n{self.log_tail()}"
        )

    def run_cli(self, *args: str, timeout_s: float = 60.0) -> str:
        """Run ``sysdesign <args>`` with the stack's environment; its stdout."""
        cmd = [*self.command[:-1], *args]
        res = subprocess.run(cmd, env=self.env(), capture_output=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL, check=False)
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace")
            raise HarnessError(f"`{' '.join(cmd)}` failed ({res.returncode}): {err}")
        return res.stdout.decode()

    def token(self, username: str) -> str:
        out = self.run_cli("token", username).strip().splitlines()
        if not out:
            raise HarnessError(f"`sysdesign token {username}` printed no token")
        return out[-1].strip()

    def rss(self) -> RssSample:
        return rss_tree(self.pid)

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group (the stack and its Valkey)."""
        code: int | None = None
        if self.proc is not None:
            kids = {k: process_name(k) for k in descendants(self.proc.pid)}
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            code = self.proc.returncode
            # A child the stack left behind (it should not) would hold the data dir.
            for k, name in kids.items():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if process_name(k) == name:
                        os.kill(k, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Stack:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --------------------------------------------------------------------------- CPU accounting


def _machine_jiffies() -> tuple[int, int, int]:
    """(busy, total, steal) clock ticks of the whole machine since boot."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total, steal


def _tree_jiffies(root: int) -> int:
    """CPU ticks of ``root`` and its live descendants, plus their reaped children."""
    total = 0
    for pid in (root, *descendants(root)):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            # utime stime cutime cstime are fields 14-17 (1-based); after "comm)" they start at 11
            total += sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by ``pid`` and its live descendants (and their reaped children)."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return _tree_jiffies(pid) / hz


@dataclass
class CpuWindow:
    """How busy the machine was during a window, split into this run and everything else.

    ``foreign_cores`` is the CPU that processes outside the bench's own tree
    (the bench, its load workers, floors and the stack are all descendants)
    used, in cores: on a shared box, a figure measured while it was high is
    noise-prone, for the floor as much as for the system.
    """

    start_s: float = field(default_factory=time.monotonic)
    _machine: tuple[int, int, int] = field(default_factory=_machine_jiffies)
    _ours: int = field(default_factory=lambda: _tree_jiffies(os.getpid()))

    def close(self) -> dict[str, float]:
        busy0, total0, steal0 = self._machine
        busy1, total1, steal1 = _machine_jiffies()
        ours = _tree_jiffies(os.getpid()) - self._ours
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        wall = max(1e-6, time.monotonic() - self.start_s)
        cores = (total1 - total0) / hz / wall if total1 > total0 else float(os.cpu_count() or 1)
        busy = (busy1 - busy0) / hz / wall
        mine = ours / hz / wall
        return {
            "seconds": round(wall, 2),
            "machine_busy_cores": round(busy, 2),
            "bench_cores": round(mine, 2),
            "foreign_cores": round(max(0.0, busy - mine), 2),
            "steal_cores": round((steal1 - steal0) / hz / wall, 2),
            "cores": round(cores, 1),
        }
