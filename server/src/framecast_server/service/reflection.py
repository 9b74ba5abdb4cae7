"""Server reflection (``grpcurl list``) for our services only, as v1 and v1alpha.

grpcio-reflection serves ``grpc.reflection.v1alpha`` from the process's default descriptor
pool, which holds every .proto any library loaded (ONNX's among them). Ours answers from a
pool of our files and their dependencies alone, and serves ``grpc.reflection.v1`` too: the two
versions are the same messages on the wire under another package name, so one servicer
answers both, and the pool describes both. The files may come from any pool: the Open
Inference Protocol's messages live in a pool of their own (see scripts/generate_protos.py), so
that Triton's client can share a process with Framecast.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from .handlers import guarded

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection file: v1alpha's descriptor under the v1 package and file name."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1_PACKAGE
    proto.ClearField("options")
    return proto


def reflection_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding ``files``, their dependencies and both reflection files."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in (*files, reflection_pb2.DESCRIPTOR):
        add(file)
    pool.Add(_v1_file())
    return pool


def add_reflection(server: grpc.aio.Server, files: Iterable[FileDescriptor]) -> None:
    """Serve reflection v1 and v1alpha for the services of ``files`` (and reflection itself)."""
    files = tuple(files)
    names = [service.full_name for file in files for service in file.services_by_name.values()]
    names += [reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = ReflectionServicer(names, pool=reflection_pool(files))
    registrar = guarded(server)  # malformed requests get INVALID_ARGUMENT
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, registrar)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    registrar.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),)
    )
