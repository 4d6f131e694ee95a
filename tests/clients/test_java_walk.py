"""The Java walk (clients/java): grpc-java stubs generated from protos/ by the protobuf Maven plugin."""

from __future__ import annotations

from pathlib import Path

from tests.clients.conftest import ChatPeer, build, check_walk, require_toolchain, run_walk
from tests.stack import ROOT, StackProcess

JAVA = ROOT / "clients" / "java"


def test_java_walk(walk_stack: StackProcess, peer: ChatPeer, upload_file: Path) -> None:
    require_toolchain("Java", "java", "mvn")
    # generate-sources runs protoc and protoc-gen-grpc-java (both from Maven Central) on ../../protos;
    # package shades the program and its dependencies into one runnable jar.
    build(["mvn", "-q", "-B", "package"], JAVA)
    summary = run_walk(walk_stack, peer, upload_file, ["java", "-jar", "target/sysdesign-walk.jar"], JAVA,
                       language="java")
    check_walk(walk_stack, peer, upload_file, summary)
