"""What every runtime module implements and returns: a loaded `Model` and its `Prediction`.

A leaf of the runtimes package: the runtime modules import it, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


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
    # Batches of at most this many images may be predicted on the event loop's own thread
    # (cheaper than a thread hop when the call takes microseconds), also while another call
    # runs on the inference thread; 0: never.
    inline_max_images: int

    def predict(self, images: np.ndarray) -> Prediction:
        """Run the signature that matches images.dtype on [N, 28, 28]; blocking."""
        ...

    def release(self) -> None:
        """Drop the hold on the weights (after the version's last call)."""
        ...
