"""Model runtimes behind one small interface: load a version folder, predict a batch.

Each runtime is one module, and only it imports its framework (tensorflow.py imports
TensorFlow); nothing else in server/ does. A loaded version is a `Model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mnist_serving.contract import NUM_CLASSES

__all__ = ["NUM_CLASSES", "Model", "Prediction", "import_runtime", "load_model"]


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # float32 [N, 10]
    classes: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.classes)


class Model(Protocol):
    """One loaded, warmed-up model version."""

    name: str
    version: int
    path: Path
    load_seconds: float
    runtime: str  # "tensorflow" or "litert": what runs it, for logs, metadata and metrics
    report: dict[str, Any]  # the trainer's metrics.json
    # Signature name -> SignatureDef proto as written in saved_model.pb: what TensorFlow
    # Serving's GetModelMetadata reports.
    signature_defs: dict[str, Any]

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the signature that matches images.dtype on [N, 28, 28]; blocking."""
        ...

    def release(self) -> None:
        """Drop the hold on the weights (after the version's last call)."""
        ...


def import_runtime(verbose: bool = False) -> None:
    """Import the runtime's framework now (seconds, once per process), without a model."""
    from . import tensorflow

    tensorflow.import_runtime(verbose)


def load_model(path: Path, name: str, version: int, verbose: bool = False) -> Model:
    """Load, check and warm up the version in `path`."""
    from . import tensorflow

    return tensorflow.load_model(path, name, version, verbose)
