"""What watches the answers: the hook through which per-prediction consumers (drift
signals, live accuracy, the prediction log) see every inference call.

`InferenceCore` calls `observe` on each observer after a call's prediction, on the event
loop, before the answer is encoded: an observer must return at once (hand heavy work to a
thread of its own, drop rather than block) and never raise into the call. `feedback` is
told the ground-truth labels that callers sent and that were joined to a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .call_context import Call
from .runtimes.base import Prediction


@dataclass(frozen=True, slots=True)
class Labelled:
    """One feedback label joined to the prediction it is about."""

    request_id: str
    index: int  # the image's position in its call
    label: int  # the true class, as the caller says
    model_version: int
    predicted: int


class Observer(Protocol):
    def observe(self, call: Call, images: np.ndarray, prediction: Prediction, version: int) -> None:
        """One call's images (uint8 [N, 28, 28]) and what the model answered for them."""

    def feedback(self, labelled: Sequence[Labelled]) -> None:
        """Labels joined to their predictions (called from the event loop)."""
