"""The pods' processes run on a read-only root filesystem, and their probes find what they name.

The rendered kind overlay says how each sysdesign container starts (args)
and with which environment (ConfigMap + Secrets). Here the same commands run
as local processes, each in a private mount namespace where `/` is remounted
read-only and `/tmp` is a fresh tmpfs, like the pod's `readOnlyRootFilesystem`
with an emptyDir at /tmp. The backends are real: a Valkey server and a moto
S3 server (the tables fall back to SQLite under /tmp, as there is no
Cassandra here). Then:

- every gRPC service a Deployment's probes name reports SERVING on the server
  started with that Deployment's args (all gRPC Deployments in one process,
  to spare the CPU);
- the worker answers the overall health status, the edge its readiness and
  liveness paths;
- SIGTERM drains all of them to exit code 0, and nothing tried to write
  outside /tmp.

Needs `unshare` and the right to create a mount namespace (root); skipped
otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s_support import CREDS, free_port, moto_server
from test_k8s_manifests import app_containers, effective_env, find

ROOT = Path(__file__).resolve().parents[2]
# Inside the namespace: read-only /, a tmpfs on /tmp, then the command. A
# checkout (or virtualenv) that itself lives under /tmp would vanish under the
# tmpfs, so those directories are set aside on /mnt first and bound back,
# read-only, at their own paths on the fresh tmpfs.
READ_ONLY = """set -e
if [ -n "$SYSDESIGN_KEEP" ]; then mount --bind /tmp /mnt; fi
mount -o remount,bind,ro /
mount -t tmpfs -o size=512m tmpfs /tmp
for d in $SYSDESIGN_KEEP; do
  mkdir -p "$d"
  mount --bind "/mnt${d#/tmp}" "$d"
  mount -o remount,bind,ro "$d"
done
cd "$SYSDESIGN_WORKDIR"
exec "$@"
"""


def _under_tmp() -> list[str]:
    """The checkout and the interpreter's prefix, where they live under /tmp (outermost only)."""
    tmp = Path("/tmp").resolve()
    found: list[Path] = []
    for p in sorted({ROOT, Path(sys.prefix).resolve()}, key=lambda p: len(p.parts)):
        if p.is_relative_to(tmp) and not any(p.is_relative_to(f) for f in found):
            found.append(p)
    return [str(p) for p in found]


def _namespaces_available() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -o remount,bind,ro / && mount -t tmpfs tmpfs /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_available(),
                                reason="needs unshare and mount namespaces (root)")


def local_env(objs: list[dict[str, Any]], container: dict[str, Any], redis_url: str, s3: str) -> dict[str, str]:
    """The container's rendered environment, pointed at local backends (also scripts/image_check.py)."""
    env = effective_env(objs, container)
    # Loopback ports instead of the pod's 0.0.0.0, real local backends instead of the
    # in-cluster ones, and no Cassandra (tables go to SQLite under the data dir, on /tmp).
    env.pop("SYSDESIGN_CASSANDRA_HOSTS")
    env.update({
        "SYSDESIGN_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "SYSDESIGN_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "SYSDESIGN_METRICS_ADDR": "",
        "SYSDESIGN_REDIS_URL": redis_url,
        "SYSDESIGN_S3_ENDPOINT": s3,
        **CREDS,
    })
    return env


def pod_env(objs: list[dict[str, Any]], container: dict[str, Any], redis_url: str, s3: str) -> dict[str, str]:
    env = {**local_env(objs, container, redis_url, s3), "SYSDESIGN_SHUTDOWN_GRACE_SECONDS": "3"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SYSDESIGN_", "AWS_"))}
    return {**base, **env, "PYTHONDONTWRITEBYTECODE": "1", "SYSDESIGN_WORKDIR": str(ROOT),
            "SYSDESIGN_KEEP": " ".join(_under_tmp()),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")])}


def health(addr: str, service: str) -> int | None:
    try:
        with grpc.insecure_channel(addr) as ch:
            return int(health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status)
    except grpc.RpcError:
        return None


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except Exception:
        return None


def wait_for(proc: subprocess.Popen[bytes], log: Path, what: str, check: Any) -> None:
    deadline = time.monotonic() + 120
    while not check():
        assert proc.poll() is None, f"{what} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"{what} never became ready:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.3)


def test_pod_processes_run_on_a_read_only_root(rendered: dict[str, list[dict[str, Any]]], valkey_url: str,
                                               tmp_path: Path) -> None:
    objs = rendered["kind"]
    serve: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    edge: list[dict[str, Any]] = []
    for d in find(objs, "Deployment"):
        for c in app_containers(d):
            {"serve": serve, "worker": workers, "edge": edge}[c["args"][0]].append(c)
    assert serve and workers and edge
    systems = ",".join(c["args"][c["args"].index("--services") + 1] for c in serve)
    probed = {c["readinessProbe"]["grpc"]["service"] for c in serve}
    # The media transcoder when there is one (it has scratch files), else the first worker.
    worker = next((c for c in workers if c["args"] == ["worker", "media"]), workers[0])

    with moto_server(free_port(), tmp_path / "moto.log") as s3:
        runs: dict[str, tuple[subprocess.Popen[bytes], dict[str, str], Path]] = {}
        try:
            for name, container, args in (("serve", serve[0], ["serve", "--services", systems]),
                                          ("worker", worker, worker["args"]),
                                          ("edge", edge[0], edge[0]["args"])):
                env = pod_env(objs, container, valkey_url, s3)
                log = tmp_path / f"{name}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY, "sh",
                         sys.executable, "-m", "clients.cli", *args],
                        env=env, stdout=out, stderr=subprocess.STDOUT)
                runs[name] = (proc, env, log)

            proc, env, log = runs["serve"]
            for service in sorted(probed):
                wait_for(proc, log, f"serve --services {systems} ({service})",
                         lambda s=service: health(env["SYSDESIGN_GRPC_ADDR"], s) == 1)  # type: ignore[misc]
            proc, env, log = runs["worker"]
            wait_for(proc, log, " ".join(worker["args"]), lambda: health(env["SYSDESIGN_GRPC_ADDR"], "") == 1)
            proc, env, log = runs["edge"]
            base = f"http://{env['SYSDESIGN_HTTP_ADDR']}"
            for probe in ("readinessProbe", "livenessProbe"):
                path = edge[0][probe]["httpGet"]["path"]
                wait_for(proc, log, f"edge {path}", lambda p=path: http_status(base + p) == 200)  # type: ignore[misc]
        finally:
            for proc, _, _ in runs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = {}
            for name, (proc, _, _) in runs.items():
                try:
                    codes[name] = proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes[name] = proc.wait()
    for name, (_, _, log) in runs.items():
        text = log.read_text(errors="replace")
        assert codes[name] == 0, f"{name} exited {codes[name]}:\n{text[-3000:]}"
        assert "Read-only file system" not in text, f"{name} tried to write outside /tmp:\n{text[-3000:]}"
