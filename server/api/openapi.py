"""The OpenAPI 3.1 document of the HTTP port, built here and nowhere else.

The server serves it at /openapi.json and docs/openapi.json is a copy of it, so that the
description is read without a server; tests/test_openapi.py fails when the copy differs and
gives the command that rewrites it:

    python -m mnist_serving.server.api.openapi > docs/openapi.json

It is built from what the server itself uses: the contract's tensor names, the v2 codec's
data types and extensions, the error table of errors.py (each operation lists the domain
errors it raises; the table gives their statuses) and the server's version. Schemathesis
checks it against a live server (tests/test_openapi.py). The pages for people (/, /docs)
are not part of the API and are not described.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web

from mnist_serving.contract import INPUT_NAME, NUM_CLASSES, OUTPUTS, SIGNATURES

from ..call_context import MAX_REQUEST_ID
from ..errors import (
    HTTP_STATUS_OF,
    INTERNAL_MESSAGE,
    DeadlineExpired,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    ServingError,
    ShuttingDown,
    Unauthenticated,
)
from ..feedback import MAX_LABELS
from . import rest
from . import v2_codec as codec

Schema = dict[str, Any]
OPENAPI_VERSION = "3.1.0"
TEXT = "text/plain"
BINARY = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
PIXELS = 28 * 28

# What each domain error means to a caller of the HTTP port.
MEANING: dict[type[ServingError], str] = {
    InvalidInput: "the request is malformed or its tensor fails validation (JSON, names, "
    "data type, shape, pixel range, version string)",
    ModelNotFound: "no model of that name, or that version is not loaded",
    Overloaded: "the server's queue is full: retry later, with backoff",
    DeadlineExpired: "the caller's time budget ran out before the model ran",
    ShuttingDown: "the server is draining: retry, another replica will answer",
    NotReady: "no model version is loaded yet (the first load is still running)",
    RequestTooLarge: "the body exceeds the size limit (64 MiB): split the batch",
    Unauthenticated: "with API keys on (--auth-keys): no bearer token, or not a valid one "
    "(with a WWW-Authenticate: Bearer challenge)",
    PermissionDenied: "with API keys on: the key's role does not cover this call (a read "
    "key calling predict or infer)",
    RateLimited: "with API keys on: the key is over its own requests or images per second; "
    "the Retry-After header says when to retry",
}
# With --auth-keys every operation but the health ones needs a key (api/calls.py, auth.py).
KEYED = (Unauthenticated, PermissionDenied, RateLimited)
BEARER = "bearerAuth"
# Either a key, or none where the server runs without --auth-keys (the default).
SECURITY: list[dict[str, list[str]]] = [{BEARER: []}, {}]
SECURITY_SCHEMES = {
    BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key's token (`mnist-serve keys add`), needed when the server "
        "runs with --auth-keys: `Authorization: Bearer <token>`. Health routes never need one; "
        "/metrics only with --metrics-auth.",
    }
}
# Every counted call passes admission, so any of them can meet a draining server.
ALWAYS = (ShuttingDown,)
READS = (InvalidInput, ModelNotFound, NotReady, *ALWAYS)
PREDICTS = (*READS, Overloaded, DeadlineExpired, RequestTooLarge)


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: Schema, example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {rest.JSON: media}


def ok(description: str, schema: str) -> dict[str, Any]:
    return {"200": {"description": description, "content": json_content(ref(schema))}}


def error_responses(errors: tuple[type[ServingError], ...]) -> dict[str, Any]:
    """Each status the errors map to (errors.HTTP_STATUS_OF), with what it means, and 500."""
    by_status: dict[int, list[str]] = {}
    for kind in errors:
        by_status.setdefault(HTTP_STATUS_OF[kind], []).append(MEANING[kind])
    by_status[500] = [f"an unexpected error; the body says {INTERNAL_MESSAGE!r}"]
    return {
        str(status): {
            "description": "; or ".join(meanings).capitalize(),
            "content": json_content(ref("Error")),
        }
        for status, meanings in sorted(by_status.items())
    }


def operation(
    tag: str,
    operation_id: str,
    summary: str,
    ok: dict[str, Any],
    errors: tuple[type[ServingError], ...],
    *,
    parameters: list[Schema] | None = None,
    body: dict[str, Any] | None = None,
    description: str | None = None,
    keyed: bool = True,
) -> dict[str, Any]:
    """One operation; `keyed`: it needs an API key when the server runs with --auth-keys."""
    result: dict[str, Any] = {"tags": [tag], "operationId": operation_id, "summary": summary}
    if description:
        result["description"] = description
    if keyed:
        result["security"] = SECURITY
        errors = (*errors, *KEYED)
    else:
        result["security"] = []  # open to probes whatever the server's settings
    if parameters:
        result["parameters"] = parameters
    if body:
        result["requestBody"] = body
    responses = {**ok, **error_responses(errors)}
    result["responses"] = dict(sorted(responses.items()))
    return result


def path_parameter(name: str, schema: Schema, description: str, example: Any) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
        "example": example,
    }


TIMEOUT_HEADER = {
    "name": rest.TIMEOUT_HEADER,
    "in": "header",
    "required": False,
    "description": "The caller's time budget in milliseconds (a positive number). A call "
    "still queued when it runs out is answered 504 and never reaches the model.",
    "schema": {"type": "number", "exclusiveMinimum": 0},
}
V1_NAME = path_parameter(
    "name",
    {"type": "string", "pattern": "^[^/:]+$"},
    "The model's name (mnist-serve --model-name)",
    "mnist",
)
V1_VERSION = path_parameter(
    "version",
    {"type": "integer", "minimum": 1},
    "A loaded version; leave the segment out for the newest",
    1,
)
V2_NAME = path_parameter(
    "name", {"type": "string"}, "The model's name (mnist-serve --model-name)", "mnist"
)
V2_VERSION = path_parameter(
    "version",
    {"type": "string", "pattern": "^[0-9]+$"},
    "A loaded version, as a decimal string; leave the segment out for the newest. "
    "Anything but ASCII digits is answered 400",
    "1",
)


def pixel_rows(item: Schema) -> Schema:
    """An image: 28 rows of 28 pixels, or 784 pixels."""
    return {
        "anyOf": [
            {
                "type": "array",
                "minItems": 28,
                "maxItems": 28,
                "items": {"type": "array", "minItems": 28, "maxItems": 28, "items": item},
            },
            {"type": "array", "minItems": PIXELS, "maxItems": PIXELS, "items": item},
        ]
    }


def schemas() -> dict[str, Schema]:
    signatures = sorted(SIGNATURES.values())
    probabilities = {
        "type": "array",
        "minItems": NUM_CLASSES,
        "maxItems": NUM_CLASSES,
        "items": {"type": "number", "minimum": 0, "maximum": 1},
        "description": "the softmax output, one probability per digit 0-9",
    }
    digit = {"type": "integer", "minimum": 0, "maximum": NUM_CLASSES - 1}
    tensor_metadata = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    numbers = {"type": "array", "items": {"type": "number"}}
    return {
        "Error": {
            "type": "object",
            "description": "Every error of the HTTP port, as TF Serving and KServe answer",
            "required": ["error"],
            "properties": {"error": {"type": "string", "description": "what went wrong"}},
            "additionalProperties": False,
        },
        "FeedbackRequest": {
            "type": "object",
            "required": ["labels"],
            "properties": {
                "labels": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_LABELS,
                    "items": {
                        "type": "object",
                        "required": ["request_id", "label"],
                        "properties": {
                            "request_id": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_REQUEST_ID,
                                "description": "the X-Request-Id of the prediction's answer",
                            },
                            "index": {
                                "type": "integer",
                                "minimum": 0,
                                "default": 0,
                                "description": "the image's position in that call",
                            },
                            "label": {**digit, "description": "the true class"},
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
        "FeedbackResponse": {
            "type": "object",
            "required": ["accepted", "unknown", "duplicate", "unknown_indices"],
            "properties": {
                "accepted": {"type": "integer", "minimum": 0},
                "unknown": {"type": "integer", "minimum": 0},
                "duplicate": {"type": "integer", "minimum": 0},
                "unknown_indices": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0},
                    "description": "positions in labels of the unknown ones",
                },
            },
            "additionalProperties": False,
        },
        "Pixel": {
            "type": "number",
            "minimum": 0,
            "maximum": 255,
            "description": "a whole number 0..255 (serving_default, uint8), or a number in "
            "[0, 1] (serving_float, float32)",
        },
        "Image": pixel_rows(ref("Pixel")),
        "PredictRequest": {
            "type": "object",
            "description": "TF Serving's row format (instances: one entry per image) or "
            "columnar format (inputs: the batch), exactly one of them. Each image is "
            "28x28 or 784 pixels, alone or as {'images': image}.",
            "properties": {
                "signature_name": {
                    "enum": signatures,
                    "default": "serving_default",
                    "description": "serving_default takes uint8 pixels 0..255; "
                    "serving_float takes float32 pixels scaled to [0, 1]",
                },
                "instances": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "anyOf": [
                            ref("Image"),
                            {
                                "type": "object",
                                "required": [INPUT_NAME],
                                "properties": {INPUT_NAME: ref("Image")},
                                "additionalProperties": False,
                            },
                        ]
                    },
                },
                "inputs": {
                    "anyOf": [
                        {"type": "array", "minItems": 1, "items": ref("Image")},
                        {
                            "type": "object",
                            "required": [INPUT_NAME],
                            "properties": {
                                INPUT_NAME: {"type": "array", "minItems": 1, "items": ref("Image")}
                            },
                            "additionalProperties": False,
                        },
                    ]
                },
            },
            "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
        },
        "PredictResponse": {
            "description": "Row format answers predictions (one object per image); "
            "columnar format answers outputs (one list per output)",
            "oneOf": [
                {
                    "type": "object",
                    "required": ["predictions"],
                    "properties": {
                        "predictions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": list(OUTPUTS),
                                "properties": {"probabilities": probabilities, "classes": digit},
                                "additionalProperties": False,
                            },
                        }
                    },
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "required": ["outputs"],
                    "properties": {
                        "outputs": {
                            "type": "object",
                            "required": list(OUTPUTS),
                            "properties": {
                                "probabilities": {"type": "array", "items": probabilities},
                                "classes": {"type": "array", "items": digit},
                            },
                            "additionalProperties": False,
                        }
                    },
                    "additionalProperties": False,
                },
            ],
        },
        "ModelStatus": {
            "type": "object",
            "required": ["model_version_status"],
            "properties": {
                "model_version_status": {
                    "type": "array",
                    "description": "the pinned version, or every loaded one (newest first)",
                    "items": {
                        "type": "object",
                        "required": ["version", "state", "status"],
                        "properties": {
                            "version": {"type": "string"},
                            "state": {"const": "AVAILABLE"},
                            "status": {
                                "type": "object",
                                "properties": {
                                    "error_code": {"type": "string"},
                                    "error_message": {"type": "string"},
                                },
                            },
                        },
                    },
                }
            },
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["model_spec", "metadata"],
            "properties": {
                "model_spec": {
                    "type": "object",
                    "required": ["name", "signature_name", "version"],
                    "properties": {
                        "name": {"type": "string"},
                        "signature_name": {"type": "string"},
                        "version": {"type": "string"},
                    },
                },
                "metadata": {
                    "type": "object",
                    "required": ["signature_def"],
                    "properties": {
                        "signature_def": {
                            "type": "object",
                            "description": "TensorFlow's SignatureDefMap in its JSON form",
                            "required": ["signature_def"],
                            "properties": {
                                "signature_def": {
                                    "type": "object",
                                    "additionalProperties": {"type": "object"},
                                }
                            },
                        }
                    },
                },
            },
        },
        "Live": {
            "type": "object",
            "required": ["live"],
            "properties": {"live": {"const": True}},
        },
        "Ready": {
            "type": "object",
            "required": ["ready"],
            "properties": {"ready": {"type": "boolean"}},
        },
        "ModelReady": {
            "type": "object",
            "required": ["name", "ready"],
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"const": codec.SERVER_NAME},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"enum": list(codec.EXTENSIONS)}},
            },
        },
        "V2ModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "the loaded versions the path addresses",
                },
                "platform": {"const": codec.PLATFORM},
                "inputs": {"type": "array", "items": tensor_metadata},
                "outputs": {"type": "array", "items": tensor_metadata},
            },
        },
        "InferInput": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"const": INPUT_NAME},
                "shape": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "[N, 28, 28] or [N, 784]",
                },
                "datatype": {
                    "enum": list(codec.INPUT_DATATYPES),
                    "description": "UINT8 pixels 0..255, or FP32 pixels scaled to [0, 1]",
                },
                "data": {
                    "type": "array",
                    "description": "the pixels, flat or nested (row-major); leave it out "
                    "when the pixels follow the JSON header as binary data",
                    "items": {
                        "anyOf": [
                            {"type": "number"},
                            numbers,
                            {"type": "array", "items": numbers},
                        ]
                    },
                },
                "parameters": {
                    "type": "object",
                    "properties": {
                        "binary_data_size": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "binary tensor extension: the input's bytes "
                            "follow the JSON header, this many of them",
                        }
                    },
                },
            },
        },
        "RequestedOutput": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"enum": list(OUTPUTS)},
                "parameters": {
                    "type": "object",
                    "properties": {
                        "binary_data": {
                            "type": "boolean",
                            "description": "send this output as binary data after the JSON header",
                        }
                    },
                },
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string", "description": "echoed in the response"},
                "parameters": {
                    "type": "object",
                    "properties": {
                        codec.TIMEOUT_PARAMETER: {
                            "type": "integer",
                            "minimum": 0,
                            "description": "time budget in microseconds (0: none), as "
                            f"Triton reads it; with {rest.TIMEOUT_HEADER} the tighter applies",
                        },
                        "binary_data_output": {
                            "type": "boolean",
                            "description": "send every output as binary data",
                        },
                    },
                },
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": ref("InferInput"),
                },
                "outputs": {
                    "type": "array",
                    "description": "the outputs to send, in this order (all of them when "
                    "absent); each one at most once",
                    "items": ref("RequestedOutput"),
                },
            },
        },
        "InferOutput": {
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"enum": list(OUTPUTS)},
                "datatype": {"enum": sorted(set(codec.OUTPUT_DATATYPES.values()))},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"type": "array", "items": {"type": "number"}, "description": "flat"},
                "parameters": {
                    "type": "object",
                    "required": ["binary_data_size"],
                    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                    "description": "present for an output sent as binary data",
                },
            },
            "oneOf": [{"required": ["data"]}, {"required": ["parameters"]}],
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": ref("InferOutput")},
            },
        },
    }


def tfserving_paths() -> dict[str, Any]:
    tag = "TF Serving REST"
    predict_body = {
        "required": True,
        "content": json_content(
            ref("PredictRequest"),
            {"instances": [[[0] * 28] * 28], "signature_name": "serving_default"},
        ),
    }
    predict_ok = {
        "200": {
            "description": "Probabilities and classes, in the request's format",
            "content": json_content(ref("PredictResponse")),
        }
    }
    # The router sends a path that ends in :verb to POST, so a GET of one is 405.
    verb = {
        "405": {
            "description": "The path ends in a :verb, which takes POST",
            "content": json_content(ref("Error")),
        }
    }
    status_ok = {**ok("Version status", "ModelStatus"), **verb}
    metadata_ok = {**ok("Signatures", "ModelMetadata"), **verb}
    paths: dict[str, Any] = {}
    for prefix, parameters, suffix in (
        ("/v1/models/{name}", [V1_NAME], ""),
        ("/v1/models/{name}/versions/{version}", [V1_NAME, V1_VERSION], "Version"),
    ):
        paths[prefix + ":predict"] = {
            "post": operation(
                tag,
                "tfservingPredict" + suffix,
                "Classify images (TF Serving Predict)",
                predict_ok,
                PREDICTS,
                parameters=[*parameters, TIMEOUT_HEADER],
                body=predict_body,
                description=":classify and :regress are answered 501, as the gRPC API does",
            )
        }
        paths[prefix] = {
            "get": operation(
                tag,
                "tfservingModelStatus" + suffix,
                "Model version status",
                status_ok,
                READS,
                parameters=parameters,
            )
        }
        paths[prefix + "/metadata"] = {
            "get": operation(
                tag,
                "tfservingModelMetadata" + suffix,
                "Model signatures",
                metadata_ok,
                READS,
                parameters=parameters,
            )
        }
    return paths


def feedback_paths() -> dict[str, Any]:
    body = {
        "required": True,
        "content": json_content(
            ref("FeedbackRequest"),
            {"labels": [{"request_id": "5f0c2a9e1b7d4c3a00000001", "index": 0, "label": 7}]},
        ),
    }
    return {
        "/v1/feedback": {
            "post": operation(
                "Feedback",
                "feedback",
                "True labels for predictions this server made (live accuracy)",
                ok("How many labels were joined to a remembered prediction", "FeedbackResponse"),
                (InvalidInput, RequestTooLarge, *ALWAYS),
                body=body,
                description="Each label names a prediction by the request ID its answer "
                "carried (X-Request-Id) and the image's position in that call. A prediction "
                "older than the server's window (--feedback-window), or made by another "
                "worker, is unknown; a second label for one image is a duplicate. At most "
                f"{MAX_LABELS} labels per call.",
            )
        }
    }


def v2_paths() -> dict[str, Any]:
    tag = "KServe v2 REST"
    example_input = {
        "name": INPUT_NAME,
        "shape": [1, 28, 28],
        "datatype": "UINT8",
        "data": [0] * PIXELS,
    }
    binary_header = {
        "name": HEADER_LENGTH,
        "in": "header",
        "required": False,
        "description": "Binary tensor extension: the byte length of the JSON header at the "
        "start of the body; binary input data follows it",
        "schema": {"type": "integer", "minimum": 0},
    }
    infer_body = {
        "required": True,
        "description": "JSON, or (binary tensor extension) a JSON header followed by the "
        f"input's raw little-endian bytes, with {HEADER_LENGTH} giving the header's length "
        "and the input's parameters.binary_data_size the bytes' count. The server reads "
        "the body by that header, whatever its Content-Type.",
        "content": {
            rest.JSON: {
                "schema": ref("InferRequest"),
                "examples": {
                    "json": {"summary": "JSON in, JSON out", "value": {"inputs": [example_input]}},
                    "binaryOutputs": {
                        "summary": "JSON in, the outputs as binary data after a JSON header",
                        "value": {
                            "inputs": [example_input],
                            "parameters": {"binary_data_output": True},
                        },
                    },
                },
            },
            BINARY: {
                "schema": {
                    "type": "string",
                    "contentMediaType": BINARY,
                    "description": "the JSON header (an InferRequest), then the binary data",
                }
            },
        },
    }
    infer_ok = {
        "200": {
            "description": "The outputs. JSON when no output is asked for as binary data; "
            "otherwise (binary tensor extension) the JSON header, then each binary output's "
            "bytes in order, with Inference-Header-Content-Length giving the header's length",
            "headers": {
                HEADER_LENGTH: {
                    "description": "with a binary body: the JSON header's byte length",
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
            "content": {
                **json_content(ref("InferResponse")),
                BINARY: {
                    "schema": {
                        "type": "string",
                        "contentMediaType": BINARY,
                        "description": "an InferResponse as JSON, then the outputs' bytes "
                        "(FP32 and INT64 little-endian)",
                    }
                },
            },
        }
    }
    ready_body = {"content": json_content(ref("Ready"))}
    model_ready_body = {"content": json_content(ref("ModelReady"))}
    paths: dict[str, Any] = {
        "/v2/health/live": {
            "get": operation(
                "Health",
                "serverLive",
                "Liveness: the process answers",
                {"200": {"description": "Live", "content": json_content(ref("Live"))}},
                ALWAYS,
                keyed=False,
            )
        },
        "/v2/health/ready": {
            "get": operation(
                "Health",
                "serverReady",
                "Readiness: a model version is loaded and the server is not draining",
                {
                    "200": {"description": "Ready", **ready_body},
                    "503": {
                        "description": "Not ready: loading, or draining",
                        "content": json_content({"anyOf": [ref("Ready"), ref("Error")]}),
                    },
                },
                (),
                keyed=False,
            )
        },
        "/v2": {
            "get": operation(
                tag,
                "serverMetadata",
                "Server metadata and protocol extensions",
                {
                    "200": {
                        "description": "Metadata",
                        "content": json_content(ref("ServerMetadata")),
                    }
                },
                ALWAYS,
            )
        },
    }
    for prefix, parameters, suffix in (
        ("/v2/models/{name}", [V2_NAME], ""),
        ("/v2/models/{name}/versions/{version}", [V2_NAME, V2_VERSION], "Version"),
    ):
        paths[prefix] = {
            "get": operation(
                tag,
                "modelMetadata" + suffix,
                "Model metadata: loaded versions, inputs and outputs",
                {
                    "200": {
                        "description": "Metadata",
                        "content": json_content(ref("V2ModelMetadata")),
                    }
                },
                READS,
                parameters=parameters,
            )
        }
        paths[prefix + "/ready"] = {
            "get": operation(
                "Health",
                "modelReady" + suffix,
                "Model readiness: the version is loaded",
                {
                    "200": {"description": "Ready", **model_ready_body},
                    "503": {
                        "description": "Not ready: that version is not loaded, or the server "
                        "is loading or draining",
                        "content": json_content({"anyOf": [ref("ModelReady"), ref("Error")]}),
                    },
                },
                (InvalidInput, ModelNotFound),
                parameters=parameters,
            )
        }
        paths[prefix + "/infer"] = {
            "post": operation(
                tag,
                "modelInfer" + suffix,
                "Classify images (Open Inference Protocol)",
                infer_ok,
                PREDICTS,
                parameters=[*parameters, TIMEOUT_HEADER, binary_header],
                body=infer_body,
            )
        }
    return paths


def document() -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "mnist-serving HTTP API",
            "version": codec.SERVER_VERSION,
            "summary": "An MNIST digit classifier behind TF Serving's REST API and the Open "
            "Inference Protocol (KServe v2) REST API",
            "description": "One model, two REST APIs on one port, beside gRPC. Errors are "
            'JSON bodies {"error": "..."}, with the HTTP status that the gRPC API\'s code '
            f"maps to. Predict and infer calls take a time budget in the {rest.TIMEOUT_HEADER} "
            "header. A server run with --auth-keys wants an API key on every call but the "
            "health routes: `Authorization: Bearer <token>`.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "TF Serving REST", "description": "TensorFlow Serving's REST API (/v1)"},
            {
                "name": "KServe v2 REST",
                "description": "The Open Inference Protocol (/v2), with the binary tensor "
                "data extension",
            },
            {"name": "Feedback", "description": "Ground-truth labels for past predictions"},
            {"name": "Health", "description": "Liveness and readiness"},
            {"name": "Metrics", "description": "Prometheus metrics"},
        ],
        "paths": {
            **tfserving_paths(),
            **v2_paths(),
            **feedback_paths(),
            "/metrics": {
                "get": {
                    "tags": ["Metrics"],
                    "operationId": "metrics",
                    "summary": "Prometheus metrics, in the text exposition format",
                    "description": "Open, unless the server runs with --metrics-auth: then "
                    "any valid API key",
                    "security": SECURITY,
                    "responses": {
                        "200": {
                            "description": "The metrics of the whole server",
                            "content": {TEXT: {"schema": {"type": "string"}}},
                        },
                        "401": {
                            "description": "With --metrics-auth: no valid bearer token",
                            "content": json_content(ref("Error")),
                        },
                    },
                }
            },
        },
        "components": {"schemas": schemas(), "securitySchemes": SECURITY_SCHEMES},
    }


def text() -> str:
    """The document as docs/openapi.json holds it: indented, with arrays of numbers on one
    line (the examples' pixels would otherwise take a line each)."""
    return dumps(document()) + "\n"


def dumps(value: Any, indent: str = "") -> str:
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def routes() -> list[web.RouteDef]:
    body = text().encode()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=rest.JSON)

    return [web.get("/openapi.json", serve)]


if __name__ == "__main__":
    sys.stdout.write(text())
