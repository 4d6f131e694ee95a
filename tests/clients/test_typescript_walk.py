"""The TypeScript walk (clients/typescript): @grpc/grpc-js with ts-proto stubs generated from protos/ by buf."""

from __future__ import annotations

from pathlib import Path

from tests.clients.conftest import ChatPeer, build, check_walk, require_toolchain, run_walk
from tests.stack import ROOT, StackProcess

CLIENT = ROOT / "clients" / "typescript"


def test_typescript_walk(walk_stack: StackProcess, peer: ChatPeer, upload_file: Path) -> None:
    require_toolchain("TypeScript", "node", "npm")
    build(["npm", "ci", "--no-audit", "--no-fund"], CLIENT)
    build(["npm", "run", "build"], CLIENT)  # buf generate (protos/ + google.rpc) with ts-proto, then tsc
    summary = run_walk(walk_stack, peer, upload_file, ["node", "dist/walk.js"], CLIENT, language="typescript")
    check_walk(walk_stack, peer, upload_file, summary)
