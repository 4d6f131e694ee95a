"""`sysdesign up` starts the card processor's stand-in beside the stack, so payments work out of the box.

The stand-in is `sysdesign sim psp` (servers/sim/psp.py) as a child process:
its charges under DATA_DIR/sim-psp, its webhooks POSTed to this stack's edge,
on port 12111 when free (else any free port, written to DATA_DIR/sim-psp/url).
The socket is bound here and handed to the child, so two stacks starting at
once never race for the port, and a call made before the child serves waits
in the socket's backlog instead of being refused. SYSDESIGN_PSP_URL is set for the
stack, so payments calls it; both sides read SYSDESIGN_PSP_SECRET_KEY and
SYSDESIGN_PSP_WEBHOOK_SECRET from the same environment. When SYSDESIGN_PSP_URL
already names a processor (or with --no-sim), nothing is started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clients.common import err

DEFAULT_PORT = 12111


def _listen(host: str) -> socket.socket:
    """The stand-in's socket, bound here so no other process can take the port first:
    12111 when free, else any free port."""
    for port in (DEFAULT_PORT, 0):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            continue
        sock.listen(128)
        return sock
    raise OSError("no port to listen on")


def _die_with_parent() -> None:
    """In the child: SIGTERM when `sysdesign up` dies, however it dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def webhook_url(config: Any) -> str:
    host, port = config.http_host_port
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/webhooks/psp"


def _start(sock: socket.socket, data_dir: Path, hook: str, log_path: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "clients.cli", "sim", "psp", "--listen-fd", str(sock.fileno()),
           "--data-dir", str(data_dir), "--webhook-url", hook]
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, pass_fds=(sock.fileno(),),
                                preexec_fn=_die_with_parent)


@contextmanager
def beside_the_stack(config: Any, *, enabled: bool = True) -> Iterator[tuple[tuple[str, str], ...]]:
    """Runs the stand-in for the duration of the block; yields the banner's rows."""
    named = os.environ.get("SYSDESIGN_PSP_URL", "")
    if named or not enabled:
        from servers.payments.processor import DEFAULT_URL

        yield (("card processor", named or f"{DEFAULT_URL} (--no-sim: start `sysdesign sim psp` yourself)"),)
        return
    host = "127.0.0.1"
    data_dir = config.data_dir / "sim-psp"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "sim.log"
    sock = _listen(host)
    port = int(sock.getsockname()[1])
    proc = _start(sock, data_dir, webhook_url(config), log_path)
    sock.close()  # the child holds its own copy; requests queue on it until it serves
    url = f"http://{host}:{port}"
    os.environ["SYSDESIGN_PSP_URL"] = url
    (data_dir / "url").write_text(url + "\n")
    try:
        yield (("card processor", f"{url}  (sysdesign sim psp, log {log_path})"),)
    finally:
        os.environ.pop("SYSDESIGN_PSP_URL", None)
        if proc.poll() is not None:
            err.print(f"[yellow]the card processor's stand-in had exited ({proc.returncode}); see {log_path}[/]")
        else:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
