"""The asyncio client over grpc.aio: the same calls as MnistClient, awaitable.

Create it inside a running event loop (`async with AsyncMnistClient(target) as client:`);
many `predict` calls may be in flight at once on its one channel (or its `connections`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

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

logger = logging.getLogger(__name__)
R = TypeVar("R")


class AsyncMnistClient(ClientSettings):
    """See MnistClient for the parameters and semantics."""

    def _connect(
        self,
        targets: tuple[str, ...],
        credentials: grpc.ChannelCredentials | None,
        options: list[list[tuple[str, Any]]],
    ) -> None:
        def channel(target: str, option: list[tuple[str, Any]]) -> grpc.aio.Channel:
            if credentials is None:
                return grpc.aio.insecure_channel(target, options=option)
            return grpc.aio.secure_channel(target, credentials, options=option)

        per_target = [[channel(t, o) for o in options] for t in targets]
        self._channels = [c for channels in per_target for c in channels]
        self._stubs = [[predict_pb2_grpc.MnistServiceStub(c) for c in cs] for cs in per_target]
        self._healths = [[health_pb2_grpc.HealthStub(c) for c in cs] for cs in per_target]

    async def _call(
        self, attempt: Callable[[int, float | None], Awaitable[R]], timeout: float | None
    ) -> R:
        """See MnistClient._call."""
        error: MnistError | None = None
        for planned in self._router.attempts(self._timeout(timeout)):
            started = self._router.started(planned.index)
            try:
                result = await attempt(planned.index, planned.timeout)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if self._router.finished(planned.index, started, error) and not planned.last:
                    logger.debug(
                        "%s: %s; trying another target", self.targets[planned.index], error
                    )
                    continue
                raise error from rpc_error
            except BaseException:
                self._router.abandoned(planned.index)
                raise
            self._router.finished(planned.index, started, None)
            return result
        if error is None:
            raise AssertionError("a call makes at least one attempt")
        raise error

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

            async def attempt(
                index: int,
                deadline: float | None,
                request: predict_pb2.PredictRequest = request,
            ) -> tuple[predict_pb2.PredictResponse, Any]:
                call = self._next(self._stubs[index]).Predict(
                    request,
                    timeout=deadline,
                    metadata=metadata,
                    wait_for_ready=self.wait_for_ready,
                )
                return await call, await call.trailing_metadata()

            response, trailing = await self._call(attempt, timeout)
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
                response = await self._unary(lambda stub: stub.Feedback, request, timeout)
                total += FeedbackResult.from_proto(response, offset)
        except grpc.RpcError as error:
            raise partial_failure(from_rpc_error(error), total) from error
        except MnistError as error:
            raise partial_failure(error, total) from None
        return total

    async def metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        request = predict_pb2.GetModelMetadataRequest(name=self.model_name)
        response = await self._unary(lambda stub: stub.GetModelMetadata, request, timeout)
        return ModelMetadata.from_proto(response)

    async def _unary(
        self, method: Callable[[predict_pb2_grpc.MnistServiceStub], Any], request: Any,
        timeout: float | None,
    ) -> Any:  # fmt: skip
        """See MnistClient._unary."""

        async def attempt(index: int, deadline: float | None) -> Any:
            return await method(self._next(self._stubs[index]))(
                request,
                timeout=deadline,
                metadata=self._metadata(),
                wait_for_ready=self.wait_for_ready,
            )

        return await self._call(attempt, timeout)

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)

        async def attempt(index: int, deadline: float | None) -> health_pb2.HealthCheckResponse:
            return await self._next(self._healths[index]).Check(request, timeout=deadline)

        response = await self._call(attempt, timeout)
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
