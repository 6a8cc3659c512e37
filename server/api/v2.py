"""The Open Inference Protocol (KServe v2) over gRPC: inference.GRPCInferenceService.

Proto in, the same InferenceCore as the other APIs, proto out. The input travels in
raw_input_contents (what tritonclient sends) or typed in contents (uint_contents for
UINT8, fp32_contents for FP32); outputs always go back in raw_output_contents, which every
client of the protocol reads. ModelStreamInfer and Triton's config, statistics and
repository methods answer UNIMPLEMENTED (api/rpc.py).
"""

from __future__ import annotations

from typing import Any

import grpc

from mnist_serving.protos.inference import grpc_service_pb2 as pb

from ..core import InferenceCore
from ..errors import InvalidInput
from . import v2_codec as codec
from .rpc import Handlers, RpcBinding

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
UNIMPLEMENTED = (
    "this server answers ServerLive, ServerReady, ModelReady, ServerMetadata, "
    "ModelMetadata and ModelInfer of inference.GRPCInferenceService"
)
# Where the typed contents of each accepted datatype live.
CONTENT_FIELDS = {"UINT8": "uint_contents", "FP32": "fp32_contents"}
# Output parameters asking for what this server does not do.
REFUSED_OUTPUT_PARAMETERS = ("classification", "shared_memory_region")

Context = grpc.aio.ServicerContext[Any, Any]


def handlers(core: InferenceCore, rpc: RpcBinding) -> Handlers:
    return [rpc.service_handler(SERVICE, "v2", InferenceServicer(core), UNIMPLEMENTED)]


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
        answer = await codec.infer(self.core, infer_request(request, context.time_remaining()))
        response = pb.ModelInferResponse(
            model_name=answer.model_name, model_version=answer.model_version, id=request.id
        )
        for output in answer.outputs:
            response.outputs.add(
                name=output.name, datatype=output.datatype, shape=output.array.shape
            )
            response.raw_output_contents.append(output.array.tobytes())
        return response


def infer_request(
    request: pb.ModelInferRequest, time_remaining: float | None
) -> codec.InferRequest:
    return codec.InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        input=infer_input(request),
        outputs=requested_output_names(request.outputs),
        parameters={
            name: parameter_value(parameter) for name, parameter in request.parameters.items()
        },
        time_remaining=time_remaining,
    )


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


def infer_input(request: pb.ModelInferRequest) -> codec.InferInput:
    """The one input, its elements from raw_input_contents or typed in contents."""
    tensor = codec.one_input(list(request.inputs))
    shape = list(tensor.shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents holds {len(request.raw_input_contents)} entries; "
                "one input needs exactly one"
            )
        if tensor.HasField("contents"):
            raise InvalidInput("the input carries both contents and raw_input_contents; send one")
        raw = bytes(request.raw_input_contents[0])
        return codec.InferInput(tensor.name, tensor.datatype, shape, raw=raw)
    field = CONTENT_FIELDS.get(tensor.datatype, "")  # an unknown datatype is the codec's
    return codec.InferInput(
        tensor.name,
        tensor.datatype,
        shape,
        values=getattr(tensor.contents, field) if field else (),
        what=f"input {tensor.name!r}",
        where=f" in contents.{field}",
    )
