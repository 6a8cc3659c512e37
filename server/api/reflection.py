"""gRPC reflection over both descriptor pools.

The services compiled from our copies of public protos (inference.GRPCInferenceService)
live in the private pool of protos/_pool.py; the others (mnist.v1, TF Serving, health)
in protobuf's default pool. grpc_reflection reads one pool, so it gets this view, which
looks a name up in the default pool first and then in the private one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

from mnist_serving.protos import _pool


class BothPools:
    """The lookups grpc_reflection makes, answered from either pool."""

    def __init__(self) -> None:
        self._pools = (descriptor_pool.Default(), _pool.POOL)

    def _first(self, method: str, *args: Any) -> Any:
        for pool in self._pools:
            try:
                return getattr(pool, method)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else method)

    def FindFileByName(self, name: str) -> Any:
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return message.file.pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        return message.file.pool.FindAllExtensions(message)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    names = (*service_names, reflection.SERVICE_NAME)
    pool: Any = BothPools()  # duck-typed: the stubs ask for a DescriptorPool
    reflection.enable_server_reflection(names, server, pool=pool)
