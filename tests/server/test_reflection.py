"""Reflection answers for our services and their files only, as v1 and v1alpha."""

from __future__ import annotations

import grpc
import pytest
from framecast_server.process.background import BackgroundServer
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

# v1 and v1alpha are the same messages on the wire; only the service path differs.
PATHS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


def ask(address: str, version: str, **request: str) -> rpb.ServerReflectionResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            PATHS[version],
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        (reply,) = call(iter([rpb.ServerReflectionRequest(**request)]), timeout=10)
    return reply


@pytest.mark.parametrize("version", list(PATHS))
def test_reflection_lists_our_services_and_describes_only_our_files(
    onnx_server: BackgroundServer, version: str
) -> None:
    address = onnx_server.address
    listed = ask(address, version, list_services="").list_services_response.service
    assert {s.name for s in listed} == {
        "framecast.v1.Classifier",
        "framecast.v1.Admin",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    symbols = (
        "framecast.v1.Classifier",
        "inference.GRPCInferenceService",
        "grpc.reflection.v1.ServerReflection",
    )
    for symbol in symbols:
        reply = ask(address, version, file_containing_symbol=symbol)
        (raw,) = reply.file_descriptor_response.file_descriptor_proto
        assert (
            symbol.rsplit(".", 1)[0] == descriptor_pb2.FileDescriptorProto.FromString(raw).package
        )
    for foreign in ("onnx/onnx-ml.proto", "google/protobuf/descriptor.proto"):
        reply = ask(address, version, file_by_filename=foreign)
        assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], foreign
