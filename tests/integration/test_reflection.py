"""Server reflection as grpcurl expects it: v1 and v1alpha, and every kind of symbol resolved.

grpcurl (built from the Go module proxy, v1.9: it asks v1 first) describes a
method, an enum value and the reflection service itself; a raw v1 client then
resolves every service, method, message, field, enum and enum value of every
proto in the project to the file that declares it.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as refl

from tests.conftest import skip_or_fail
from tests.stack import StackProcess

pytestmark = [pytest.mark.redis_cluster]

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def grpcurl_exe() -> str:
    from clients import gotools

    why = gotools.missing_go(gotools.TOOLS["grpcurl"])
    if why:
        skip_or_fail("grpcurl tests", why)
    return str(gotools.build("grpcurl"))


def grpcurl(stack: StackProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_exe(), "-plaintext", stack.grpc_addr, *args],
                          capture_output=True, text=True, timeout=60)


def project_files() -> list[FileDescriptor]:
    import sysdesign

    files = []
    for mod in pkgutil.walk_packages(sysdesign.__path__, "sysdesign."):
        if mod.name.endswith("_pb2"):
            files.append(importlib.import_module(mod.name).DESCRIPTOR)
    assert len(files) >= 5, files
    return files


def symbols(fd: FileDescriptor) -> Iterator[str]:
    """Every symbol a reflection client may ask for, fully qualified."""
    def enum(e: EnumDescriptor) -> Iterator[str]:
        yield e.full_name
        scope = e.full_name.rpartition(".")[0]  # enum values are siblings of their enum
        for v in e.values:
            yield f"{scope}.{v.name}"

    def message(m: Descriptor) -> Iterator[str]:
        yield m.full_name
        for f in m.fields:
            yield f.full_name
        for e in m.enum_types:
            yield from enum(e)
        for n in m.nested_types:
            yield from message(n)

    for m in fd.message_types_by_name.values():
        yield from message(m)
    for e in fd.enum_types_by_name.values():
        yield from enum(e)
    for s in fd.services_by_name.values():
        yield s.full_name
        for meth in s.methods:
            yield meth.full_name


def v1_ask(stack: StackProcess, requests: list[Any]) -> list[Any]:
    """Requests over grpc.reflection.v1 (the same messages as v1alpha, field for field)."""
    with stack.channel() as ch:
        call = ch.stream_stream(V1_METHOD, request_serializer=refl.ServerReflectionRequest.SerializeToString,
                                response_deserializer=refl.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=60))


def test_grpcurl_lists_both_reflection_versions_and_describes_a_method(stack: StackProcess) -> None:
    listed = grpcurl(stack, "list")
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            "sysdesign.chat.v1.ChatService", "grpc.health.v1.Health"} <= names, names

    method = grpcurl(stack, "describe", "sysdesign.chat.v1.ChatService.Connect")
    assert method.returncode == 0, method.stderr
    assert "sysdesign.chat.v1.ChatService.Connect is a method" in method.stdout
    assert "stream .sysdesign.chat.v1.ClientEvent" in method.stdout

    value = grpcurl(stack, "describe", "sysdesign.chat.v1.RECEIPT_STATUS_READ")
    assert value.returncode == 0 and "is an enum value" in value.stdout, value.stdout + value.stderr

    itself = grpcurl(stack, "describe", "grpc.reflection.v1.ServerReflection")
    assert itself.returncode == 0 and "rpc ServerReflectionInfo" in itself.stdout, itself.stderr

    missing = grpcurl(stack, "describe", "sysdesign.chat.v1.ChatService.NoSuchMethod")
    assert missing.returncode != 0 and "not found" in missing.stderr.lower(), missing.stderr


def test_v1_resolves_every_symbol_of_every_proto_to_its_file(stack: StackProcess) -> None:
    asked: list[tuple[str, str]] = [(sym, fd.name) for fd in project_files() for sym in symbols(fd)]
    assert len(asked) > 300, len(asked)
    responses = v1_ask(stack, [refl.ServerReflectionRequest(file_containing_symbol=s) for s, _ in asked])
    assert len(responses) == len(asked)
    wrong = []
    for (sym, file), r in zip(asked, responses, strict=True):
        if r.HasField("error_response"):
            wrong.append(f"{sym}: {r.error_response.error_message}")
            continue
        first = descriptor_pb2.FileDescriptorProto.FromString(r.file_descriptor_response.file_descriptor_proto[0])
        if first.name != file:
            wrong.append(f"{sym}: {first.name} instead of {file}")
    assert not wrong, wrong[:20]

    unknown = v1_ask(stack, [refl.ServerReflectionRequest(file_containing_symbol="sysdesign.nope.v1.Nothing")])
    assert unknown[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
