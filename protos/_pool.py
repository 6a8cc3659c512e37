"""The descriptor pool of our compiled copies of other projects' public protos.

protos/ holds wire-compatible copies of the public API protos this server speaks besides its
own (TensorFlow Serving's, the Open Inference Protocol's). Their generated code registers
them here rather than in protobuf's default pool: a process may also import the original
packages (tensorflow, tensorflow-serving-api, tritonclient), whose messages have the same
full names, and two definitions of one name in one pool refuse to load. The wire format
depends only on field numbers and types, so callers of the originals cannot tell.

The well-known types the copies import (Any, wrappers) are added first, as the default pool
knows them.
"""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()

for _module in (any_pb2, wrappers_pb2):
    _file = descriptor_pb2.FileDescriptorProto()
    _module.DESCRIPTOR.CopyToProto(_file)
    POOL.Add(_file)
