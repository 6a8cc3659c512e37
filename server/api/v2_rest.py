"""The Open Inference Protocol (KServe v2) over HTTP/REST, with its binary tensor data
extension (what tritonclient[http] sends and asks for by default).

GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}] and .../ready;
POST .../infer. Tensors travel as JSON ("data": flat or nested numbers), or as binary: an
input with parameters.binary_data_size is read from the bytes after the JSON header, whose
length the Inference-Header-Content-Length header gives; an output asked for with
parameters.binary_data (or every output, with the request's binary_data_output) goes back
the same way. Deadline: the request's parameters.timeout (microseconds, as Triton reads
it) and/or the X-Request-Timeout-Ms header; the tighter one applies.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core import InferenceCore
from ..errors import InvalidInput
from ..validation import decimal
from . import rest
from . import v2_codec as codec

API = "v2_rest"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"


def routes(core: InferenceCore, binding: rest.RestBinding) -> list[web.RouteDef]:
    api = V2Rest(core)
    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    routes = [
        web.get("/v2/health/live", binding.counted(API, "ServerLive", api.live)),
        web.get("/v2/health/ready", binding.counted(API, "ServerReady", api.ready)),
        web.get("/v2", binding.counted(API, "ServerMetadata", api.server_metadata)),
    ]
    for path in (model, version):
        routes += [
            web.get(path, binding.counted(API, "ModelMetadata", api.model_metadata)),
            web.get(path + "/ready", binding.counted(API, "ModelReady", api.model_ready)),
            web.post(path + "/infer", binding.counted(API, "ModelInfer", api.infer)),
        ]
    return routes


class V2Rest:
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def live(self, request: web.Request) -> web.Response:
        return rest.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        # 503 while not ready (draining): any 4xx/5xx reads as "not ready" to the protocol's
        # clients and to Kubernetes' httpGet probes.
        ready = self.core.ready
        return rest.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return rest.json_response(
            {
                "name": codec.SERVER_NAME,
                "version": codec.SERVER_VERSION,
                "extensions": list(codec.EXTENSIONS),
            }
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        versions = codec.model_versions(self.core, name, version)
        return rest.json_response(
            {
                "name": self.core.model_name,
                "versions": [str(v) for v in versions],
                "platform": codec.PLATFORM,
                "inputs": [tensor_metadata(t) for t in codec.input_metadata()],
                "outputs": [tensor_metadata(t) for t in codec.output_metadata()],
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = codec.model_ready(self.core, name, version)
        return rest.json_response(
            {"name": self.core.model_name, "ready": ready}, status=200 if ready else 503
        )

    async def infer(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.core.versions(name)  # an unknown model is 404 before the body is read
        body, binary = split_body(request, await rest.read_body(request))
        if "id" in body and not isinstance(body["id"], str):  # it is echoed in the answer
            raise InvalidInput(f'"id" must be a string, got {type(body["id"]).__name__}')
        parameters = mapping(body.get("parameters", {}), "parameters")
        binary_by_default = parameters.get("binary_data_output") is True
        wanted = [mapping(o, "each output") for o in list_of(body.get("outputs", []), "outputs")]
        as_binary = {
            str(o.get("name")): mapping(o.get("parameters", {}), "output parameters").get(
                "binary_data", binary_by_default
            )
            is True
            for o in wanted
        }
        answer = await codec.infer(
            self.core,
            codec.InferRequest(
                model_name=name,
                model_version=request.match_info.get("version", ""),
                input=infer_input(body.get("inputs"), binary),
                outputs=[str(o.get("name")) for o in wanted],
                parameters=parameters,
                time_remaining=rest.time_remaining(request),
            ),
        )
        header: dict[str, Any] = {
            "model_name": answer.model_name,
            "model_version": answer.model_version,
            "outputs": [],
        }
        if "id" in body:
            header["id"] = body["id"]
        chunks = []
        for output in answer.outputs:
            described: dict[str, Any] = {
                "name": output.name,
                "datatype": output.datatype,
                "shape": list(output.array.shape),
            }
            if as_binary.get(output.name, binary_by_default):
                data = output.array.tobytes()
                described["parameters"] = {"binary_data_size": len(data)}
                chunks.append(data)
            else:
                described["data"] = output.array.ravel().tolist()
            header["outputs"].append(described)
        if not chunks:
            return rest.json_response(header)
        json_bytes = rest.json_bytes(header)
        return web.Response(
            body=b"".join([json_bytes, *chunks]),
            content_type=BINARY,
            headers={HEADER_LENGTH: str(len(json_bytes))},
        )


def tensor_metadata(tensor: codec.Tensor) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}


def split_body(request: web.Request, body: bytes) -> tuple[dict[str, Any], bytes]:
    """(the JSON header, the binary data after it) of an infer request."""
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        return rest.parse_json(body), b""
    size = decimal(length)
    if size is None or size > len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} is {length!r}; it must be the JSON header's byte length, "
            f"at most the body's {len(body)} bytes"
        )
    return rest.parse_json(body[:size], "the JSON header"), body[size:]


def infer_input(inputs: Any, binary: bytes) -> codec.InferInput:
    """The one input, its elements from the binary data or from "data"."""
    tensor = mapping(codec.one_input(list_of(inputs, "inputs")), "the input")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidInput(f"the input's shape must be a list of integers, got {shape!r}")
    name, datatype = str(tensor.get("name")), str(tensor.get("datatype"))
    parameters = mapping(tensor.get("parameters", {}), "the input's parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise InvalidInput("shared memory inputs are not supported; send data or binary data")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise InvalidInput(
                f"{len(binary)} bytes follow the JSON header, but the input has no "
                "binary_data_size parameter"
            )
        if "data" not in tensor:
            raise InvalidInput('the input needs "data", or binary data (binary_data_size)')
        return codec.InferInput(name, datatype, shape, values=tensor["data"])
    if "data" in tensor:
        raise InvalidInput("the input carries both data and binary_data_size; send one")
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise InvalidInput(
            f"binary_data_size is {size!r}, but {len(binary)} bytes follow the JSON header"
        )
    return codec.InferInput(name, datatype, shape, raw=binary)


def mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def list_of(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f'"{what}" must be a JSON list, got {type(value).__name__}')
    return value
