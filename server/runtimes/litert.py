"""The LiteRT runtime: serve a version through its verified twin (model.tflite).

The only module in server/ that imports ai_edge_litert. The twin holds both serving
signatures under their SavedModel names (see mnist_serving.contract), and the trainer has
checked it against the SavedModel before publishing it; the SavedModel beside it still
provides the SignatureDefs that TensorFlow Serving's GetModelMetadata reports.

A LiteRT interpreter runs one call at a time, so the model keeps a small pool of them and
each call borrows one (two at most in practice: the event loop's inline calls and the
inference thread's). Each interpreter remembers the batch shape it was allocated for and
reallocates only when the shape changes. Small batches use a one-thread interpreter, which
is what answers fastest for a few images; big ones use BULK_THREADS (XNNPACK splits the
work between the cores; the call releases the GIL, so the event loop keeps decoding the
next requests meanwhile).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from mnist_serving.contract import IMAGE_SIDE, INPUT_NAME, NUM_CLASSES, OUTPUTS, SIGNATURES, TWIN
from mnist_serving.contract.tfquiet import captured_stderr

from ..errors import InvalidInput
from .base import Prediction
from .savedmodel import read_report, read_signature_defs

logger = logging.getLogger(__name__)

# Batches up to this many images may be run on the event loop itself: at ~10 us per image
# the call is shorter than handing it to a thread and waking the loop again.
INLINE_MAX_IMAGES = 32
BULK_THREADS = max(1, min(2, os.cpu_count() or 1))
_DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype(np.float32)}
# LiteRT's C++ side prints this once per process on the first allocation; it is not news.
_DELEGATE_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_announced = False  # that line is behind us: later loads need not catch stderr


class _Signature:
    """One signature of one interpreter, called through the interpreter's own wrapper:
    what SignatureRunner does, minus the resize and reallocation on every call."""

    def __init__(self, interpreter: Interpreter, key: str) -> None:
        runner = interpreter.get_signature_runner(key)
        self._wrapper = interpreter._interpreter
        self._subgraph = runner._subgraph_index
        self._input = runner.get_input_details()[INPUT_NAME]["index"]
        outputs = runner.get_output_details()
        self._probabilities = outputs["probabilities"]["index"]
        self._classes = outputs["classes"]["index"]
        self._shape: tuple[int, ...] = ()

    def __call__(self, images: np.ndarray) -> Prediction:
        wrapper, subgraph = self._wrapper, self._subgraph
        if images.shape != self._shape:
            shape = np.array(images.shape, dtype=np.int32)
            wrapper.ResizeInputTensor(self._input, shape, False, subgraph)
            wrapper.AllocateTensors(subgraph)
            self._shape = images.shape
        wrapper.SetTensor(self._input, images, subgraph)
        wrapper.Invoke(subgraph)  # releases the GIL while it runs
        return Prediction(
            probabilities=wrapper.GetTensor(self._probabilities, subgraph),  # copies
            classes=wrapper.GetTensor(self._classes, subgraph),
        )


class _Runner:
    """An interpreter and its two signatures, by input dtype (np.dtype keys: dtype.name is
    computed in Python on every access)."""

    def __init__(self, flatbuffer: bytes, threads: int) -> None:
        self.interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        self.signatures = {
            np.dtype(dtype): _Signature(self.interpreter, key) for dtype, key in SIGNATURES.items()
        }


@dataclass
class TwinModel:
    name: str
    version: int
    path: Path
    load_seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    signature_defs: dict[str, Any] = field(default_factory=dict, repr=False)
    runtime: str = "litert"
    inline_max_images: int = INLINE_MAX_IMAGES
    _flatbuffer: bytes = field(default=b"", repr=False)
    # Idle interpreters; list.pop/append are atomic, so any thread may borrow one.
    _small: list[_Runner] = field(default_factory=list, repr=False)
    _bulk: list[_Runner] = field(default_factory=list, repr=False)

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the signature that matches images.dtype on [N, 28, 28]; blocking."""
        small = len(images) <= self.inline_max_images
        idle = self._small if small else self._bulk
        try:
            runner = idle.pop()
        except IndexError:  # all busy (or released): one more, kept afterwards
            if not self._flatbuffer:
                raise RuntimeError(f"version {self.version} was released") from None
            runner = _Runner(self._flatbuffer, 1 if small else BULK_THREADS)
        try:
            signature = runner.signatures.get(images.dtype)
            if signature is None:
                raise InvalidInput(f"no signature takes {images.dtype.name} images")
            return signature(images)
        finally:
            idle.append(runner)

    def release(self) -> None:
        """Drop the interpreters and the flatbuffer (after the version's last call)."""
        self._flatbuffer = b""
        self._small.clear()
        self._bulk.clear()


def import_runtime(verbose: bool = False) -> None:
    """Nothing to do: ai_edge_litert was imported with this module (a few milliseconds)."""


def load_model(path: Path, name: str, version: int, verbose: bool = False) -> TwinModel:
    """Load <path>/model.tflite, check its signatures against the contract, warm it up."""
    global _announced
    started = time.perf_counter()
    flatbuffer = (path / TWIN).read_bytes()
    model = TwinModel(
        name,
        version,
        path,
        0.0,
        read_report(path),
        read_signature_defs(path),
        _flatbuffer=flatbuffer,
    )
    # Catching fd 2 also catches other threads' log lines meanwhile; _pass_on writes them
    # back, whatever happens. Only the first load in a process needs it.
    log: list[str] = []
    try:
        with captured_stderr(not verbose and not _announced) as log:
            _warm_up(model, flatbuffer)
    except ValueError as error:  # a flatbuffer that is not a twin of this contract
        raise ValueError(f"{path / TWIN}: {error}") from None
    finally:
        _pass_on(log[0] if log else "")
    _announced = True
    model.load_seconds = time.perf_counter() - started
    return model


def _warm_up(model: TwinModel, flatbuffer: bytes) -> None:
    small, bulk = _Runner(flatbuffer, 1), _Runner(flatbuffer, BULK_THREADS)
    _check_signatures(small.interpreter)
    model._small.append(small)
    model._bulk.append(bulk)
    for dtype in SIGNATURES:
        # The first calls allocate and set XNNPACK up; pay for them before traffic.
        for count in (1, model.inline_max_images + 1):
            result = model.predict(np.zeros((count, IMAGE_SIDE, IMAGE_SIDE), dtype=dtype))
            if result.probabilities.shape != (count, NUM_CLASSES):
                raise ValueError(f"it returns probabilities {result.probabilities.shape}")


def _check_signatures(interpreter: Interpreter) -> None:
    found = interpreter.get_signature_list()
    for dtype, key in SIGNATURES.items():
        if key not in found:
            raise ValueError(f"no {key!r} signature (has {sorted(found)})")
        if found[key]["inputs"] != [INPUT_NAME] or sorted(found[key]["outputs"]) != sorted(OUTPUTS):
            raise ValueError(f"signature {key!r} is not images -> {list(OUTPUTS)}: {found[key]}")
        details = interpreter.get_signature_runner(key).get_input_details()[INPUT_NAME]
        shape = [int(d) for d in details["shape_signature"]]
        wanted = [-1, IMAGE_SIDE, IMAGE_SIDE]
        if details["dtype"] != _DTYPES[dtype] or shape != wanted:
            raise ValueError(
                f"signature {key!r} takes {np.dtype(details['dtype']).name} "
                f"{shape}, not {dtype} {wanted}"
            )


def _pass_on(text: str) -> None:
    """Write what LiteRT printed during the load back to stderr, minus its known INFO line
    (anything else, including another thread's log lines, is kept)."""
    kept = "".join(
        line for line in text.splitlines(keepends=True) if line.strip() != _DELEGATE_LINE
    )
    if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()
