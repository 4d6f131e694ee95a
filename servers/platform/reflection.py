"""Server reflection as grpcurl, Postman and grpcui expect it: v1 and v1alpha, every symbol kind.

grpcio-reflection serves only ``grpc.reflection.v1alpha``, and its
``file_containing_symbol`` resolves what the descriptor pool's
``FindFileContainingSymbol`` finds: messages, enums, services, fields and
extensions, but not methods, so ``grpcurl describe pkg.Service.Method``
answered "Symbol not found". This module serves the same servicer under
``grpc.reflection.v1`` too (the two protocols are the same messages under two
package names, field for field, so the v1alpha messages read and write v1's
bytes unchanged) and resolves a method to the file of its service.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha._base import _file_descriptor_response

V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _v1_descriptor(pool: Any) -> None:
    """Adds grpc/reflection/v1/reflection.proto to the pool, so reflection can describe itself."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fdp.name, fdp.package = V1_FILE, "grpc.reflection.v1"
    fdp.ClearField("options")

    def rename(messages: Any) -> None:
        for msg in messages:
            for f in msg.field:
                if f.type_name.startswith(old):
                    f.type_name = new + f.type_name[len(old):]
            rename(msg.nested_type)

    rename(fdp.message_type)
    for svc in fdp.service:
        for m in svc.method:
            m.input_type = new + m.input_type[len(old):]
            m.output_type = new + m.output_type[len(old):]
    pool.AddSerializedFile(fdp.SerializeToString())


class SymbolReflectionServicer(ReflectionServicer):
    """grpcio-reflection's servicer, resolving method names as well."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        parent, _, leaf = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(parent)
        except KeyError:
            return response
        if leaf not in service.methods_by_name:
            return response
        return _file_descriptor_response(service.file, request)


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (and for reflection itself)."""
    pool = descriptor_pool.Default()
    _v1_descriptor(pool)
    servicer = SymbolReflectionServicer([*service_names, V1_SERVICE, V1ALPHA_SERVICE], pool=pool)
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }),))
