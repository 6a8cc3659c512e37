"""The TensorFlow runtime: load a SavedModel version, warm it up, run it.

The only module in server/ that imports TensorFlow.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.contract import INPUT_NAME, NUM_CLASSES, REPORT, SAVED_MODEL, SIGNATURES
from mnist_serving.contract.tfquiet import import_tensorflow

from ..errors import InvalidInput
from . import Prediction

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    load_seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    runtime: str = "tensorflow"
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
    """Import TensorFlow now (a few seconds, once per process), without loading a model."""
    import_tensorflow(verbose)


def load_model(path: Path, name: str, version: int, verbose: bool = False) -> LoadedModel:
    """Load <path>, check its signatures against the export contract, and warm it up."""
    tf = import_tensorflow(verbose)
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
        name, version, path, 0.0, _read_report(path), _functions=functions, _saved=saved
    )
    model.signature_defs = _read_signature_defs(path)
    for dtype in functions:
        # The first calls trace and allocate; pay for them before taking traffic.
        for count in (1, 32):
            result = model.predict(np.zeros((count, 28, 28), dtype=dtype))
            if result.probabilities.shape != (count, NUM_CLASSES):
                raise ValueError(f"{path} returns probabilities {result.probabilities.shape}")
    model.load_seconds = time.perf_counter() - started
    return model


def _read_signature_defs(path: Path) -> dict[str, Any]:
    """The SignatureDef protos of the served signatures (not __saved_model_init_op)."""
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    saved_model = saved_model_pb2.SavedModel.FromString((path / SAVED_MODEL).read_bytes())
    graphs = saved_model.meta_graphs
    # The "serve" graph, as TensorFlow Serving picks; tf.saved_model.save writes only that one.
    graph = next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])
    signature_defs = {}
    for signature in SIGNATURES.values():
        copy = meta_graph_pb2.SignatureDef()
        copy.CopyFrom(graph.signature_def[signature])  # copied: the graph need not stay in memory
        signature_defs[signature] = copy
    return signature_defs


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads((path / REPORT).read_text())
    except (OSError, ValueError):
        logger.warning("no readable training report", extra={"path": str(path / REPORT)})
        return {}
    return report if isinstance(report, dict) else {}
