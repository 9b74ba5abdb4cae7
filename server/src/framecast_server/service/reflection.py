"""The descriptor pool server reflection answers from.

protobuf's default pool holds framecast.v1, health and reflection, but not the Open Inference
Protocol's messages: those live in a pool of their own (see scripts/generate_protos.py), so
that Triton's client can share a process with Framecast. Reflection takes one pool, so it gets
a pool holding every served file.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2


def reflection_pool(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A pool with ``files``, health and reflection, each after the files it imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in (*files, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool
