"""The reference walk (clients/python/walk.py): proves the harness every other language's walk uses."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.clients.conftest import ChatPeer, check_walk, run_walk
from tests.stack import ROOT, StackProcess


def test_python_walk(walk_stack: StackProcess, peer: ChatPeer, upload_file: Path) -> None:
    summary = run_walk(walk_stack, peer, upload_file, [sys.executable, "clients/python/walk.py"], ROOT,
                       language="python")
    check_walk(walk_stack, peer, upload_file, summary)
