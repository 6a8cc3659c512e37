"""TensorFlow Serving's gRPC API on the native port, for clients written against TF Serving.

tensorflow.serving.PredictionService (Predict, GetModelMetadata) and ModelService
(GetModelStatus): proto in, the same InferenceCore as the native API, proto out. Classify,
Regress, MultiInference and HandleReloadConfigRequest answer UNIMPLEMENTED (api/rpc.py, for
methods a servicer lacks).

The messages are this project's wire-compatible subset of TensorFlow Serving's and
TensorFlow's public protos (protos/tensorflow_serving/, protos/tensorflow/: same packages,
message names and field numbers, compiled into the private descriptor pool), so neither
tensorflow nor tensorflow-serving-api needs to be installed, and a client built on the
originals cannot tell the difference. Tensors are filled field by field (dtype,
tensor_shape.dim, tensor_content).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from mnist_serving.contract import INPUT_NAME, OUTPUTS
from mnist_serving.protos.tensorflow.core.framework import tensor_pb2, types_pb2
from mnist_serving.protos.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
)

from ..core import InferenceCore, VersionReport
from ..errors import InvalidInput
from ..validation import ACCEPTED_SHAPES, check_shape, values_bytes
from . import tfserving_codec as codec
from .rpc import Handlers, RpcBinding

logger = logging.getLogger(__name__)

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
SERVICES = (PREDICTION_SERVICE, MODEL_SERVICE)
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)

TF_DTYPES = {"uint8": types_pb2.DT_UINT8, "float32": types_pb2.DT_FLOAT}  # core name -> TF's
SIGNATURE_DTYPES = {s: TF_DTYPES[dtype] for s, dtype in codec.SIGNATURE_DTYPES.items()}
CORE_DTYPES = {tf_dtype: name for name, tf_dtype in TF_DTYPES.items()}
# Where TensorFlow puts the elements of a tensor sent without tensor_content (uint8 too
# travels as int_val).
VALUE_FIELDS = {types_pb2.DT_UINT8: "int_val", types_pb2.DT_FLOAT: "float_val"}
METADATA_FIELDS = ("signature_def",)

TensorProto = tensor_pb2.TensorProto
API = "tfserving"

UNIMPLEMENTED = (
    "this server answers PredictionService/Predict, PredictionService/GetModelMetadata "
    "and ModelService/GetModelStatus"
)


def handlers(core: InferenceCore, rpc: RpcBinding) -> Handlers:
    return [
        rpc.service_handler(PREDICTION_SERVICE, API, PredictionServicer(core), UNIMPLEMENTED),
        rpc.service_handler(MODEL_SERVICE, API, ModelServicer(core), UNIMPLEMENTED),
    ]


class PredictionServicer:
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        signature = spec.signature_name or codec.DEFAULT_SIGNATURE
        outputs = chosen_outputs(request.output_filter)
        dtype, shape, content = images_for_core(request.inputs, signature)
        answer = await self.core.predict(
            model_name=spec.name,
            version=pinned_version(spec),
            dtype=dtype,
            shape=shape,
            content=content,
            time_remaining=context.time_remaining(),
        )
        response = predict_pb2.PredictResponse(
            model_spec=model_spec(answer.model_name, answer.version, signature)
        )
        prediction = answer.prediction
        if "probabilities" in outputs:
            fill_tensor(
                response.outputs["probabilities"], types_pb2.DT_FLOAT, prediction.probabilities
            )
        if "classes" in outputs:
            fill_tensor(response.outputs["classes"], types_pb2.DT_INT64, prediction.classes)
        return response

    async def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        check_metadata_fields(request.metadata_field)
        (version,) = chosen_versions(self.core, request.model_spec, newest_only=True)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in version.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=model_spec(self.core.model_name, version.version)
        )
        response.metadata["signature_def"].Pack(signature_map)
        return response


class ModelServicer:
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def GetModelStatus(
        self,
        request: get_model_status_pb2.GetModelStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> get_model_status_pb2.GetModelStatusResponse:
        versions = chosen_versions(self.core, request.model_spec, newest_only=False)
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[
                get_model_status_pb2.ModelVersionStatus(version=v.version, state=available)
                for v in versions
            ]
        )


# Translation: TF Serving's messages <-> the core's arguments.


def pinned_version(spec: model_pb2.ModelSpec) -> int:
    """The version model_spec pins, or 0 (the core's "newest") when it pins none."""
    if spec.WhichOneof("version_choice") == "version_label":
        raise codec.refuse_label(
            spec.version_label,
            "model_spec.version_label",
            "pin model_spec.version, or leave it unset for the newest",
        )
    if not spec.HasField("version"):
        return 0
    number = int(spec.version.value)
    return codec.version(number, str(number))


def chosen_versions(
    core: InferenceCore, spec: model_pb2.ModelSpec, *, newest_only: bool
) -> list[VersionReport]:
    """The version model_spec pins, else the newest (newest_only) or every loaded one."""
    return codec.chosen_versions(core, spec.name, pinned_version(spec), newest_only=newest_only)


def chosen_outputs(output_filter: Sequence[str]) -> set[str]:
    """The outputs to send: all of them when output_filter is empty."""
    unknown = sorted(set(output_filter) - set(OUTPUTS))
    if unknown:
        raise InvalidInput(
            f"output_filter names unknown outputs {unknown}; the outputs are {list(OUTPUTS)}"
        )
    return set(output_filter) or set(OUTPUTS)


def check_metadata_fields(fields: Sequence[str]) -> None:
    supported = f"this server supports {list(METADATA_FIELDS)}"
    if not fields:
        raise InvalidInput(f"metadata_field must name at least one field; {supported}")
    unknown = sorted(set(fields) - set(METADATA_FIELDS))
    if unknown:
        raise InvalidInput(f"metadata_field {unknown} is not supported; {supported}")


def images_for_core(inputs: Any, signature: str) -> tuple[str, list[int], bytes]:
    """The core's (dtype, shape, content) for the `images` input of `signature`."""
    expected = TF_DTYPES[codec.signature_dtype(signature)]
    if set(inputs) != {INPUT_NAME}:
        problems = [f"{INPUT_NAME!r} is missing"] if INPUT_NAME not in inputs else []
        extra = sorted(set(inputs) - {INPUT_NAME})
        if extra:
            problems.append(f"unexpected {extra}")
        raise InvalidInput(
            f"inputs must hold exactly one tensor, {INPUT_NAME!r}: " + "; ".join(problems)
        )
    tensor = inputs[INPUT_NAME]
    if tensor.dtype != expected:
        raise InvalidInput(dtype_mismatch(signature, expected, tensor.dtype))
    if tensor.tensor_shape.unknown_rank:
        raise InvalidInput(f"images needs a known shape: {ACCEPTED_SHAPES}")
    shape = list(check_shape([d.size for d in tensor.tensor_shape.dim]))
    return CORE_DTYPES[expected], shape, tensor_bytes(tensor, shape)


def tensor_bytes(tensor: TensorProto, shape: list[int]) -> bytes:
    """The elements as little-endian bytes: tensor_content as is, or the typed *_val field."""
    field = VALUE_FIELDS[tensor.dtype]
    values = getattr(tensor, field)
    if tensor.tensor_content:
        if len(values):
            raise InvalidInput(f"images carries both tensor_content and {field}; send one")
        return bytes(tensor.tensor_content)
    return values_bytes(
        values,
        CORE_DTYPES[tensor.dtype],
        shape,
        INPUT_NAME,
        where=f" in {field}",
        empty_hint=f"send them in tensor_content or {field}",
    )


def dtype_mismatch(signature: str, expected: int, got: int) -> str:
    message = (
        f"signature {signature!r} takes images of {dtype_name(expected)}, got {dtype_name(got)}"
    )
    other = [s for s, dtype in SIGNATURE_DTYPES.items() if dtype == got]
    if other:
        return f"{message}; use signature_name {other[0]!r} for {dtype_name(got)} images"
    accepted = " or ".join(dtype_name(d) for d in SIGNATURE_DTYPES.values())
    return f"{message}; send {accepted}"


def dtype_name(dtype: int) -> str:
    try:
        return str(types_pb2.DataType.Name(dtype))
    except ValueError:
        return f"data type {dtype}"


def model_spec(name: str, version: int, signature: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature)
    spec.version.value = version
    return spec


def fill_tensor(tensor: TensorProto, dtype: types_pb2.DataType, array: np.ndarray) -> None:
    tensor.dtype = dtype
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
