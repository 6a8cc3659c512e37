"""The native API (mnist.v1.MnistService): proto in, call the core, proto out."""

from __future__ import annotations

from typing import Any

import grpc

from mnist_serving.contract import IMAGE_SIDE, INPUT_NAME, NUM_CLASSES, OUTPUTS
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb

from ..core import CLASS_LABELS, InferenceCore
from ..feedback import FeedbackLabel
from .rpc import Handlers, RpcBinding

PROBABILITIES, CLASSES = OUTPUTS
SERVICE = pb.DESCRIPTOR.services_by_name["MnistService"]

DTYPE_NAMES: dict[int, str] = {pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_FLOAT32: "float32"}
_INPUTS = [
    pb.TensorSpec(name=INPUT_NAME, dtype=dtype, shape=shape)
    for dtype in (pb.DATA_TYPE_UINT8, pb.DATA_TYPE_FLOAT32)
    for shape in ([-1, IMAGE_SIDE, IMAGE_SIDE], [-1, IMAGE_SIDE * IMAGE_SIDE])
]
_OUTPUTS = [
    pb.TensorSpec(name=PROBABILITIES, dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, NUM_CLASSES]),
    pb.TensorSpec(name=CLASSES, dtype=pb.DATA_TYPE_INT64, shape=[-1]),
]


def handlers(core: InferenceCore, rpc: RpcBinding) -> Handlers:
    return [rpc.service_handler(SERVICE, "native", MnistServicer(core))]


def dtype_name(dtype: int) -> str:
    """The core's name for an accepted dtype; any other value (an enum number this proto
    does not define included) is named for the error message."""
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    try:
        return str(pb.DataType.Name(dtype))
    except ValueError:
        return f"DataType {dtype} (not a value of mnist.v1.DataType)"


class MnistServicer:
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        images = request.images
        answer = await self.core.predict(
            model_name=request.model_spec.name,
            version=request.model_spec.version,
            dtype=dtype_name(images.dtype),
            shape=images.shape,
            content=images.content,
            time_remaining=context.time_remaining(),
        )
        probabilities = answer.prediction.probabilities
        classes = answer.prediction.classes
        # Filled in place: building sub-messages first and passing them in copies each one.
        response = pb.PredictResponse()
        response.model_spec.name = answer.model_name
        response.model_spec.version = answer.version
        tensor = response.probabilities
        tensor.dtype = pb.DATA_TYPE_FLOAT32
        tensor.shape[:] = probabilities.shape
        tensor.content = probabilities.astype("<f4", copy=False).tobytes()
        tensor = response.classes
        tensor.dtype = pb.DATA_TYPE_INT64
        tensor.shape[:] = classes.shape
        tensor.content = classes.astype("<i8", copy=False).tobytes()
        return response

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelMetadataResponse:
        versions = self.core.versions(request.name)
        return pb.GetModelMetadataResponse(
            name=self.core.model_name,
            versions=[
                pb.VersionInfo(
                    version=v.version,
                    test_accuracy=float(v.report.get("test_accuracy") or 0.0),
                    test_loss=float(v.report.get("test_loss") or 0.0),
                    trained_at=str(v.report.get("trained_at") or ""),
                    architecture=str(v.report.get("architecture") or ""),
                    runtime=v.runtime,
                )
                for v in versions
            ],
            inputs=_INPUTS,
            outputs=_OUTPUTS,
            class_labels=CLASS_LABELS,
            max_images_per_request=self.core.settings.max_images_per_request,
        )

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.FeedbackResponse:
        outcome = self.core.feedback(
            [FeedbackLabel(item.request_id, item.index, item.label) for item in request.labels]
        )
        return pb.FeedbackResponse(
            accepted=outcome.accepted,
            unknown=outcome.unknown,
            duplicate=outcome.duplicate,
            unknown_indices=outcome.unknown_indices,
        )
