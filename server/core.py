"""What every API (native, TensorFlow Serving, Open Inference) calls: decode, validate,
route, predict.

Knows no proto: servicers translate their messages into these arguments and back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mnist_serving.contract import NUM_CLASSES

from .call_context import admit_images, current_call
from .errors import ModelNotFound, NotReady
from .feedback import FeedbackLabel, FeedbackOutcome, RecentPredictions, check_labels
from .observers import Observer
from .runtimes.base import Prediction
from .settings import Settings
from .validation import decode_images
from .versions import ModelRegistry

logger = logging.getLogger(__name__)
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
    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        observers: Sequence[Observer] = (),
        recent: RecentPredictions | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        # The recent predictions that feedback labels are joined to (an observer too).
        self.recent = recent or RecentPredictions(settings.feedback_window)
        # What watches every answer (server/observers.py): drift, feedback, prediction log.
        self.observers = (self.recent, *observers)
        # Whether the server takes inference requests: app.py sets it once serving and
        # clears it at shutdown; the readiness answers of every API follow it.
        self.ready = False

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
        if not self.registry.loaded_any:
            raise NotReady("the model is still loading; retry shortly")
        served = self.registry.resolve(model_name, version)
        images = decode_images(dtype, shape, content, self.settings.max_images_per_request)
        call = current_call()
        call.images, call.model_version = len(images), served.version  # the access log's
        admit_images(call, len(images))  # the caller's images/s limit (server/auth.py)
        prediction = await served.predict(images, deadline, call.priority)
        for observer in self.observers:
            observer.observe(call, images, prediction, served.version)
        return Answer(prediction, self.registry.name, served.version)

    def feedback(self, labels: Sequence[FeedbackLabel]) -> FeedbackOutcome:
        """Join callers' true labels to the predictions they are about (INVALID_ARGUMENT
        for a malformed batch); the observers hear of the accepted ones."""
        check_labels(labels)
        outcome = self.recent.join(labels)
        if outcome.labelled:
            for observer in self.observers:
                try:
                    observer.feedback(outcome.labelled)
                except Exception:  # an observer's failure is its own, never the caller's
                    logger.exception("an observer failed on feedback")
        return outcome

    def versions(self, model_name: str = "") -> list[VersionReport]:
        """Loaded versions, newest first, with the training report of each."""
        if model_name and model_name != self.registry.name:
            self.registry.resolve(model_name, 0)  # NOT_FOUND, with the registry's message
        return [
            VersionReport(s.version, s.model.report, s.model.signature_defs, s.model.runtime)
            for s in self.registry.served
        ]

    def chosen_versions(self, model_name: str, version: int) -> list[VersionReport]:
        """The version a caller pins, or every loaded one (newest first) for version 0;
        NOT_FOUND when the pinned one is not loaded. What every API's status and metadata
        calls answer from."""
        versions = self.versions(model_name)
        if not version:
            return versions
        chosen = [v for v in versions if v.version == version]
        if not chosen:
            loaded = ", ".join(str(v.version) for v in versions) or "none"
            raise ModelNotFound(
                f"version {version} of {self.model_name!r} is not loaded (loaded: {loaded})"
            )
        return chosen
