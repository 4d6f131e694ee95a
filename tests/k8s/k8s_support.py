"""Helpers shared by the tests under tests/k8s: free ports and a moto S3 server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server(port: int, log: Path) -> Iterator[str]:
    """A moto S3 server in its own process on port, until the block ends."""
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **CREDS})
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"moto exited; see {log}"
                try:
                    with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                        break
                except urllib.error.HTTPError:
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"moto did not answer on {url}"
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
