"""What both APIs (native and TensorFlow Serving) call: decode, validate, route, predict.

Knows no proto: servicers translate their messages into these arguments and back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .runtimes import NUM_CLASSES, Prediction
from .settings import Settings
from .validation import decode_images
from .versions import ModelRegistry

CLASS_LABELS = tuple(str(digit) for digit in range(NUM_CLASSES))


@dataclass(frozen=True)
class Answer:
    prediction: Prediction
    model_name: str
    version: int


@dataclass(frozen=True)
class VersionReport:
    version: int
    report: dict[str, Any]  # the trainer's metrics.json
    # Signature name -> the SavedModel's SignatureDef proto, passed through untouched.
    signature_defs: Mapping[str, Any] = field(default_factory=dict)
    runtime: str = ""  # "litert" or "tensorflow"


class InferenceCore:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    @property
    def model_name(self) -> str:
        return self.registry.name

    async def predict(
        self,
        *,
        model_name: str,
        version: int,
        dtype: str,
        shape: Sequence[int],
        content: bytes,
        time_remaining: float | None,
    ) -> Answer:
        """Classify the images in `content`; time_remaining is the caller's deadline budget."""
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        served = self.registry.resolve(model_name, version)
        images = decode_images(dtype, shape, content, self.settings.max_images_per_request)
        prediction = await served.predict(images, deadline)
        return Answer(prediction, self.registry.name, served.version)

    def versions(self, model_name: str = "") -> list[VersionReport]:
        """Loaded versions, newest first, with the training report of each."""
        self.registry.resolve(model_name, 0)  # NOT_FOUND for another model's name
        return [
            VersionReport(s.version, s.model.report, s.model.signature_defs, s.model.runtime)
            for s in self.registry.served
        ]
