"""The Open Inference Protocol (KServe v2) over gRPC: inference.GRPCInferenceService.

Proto in, the same InferenceCore as the other APIs, proto out. The input travels in
raw_input_contents (what tritonclient sends) or typed in contents (uint_contents for
UINT8, fp32_contents for FP32); outputs always go back in raw_output_contents, which every
client of the protocol reads. ModelStreamInfer and Triton's config, statistics and
repository methods answer UNIMPLEMENTED (api/rpc.py).
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np

from mnist_serving.protos.inference import grpc_service_pb2 as pb

from ..core import InferenceCore
from ..errors import InvalidInput
from . import v2_codec as codec
from .rpc import service_handler

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
UNIMPLEMENTED = (
    "this server answers ServerLive, ServerReady, ModelReady, ServerMetadata, "
    "ModelMetadata and ModelInfer of inference.GRPCInferenceService"
)
# Where the typed contents of each accepted datatype live, and the numpy type that reads them.
CONTENT_FIELDS: dict[str, tuple[str, np.dtype[Any]]] = {
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "FP32": ("fp32_contents", np.dtype("<f4")),
}
# Output parameters asking for what this server does not do.
REFUSED_OUTPUT_PARAMETERS = ("classification", "shared_memory_region")

Context = grpc.aio.ServicerContext[Any, Any]


def handlers(core: InferenceCore) -> list[grpc.GenericRpcHandler[Any, Any]]:
    return [service_handler(SERVICE, "v2", InferenceServicer(core), UNIMPLEMENTED)]


class InferenceServicer:
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=codec.model_ready(self.core, request.name, request.version)
        )

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=codec.SERVER_NAME, version=codec.SERVER_VERSION, extensions=codec.EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        versions = codec.model_versions(self.core, request.name, request.version)
        return pb.ModelMetadataResponse(
            name=self.core.model_name,
            versions=[str(v) for v in versions],
            platform=codec.PLATFORM,
            inputs=[tensor_metadata(t) for t in codec.input_metadata()],
            outputs=[tensor_metadata(t) for t in codec.output_metadata()],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        self.core.versions(request.model_name)  # an unknown model is NOT_FOUND at once
        codec.check_parameters(request.parameters)
        outputs = codec.requested_outputs(requested_output_names(request.outputs))
        tensor = codec.one_input(list(request.inputs))
        dtype = codec.input_dtype(tensor.name, tensor.datatype)
        answer = await self.core.predict(
            model_name=request.model_name,
            version=codec.version_number(request.model_version),
            dtype=dtype,
            shape=tensor.shape,
            content=input_bytes(request, tensor),
            time_remaining=codec.earliest(
                context.time_remaining(),
                codec.timeout_seconds(parameter_value(request.parameters.get("timeout"))),
            ),
        )
        response = pb.ModelInferResponse(
            model_name=answer.model_name, model_version=str(answer.version), id=request.id
        )
        for name in outputs:
            array = codec.output_array(answer, name)
            response.outputs.add(
                name=name, datatype=codec.OUTPUT_DATATYPES[name], shape=array.shape
            )
            response.raw_output_contents.append(array.tobytes())
        return response


def tensor_metadata(tensor: codec.Tensor) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
    )


def requested_output_names(
    outputs: Any,  # repeated InferRequestedOutputTensor
) -> list[str]:
    for output in outputs:
        refused = sorted(set(output.parameters) & set(REFUSED_OUTPUT_PARAMETERS))
        if refused:
            raise InvalidInput(f"output {output.name!r}: parameters {refused} are not supported")
    return [output.name for output in outputs]


def parameter_value(parameter: pb.InferParameter | None) -> Any:
    if parameter is None:
        return None
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def input_bytes(
    request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor
) -> bytes:
    """The input's elements as little-endian bytes, from raw_input_contents or contents."""
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents holds {len(request.raw_input_contents)} entries; "
                "one input needs exactly one"
            )
        if tensor.HasField("contents"):
            raise InvalidInput("the input carries both contents and raw_input_contents; send one")
        return bytes(request.raw_input_contents[0])
    field, numpy_type = CONTENT_FIELDS[tensor.datatype]
    values = getattr(tensor.contents, field)
    needed = math.prod(tensor.shape)
    if needed >= 0 and len(values) != needed:  # a negative dim is the shape check's to report
        raise InvalidInput(
            f"input {tensor.name!r} carries {len(values)} values in contents.{field}; "
            f"shape {list(tensor.shape)} needs {needed}"
        )
    array = np.asarray(values, dtype=numpy_type)  # one call over the field, no Python loop
    if tensor.datatype == "UINT8":
        if array.size and array.max() > 255:
            raise InvalidInput(
                f"UINT8 pixels must be 0..255; contents.uint_contents holds {int(array.max())}"
            )
        array = array.astype(np.uint8)
    return bytes(array.tobytes())
