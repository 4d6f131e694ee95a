"""The Rust walk (clients/rust): tonic + prost stubs generated from protos/ by the crate's build.rs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.clients.conftest import ChatPeer, build, check_walk, require_toolchain, run_walk
from tests.stack import ROOT, StackProcess

CRATE = ROOT / "clients" / "rust"


# A cold cargo build (every crate from the registry) on 2 shared cores takes minutes: more than the default 300 s.
@pytest.mark.timeout(1200)
def test_rust_walk(walk_stack: StackProcess, peer: ChatPeer, upload_file: Path) -> None:
    require_toolchain("Rust", "cargo")
    build(["cargo", "build", "--release", "--locked"], CRATE)  # build.rs runs protoc (protoc-bin-vendored)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or CRATE / "target")
    summary = run_walk(walk_stack, peer, upload_file, [str(target / "release" / "walk")], ROOT,
                       language="rust")
    check_walk(walk_stack, peer, upload_file, summary)
