"""Ctrl-C in a terminal signals the whole foreground process group: the embedded
Valkey must sit outside it, so `sysdesign up` drains first and stops Valkey last."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.stack import StackProcess


def test_ctrl_c_drains_cleanly_and_stops_valkey_last(tmp_path: Path) -> None:
    s = StackProcess(tmp_path / "data")
    s.start()
    assert s.proc is not None
    valkey_pid = int((tmp_path / "data" / "valkey" / "valkey.pid").read_text())
    # a terminal's SIGINT goes to the group of `sysdesign up`; Valkey is not in it
    assert os.getpgid(valkey_pid) != os.getpgid(s.proc.pid)
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(30) == 0, s.logs()
    logs = s.logs()
    assert '"event": "stopped"' in logs
    for noise in ("queue_redis_unavailable", "invalidation_listener_failed", "Traceback"):
        assert noise not in logs, logs
    assert not Path(f"/proc/{valkey_pid}").exists(), "Valkey outlived sysdesign up"
