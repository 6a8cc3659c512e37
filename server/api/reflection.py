"""The descriptor pool that server reflection describes the served services from.

The services live in two pools: this project's own API, health and reflection in
protobuf's default pool, the copies of other projects' protos (TensorFlow Serving's, the
Open Inference Protocol's) in the private pool of protos/_pool.py. grpc_reflection reads
one pool, so it gets a pool of its own holding each served service's file and, before it,
every file that file imports, copied from whichever pool the service came from. Whatever
service app.py hands over is covered, so a new API needs no change here.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor


def reflection_pool(services: Iterable[ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A new pool with the files that define `services` and all their imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a pool takes a file only after its imports
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for service in services:
        add(service.file)
    return pool
