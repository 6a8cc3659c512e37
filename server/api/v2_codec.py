"""The Open Inference Protocol's (KServe v2) view of the model, shared by its gRPC (v2.py)
and REST (v2_rest.py) bindings: tensor names and data types, version strings, requested
outputs, the timeout parameter, and `infer`, the one inference path both bindings call.
Knows neither proto nor HTTP: each binding parses its request into an `InferRequest` and
formats the `InferResponse`, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from mnist_serving.contract import IMAGE_SIDE, INPUT_NAME, NUM_CLASSES, OUTPUTS

from ..call_context import PRIORITY_PARAMETER, declare_priority, priority_numbered
from ..core import Answer, InferenceCore
from ..errors import InvalidInput, ModelNotFound
from ..validation import decimal, pinned_version, values_bytes

SERVER_NAME = "mnist-serving"
SERVER_VERSION = metadata.version(SERVER_NAME)
EXTENSIONS = ("binary_tensor_data",)  # the REST binding's; gRPC has raw_*_contents built in
PLATFORM = "tensorflow_savedmodel"
# Protocol data type -> the core's dtype name.
INPUT_DATATYPES = {"UINT8": "uint8", "FP32": "float32"}
OUTPUT_DATATYPES = {"probabilities": "FP32", "classes": "INT64"}
TIMEOUT_PARAMETER = "timeout"  # microseconds, as Triton reads it
# Request parameters that ask for what this server does not do; anything else is ignored,
# as the protocol allows custom parameters.
REFUSED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]


def input_metadata() -> list[Tensor]:
    # One entry per name: the protocol has no way to list two data types for one input;
    # FP32 [-1, 28, 28] (scaled to [0, 1]) and [-1, 784] are accepted as well.
    return [Tensor(INPUT_NAME, "UINT8", [-1, IMAGE_SIDE, IMAGE_SIDE])]


def output_metadata() -> list[Tensor]:
    return [
        Tensor("probabilities", "FP32", [-1, NUM_CLASSES]),
        Tensor("classes", "INT64", [-1]),
    ]


def version_number(text: str) -> int:
    """The core's version for a protocol version string: "" is 0, the newest."""
    if text == "":
        return 0
    version = decimal(text)
    if version is None:
        raise InvalidInput(f"model version {text!r} is not a version number; versions are 1, 2...")
    return pinned_version(version, str(version))


def model_versions(core: InferenceCore, name: str, version: str) -> list[int]:
    """Loaded versions the (name, version) pair addresses: all of them for version ""."""
    return [v.version for v in core.chosen_versions(name, version_number(version))]


def model_ready(core: InferenceCore, name: str, version: str) -> bool:
    """Unknown model: NOT_FOUND; a known one is ready when the version is loaded."""
    try:
        model_versions(core, name, version)
    except ModelNotFound:
        core.versions(name)  # raises again for another model's name
        return False
    return core.ready


def input_dtype(name: str, datatype: str) -> str:
    """The core's dtype for the one input, checking its name and data type."""
    if name != INPUT_NAME:
        raise InvalidInput(f"unknown input {name!r}; this model takes one input, {INPUT_NAME!r}")
    dtype = INPUT_DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {INPUT_NAME!r} has datatype {datatype!r}; send UINT8 (0..255) "
            "or FP32 (scaled to [0, 1])"
        )
    return dtype


def one_input(inputs: list[Any]) -> Any:
    if len(inputs) != 1:
        raise InvalidInput(
            f"a request carries exactly one input, {INPUT_NAME!r}; got {len(inputs)}"
        )
    return inputs[0]


def requested_outputs(names: Iterable[str]) -> list[str]:
    """The outputs to send, in the order asked: all of them when none are named."""
    names = list(names)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; the outputs are {list(OUTPUTS)}")
    if len(set(names)) != len(names):
        raise InvalidInput(f"outputs {names} name one output twice")
    return names or list(OUTPUTS)


def check_parameters(parameters: Mapping[str, Any]) -> None:
    refused = sorted(set(parameters) & set(REFUSED_PARAMETERS))
    if refused:
        raise InvalidInput(f"parameters {refused} are not supported: this model is stateless")


def timeout_seconds(microseconds: Any) -> float | None:
    """The `timeout` request parameter (microseconds) in seconds; None when unset."""
    if microseconds is None:
        return None
    if isinstance(microseconds, bool) or not isinstance(microseconds, int) or microseconds < 0:
        raise InvalidInput(f"parameter timeout is {microseconds!r}; give whole microseconds >= 0")
    return microseconds / 1e6 if microseconds else None


def earliest(*budgets: float | None) -> float | None:
    """The tightest of several time budgets (seconds); None when there is none."""
    given = [b for b in budgets if b is not None]
    return min(given) if given else None


def output_array(answer: Answer, name: str) -> np.ndarray:
    """An output in its wire type: FP32 or INT64, little-endian."""
    if name == "probabilities":
        return answer.prediction.probabilities.astype("<f4", copy=False)
    return answer.prediction.classes.astype("<i8", copy=False)


@dataclass(frozen=True)
class InferInput:
    """The request's input as a binding parsed it: raw little-endian bytes, or numbers."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None  # raw_input_contents, or the REST binary data extension
    values: Any = None  # typed contents, or JSON "data" (when raw is None)
    what: str = "the input's data"  # how errors name the values
    where: str = ""  # and where they were (" in contents.fp32_contents")


@dataclass(frozen=True)
class InferRequest:
    model_name: str
    model_version: str  # "" for the newest
    input: InferInput
    outputs: list[str]  # the names asked for, in order; empty for all
    parameters: Mapping[str, Any]  # the request's parameters as plain values
    time_remaining: float | None  # the transport's deadline budget (seconds)


@dataclass(frozen=True)
class InferOutput:
    name: str
    datatype: str
    array: np.ndarray  # in its wire type, little-endian


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[InferOutput]


async def infer(core: InferenceCore, request: InferRequest) -> InferResponse:
    """ModelInfer, whichever binding it came through."""
    core.versions(request.model_name)  # an unknown model is NOT_FOUND at once
    check_parameters(request.parameters)
    if PRIORITY_PARAMETER in request.parameters:  # over the metadata's or header's
        declare_priority(priority_numbered(request.parameters[PRIORITY_PARAMETER]))
    outputs = requested_outputs(request.outputs)
    tensor = request.input
    dtype = input_dtype(tensor.name, tensor.datatype)
    version = version_number(request.model_version)
    content = tensor.raw
    if content is None:
        content = values_bytes(tensor.values, dtype, tensor.shape, tensor.what, where=tensor.where)
    answer = await core.predict(
        model_name=request.model_name,
        version=version,
        dtype=dtype,
        shape=tensor.shape,
        content=content,
        time_remaining=earliest(
            request.time_remaining,
            timeout_seconds(request.parameters.get(TIMEOUT_PARAMETER)),
        ),
    )
    return InferResponse(
        answer.model_name,
        str(answer.version),
        [InferOutput(name, OUTPUT_DATATYPES[name], output_array(answer, name)) for name in outputs],
    )
