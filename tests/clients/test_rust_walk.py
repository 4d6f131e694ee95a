"""The Rust walk (clients/rust): tonic + prost stubs generated from protos/ by the crate's build.rs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clients.conftest import ChatPeer, walk_language
from tests.stack import StackProcess


@pytest.mark.timeout(1200)  # the build and the stack start count against it; a cold build is minutes
def test_rust_walk(walk_stack: StackProcess, peer: ChatPeer, upload_file: Path) -> None:
    walk_language("rust", walk_stack, peer, upload_file)
