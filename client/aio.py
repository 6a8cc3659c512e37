"""The asyncio client over grpc.aio: the same calls as MnistClient, awaitable.

Create it inside a running event loop (`async with AsyncMnistClient(target) as client:`);
many `predict` calls may be in flight at once on its one channel (or its `connections`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2, predict_pb2_grpc

from .client import (
    SERVICE_NAME,
    ClientSettings,
    Priority,
    answered_by,
    predict_request,
    status_name,
)
from .codec import Prediction, as_batch, decode_prediction
from .errors import MnistError, from_rpc_error
from .feedback import (
    MAX_FEEDBACK_LABELS,
    FeedbackLabel,
    FeedbackResult,
    feedback_requests,
    partial_failure,
)
from .metadata import ModelMetadata


class AsyncMnistClient(ClientSettings):
    """See MnistClient for the parameters and semantics."""

    def _connect(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[list[tuple[str, Any]]],
    ) -> None:
        if credentials is None:
            self._channels = [grpc.aio.insecure_channel(target, options=o) for o in options]
        else:
            self._channels = [
                grpc.aio.secure_channel(target, credentials, options=o) for o in options
            ]
        self._stubs = [predict_pb2_grpc.MnistServiceStub(c) for c in self._channels]
        self._healths = [health_pb2_grpc.HealthStub(c) for c in self._channels]

    async def predict(
        self,
        images: npt.ArrayLike,
        *,
        model_version: int = 0,
        timeout: float | None = None,
        priority: Priority | None = None,
        request_id: str | None = None,
    ) -> Prediction:
        batch = as_batch(images)
        metadata = self._metadata(priority, request_id)
        parts: list[Prediction] = []
        version = model_version
        for start in range(0, len(batch), self.max_images_per_request):
            chunk = batch[start : start + self.max_images_per_request]
            request = predict_request(chunk, self.model_name, version)
            try:
                call = self._next(self._stubs).Predict(
                    request,
                    timeout=self._timeout(timeout),
                    metadata=metadata,
                    wait_for_ready=self.wait_for_ready,
                )
                response = await call
                trailing = await call.trailing_metadata()
            except grpc.RpcError as error:
                raise from_rpc_error(error) from error
            parts.append(answered_by(decode_prediction(response, len(chunk)), trailing))
            version = version or parts[-1].model_version
        return Prediction.concatenate(parts)

    async def feedback(
        self,
        labels: Iterable[FeedbackLabel],
        *,
        timeout: float | None = None,
        chunk_size: int = MAX_FEEDBACK_LABELS,
    ) -> FeedbackResult:
        """See MnistClient.feedback; the chunks are sent one after the other."""
        total = FeedbackResult()
        try:
            for offset, request in feedback_requests(labels, chunk_size):
                response = await self._next(self._stubs).Feedback(
                    request,
                    timeout=self._timeout(timeout),
                    metadata=self._metadata(),
                    wait_for_ready=self.wait_for_ready,
                )
                total += FeedbackResult.from_proto(response, offset)
        except grpc.RpcError as error:
            raise partial_failure(from_rpc_error(error), total) from error
        except MnistError as error:
            raise partial_failure(error, total) from None
        return total

    async def metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        request = predict_pb2.GetModelMetadataRequest(name=self.model_name)
        try:
            response = await self._next(self._stubs).GetModelMetadata(
                request,
                timeout=self._timeout(timeout),
                metadata=self._metadata(),
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return ModelMetadata.from_proto(response)

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._next(self._healths).Check(
                request, timeout=self._timeout(timeout)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        return status_name(response.status)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close(grace=None) for channel in self._channels))

    async def __aenter__(self) -> AsyncMnistClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
