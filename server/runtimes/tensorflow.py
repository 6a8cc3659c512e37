"""The TensorFlow runtime: load a SavedModel version, warm it up, run it.

The only module in server/ that imports TensorFlow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.contract import INPUT_NAME, NUM_CLASSES, SIGNATURES
from mnist_serving.contract.tfquiet import import_tensorflow

from ..errors import InvalidInput
from .base import Prediction
from .savedmodel import read_report, read_signature_defs

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    load_seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    runtime: str = "tensorflow"
    inline_max_images: int = 0  # a TensorFlow call costs ~0.3 ms: always on the inference thread
    _functions: dict[str, Any] = field(default_factory=dict, repr=False)
    _saved: Any = field(default=None, repr=False)
    # The served signatures as written in saved_model.pb (tensorflow.SignatureDef protos):
    # what TensorFlow Serving's GetModelMetadata reports.
    signature_defs: dict[str, Any] = field(default_factory=dict, repr=False)

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the signature that matches images.dtype on [N, 28, 28]; blocking."""
        function = self._functions.get(images.dtype.name)
        if function is None:
            raise InvalidInput(f"no signature takes {images.dtype.name} images")
        outputs = function(**{INPUT_NAME: images})
        return Prediction(
            probabilities=outputs["probabilities"].numpy(),
            classes=outputs["classes"].numpy(),
        )

    def release(self) -> None:
        """Drop this object's hold on the TensorFlow graph and weights (after its last call)."""
        self._functions.clear()
        self._saved = None


def import_runtime(verbose: bool = False) -> None:
    """Import TensorFlow now (a few seconds, once per process), without loading a model.

    Under --runtime auto this can happen while the server serves (the first version without
    a twin): the server's own log lines written meanwhile (logfmt, "ts=...": logs.py) are
    kept, TensorFlow's start-up noise is not."""
    import_tensorflow(verbose, keep=lambda line: line.startswith("ts="))


def load_model(path: Path, name: str, version: int, verbose: bool = False) -> LoadedModel:
    """Load <path>, check its signatures against the export contract, and warm it up."""
    import_runtime(verbose)
    tf = import_tensorflow()
    started = time.perf_counter()
    saved = tf.saved_model.load(str(path))
    functions = {}
    for dtype, signature in SIGNATURES.items():
        if signature not in saved.signatures:
            raise ValueError(f"{path} has no {signature!r} signature")
        function = saved.signatures[signature]
        spec = function.structured_input_signature[1].get(INPUT_NAME)
        if spec is None or spec.dtype.name != dtype or spec.shape.as_list() != [None, 28, 28]:
            raise ValueError(f"{path} signature {signature!r} does not take {dtype} [N, 28, 28]")
        functions[dtype] = function
    model = LoadedModel(
        name, version, path, 0.0, read_report(path), _functions=functions, _saved=saved
    )
    model.signature_defs = read_signature_defs(path)
    for dtype in functions:
        # The first calls trace and allocate; pay for them before taking traffic.
        for count in (1, 32):
            result = model.predict(np.zeros((count, 28, 28), dtype=dtype))
            if result.probabilities.shape != (count, NUM_CLASSES):
                raise ValueError(f"{path} returns probabilities {result.probabilities.shape}")
    model.load_seconds = time.perf_counter() - started
    return model
