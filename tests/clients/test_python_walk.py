"""The reference walk (clients/python/walk.py): the generated Python stubs, no SDK helper."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clients.conftest import ChatPeer, walk_language
from tests.stack import StackProcess


@pytest.mark.timeout(1200)  # the build and the stack start count against it; a cold build is minutes
def test_python_walk(walk_stack: StackProcess, peer: ChatPeer, upload_file: Path) -> None:
    walk_language("python", walk_stack, peer, upload_file)
