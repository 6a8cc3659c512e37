"""The asyncio client over grpc.aio: the same calls as MnistClient, awaitable.

Create it inside a running event loop (`async with AsyncMnistClient(target) as client:`);
many `predict` calls may be in flight at once on its one channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2, predict_pb2_grpc

from .client import (
    DEFAULT_MAX_IMAGES_PER_REQUEST,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    SERVICE_NAME,
    RetryPolicy,
    channel_options,
    check_settings,
    predict_request,
    status_name,
)
from .codec import Prediction, as_batch, decode_prediction
from .errors import from_rpc_error
from .metadata import ModelMetadata


class AsyncMnistClient:
    """See MnistClient for the parameters and semantics."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST,
        retry: RetryPolicy = DEFAULT_RETRY,
        model_name: str = "",
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        check_settings(timeout, max_images_per_request)
        self.target = target
        self.timeout = timeout
        self.max_images_per_request = max_images_per_request
        self.model_name = model_name
        self.wait_for_ready = wait_for_ready
        opts = channel_options(max_images_per_request, retry, options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        self._stub = predict_pb2_grpc.MnistServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def predict(
        self,
        images: npt.ArrayLike,
        *,
        model_version: int = 0,
        timeout: float | None = None,
    ) -> Prediction:
        batch = as_batch(images)
        parts: list[Prediction] = []
        version = model_version
        for start in range(0, len(batch), self.max_images_per_request):
            chunk = batch[start : start + self.max_images_per_request]
            request = predict_request(chunk, self.model_name, version)
            try:
                response = await self._stub.Predict(
                    request,
                    timeout=self.timeout if timeout is None else timeout,
                    wait_for_ready=self.wait_for_ready,
                )
            except grpc.RpcError as error:
                raise from_rpc_error(error) from error
            parts.append(decode_prediction(response, len(chunk)))
            version = version or parts[-1].model_version
        return Prediction.concatenate(parts)

    async def metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        request = predict_pb2.GetModelMetadataRequest(name=self.model_name)
        try:
            response = await self._stub.GetModelMetadata(
                request,
                timeout=self.timeout if timeout is None else timeout,
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return ModelMetadata.from_proto(response)

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._health.Check(
                request, timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return status_name(response.status)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncMnistClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
