"""TensorFlow Serving's REST API on the HTTP port, for clients written against TF Serving.

POST /v1/models/{name}[/versions/{v}]:predict with the row ("instances") or columnar
("inputs") format, GET /v1/models/{name}[/versions/{v}] (status) and .../metadata; errors
as {"error": "..."}. JSON in, the same InferenceCore as every API, JSON out. :classify,
:regress and version labels answer as the gRPC binding does (501, 400).
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from google.protobuf import json_format

from mnist_serving.contract import INPUT_NAME, OUTPUTS

from ..core import Answer, InferenceCore
from ..errors import InvalidInput, ModelNotFound, NotImplementedHere
from ..validation import decimal, number_array, values_bytes
from . import rest
from . import tfserving_codec as codec

API = "tfserving_rest"
# name, then /versions/N or /labels/L, then :verb or /metadata
PATH = re.compile(
    r"(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<tail>:[a-z]+|/metadata)?"
)


def routes(core: InferenceCore, binding: rest.RestBinding) -> list[web.RouteDef]:
    api = TfServingRest(core, binding)
    # A path ending in :verb takes POST, any other GET: the router answers the other
    # method 405 (with Allow), as it does everywhere else.
    return [
        web.post("/v1/models/{path:[^:]+:[^:/]+}", binding.counted(API, "Predict", api.post)),
        web.get("/v1/models/{path:[^:]+}", api.get),
    ]


class TfServingRest:
    def __init__(self, core: InferenceCore, binding: rest.RestBinding) -> None:
        self.core = core
        # GET answers two RPCs' worth: counted under the one it stands for.
        self._status = binding.counted(API, "GetModelStatus", self.status)
        self._metadata = binding.counted(API, "GetModelMetadata", self.metadata)

    async def post(self, request: web.Request) -> web.Response:
        name, version, tail = model_path(request)
        if tail != ":predict":
            raise NotImplementedHere(
                f"{tail or 'POST /v1/models/{name}'} is not served here; this server answers "
                ":predict, and GET for model status and /metadata"
            )
        self.core.versions(name)  # an unknown model is 404 at once
        body = rest.parse_json(await rest.read_body(request))
        dtype = codec.signature_dtype(body.get("signature_name", codec.DEFAULT_SIGNATURE))
        row_format, images = request_images(body)
        array = number_array(images, INPUT_NAME)
        answer = await self.core.predict(
            model_name=name,
            version=version,
            dtype=dtype,
            shape=array.shape,
            content=values_bytes(array, dtype, None, INPUT_NAME),
            time_remaining=rest.time_remaining(request),
        )
        return rest.json_response(predictions(answer, row_format))

    async def get(self, request: web.Request) -> web.StreamResponse:
        tail = PATH.fullmatch(request.match_info["path"])
        if tail is not None and tail["tail"] == "/metadata":
            return await self._metadata(request)
        return await self._status(request)

    async def status(self, request: web.Request) -> web.Response:
        name, version, tail = model_path(request)
        if tail:
            raise NotImplementedHere(f"GET {tail} is not served here; try .../metadata")
        return rest.json_response(
            {
                "model_version_status": [
                    {
                        "version": str(v),
                        "state": "AVAILABLE",
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                    for v in self.versions(name, version)
                ]
            }
        )

    async def metadata(self, request: web.Request) -> web.Response:
        name, version, _ = model_path(request)
        report = self.core.chosen_versions(name, version)[0]
        signature_defs = {
            key: json_format.MessageToDict(signature_def)
            for key, signature_def in report.signature_defs.items()
        }
        return rest.json_response(
            {
                "model_spec": {
                    "name": self.core.model_name,
                    "signature_name": "",
                    "version": str(report.version),
                },
                "metadata": {"signature_def": {"signature_def": signature_defs}},
            }
        )

    def versions(self, name: str, version: int) -> list[int]:
        """The pinned version, or every loaded one (newest first) when none is pinned."""
        return [v.version for v in self.core.chosen_versions(name, version)]


def model_path(request: web.Request) -> tuple[str, int, str]:
    """(model name, version or 0, tail such as ':predict') of a /v1/models/... path."""
    match = PATH.fullmatch(request.match_info["path"])
    if match is None:
        raise ModelNotFound(
            f"no such resource {request.path}; the paths are /v1/models/NAME[/versions/N]"
            "[:predict|/metadata]"
        )
    if match["label"] is not None:
        raise codec.refuse_label(
            match["label"], "version label", "use /versions/N, or leave it out for the newest"
        )
    text = match["version"]
    version = None if text is None else codec.version(decimal(text) or 0, repr(text))
    return match["name"], version or 0, match["tail"] or ""


def request_images(body: dict[str, Any]) -> tuple[bool, Any]:
    """(row format?, the images as nested lists) from an "instances" or "inputs" body."""
    formats = [key for key in ("instances", "inputs") if key in body]
    if len(formats) != 1:
        raise InvalidInput(
            'the request body needs exactly one of "instances" (row format) or "inputs" '
            f"(columnar format); got {formats or 'neither'}"
        )
    if formats == ["instances"]:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('"instances" must be a non-empty list, one entry per image')
        if any(isinstance(i, dict) for i in instances):
            return True, [named_input(i, "each instance") for i in instances]
        return True, instances
    inputs = body["inputs"]
    return False, named_input(inputs, '"inputs"') if isinstance(inputs, dict) else inputs


def named_input(value: Any, what: str) -> Any:
    if not isinstance(value, dict) or set(value) != {INPUT_NAME}:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise InvalidInput(f"{what} must be an image or {{{INPUT_NAME!r}: image}}; got {keys}")
    return value[INPUT_NAME]


def predictions(answer: Answer, row_format: bool) -> dict[str, Any]:
    probabilities = answer.prediction.probabilities.tolist()
    classes = answer.prediction.classes.tolist()
    if row_format:
        return {
            "predictions": [
                dict(zip(OUTPUTS, row, strict=True))
                for row in zip(probabilities, classes, strict=True)
            ]
        }
    return {"outputs": dict(zip(OUTPUTS, (probabilities, classes), strict=True))}
