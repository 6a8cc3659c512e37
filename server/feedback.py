"""Ground-truth feedback: labels joined to the predictions they are about; live accuracy.

`RecentPredictions` is an Observer (server/observers.py) that remembers the classes each
recent call predicted, keyed by its request ID, for at most `--feedback-window` images: on
the call path one dict entry and one small array per call, the oldest calls forgotten first.
`join` takes labels (request_id, index, label) and answers how many were accepted, unknown
(an ID never seen, one forgotten, an index past the call's images) or duplicate (the image
already has a label; the first one counts). Accepted labels count into
mnist_feedback_total{version} and mnist_feedback_correct_total{version}.

The window is per process: with --workers N a label is joined only by the worker that made
the prediction. A gRPC channel keeps one connection, which the kernel gives to one worker,
so labels sent on the channel that made the predictions find them (docs/operations/
model-quality.md says what else to do).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mnist_serving.contract import NUM_CLASSES

from . import metrics
from .call_context import MAX_REQUEST_ID, Call
from .errors import InvalidInput
from .observers import Labelled
from .runtimes.base import Prediction

MAX_LABELS = 10_000  # per feedback call


@dataclass(frozen=True, slots=True)
class FeedbackLabel:
    request_id: str
    index: int
    label: int


@dataclass
class FeedbackOutcome:
    accepted: int = 0
    unknown: int = 0
    duplicate: int = 0
    unknown_indices: list[int] = field(default_factory=list)
    labelled: list[Labelled] = field(default_factory=list)


@dataclass(slots=True)
class _Remembered:
    version: int
    predicted: np.ndarray  # int8 [images]
    labelled: np.ndarray  # bool [images]


def check_labels(labels: Sequence[FeedbackLabel]) -> None:
    """INVALID_ARGUMENT for a call that is not a batch of labels this server can take."""
    if not labels:
        raise InvalidInput("no labels: send at least one (request_id, index, label)")
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"{len(labels)} labels in one call; at most {MAX_LABELS}, split them")
    for position, item in enumerate(labels):
        if not item.request_id:
            raise InvalidInput(f"labels[{position}]: request_id is empty")
        if len(item.request_id) > MAX_REQUEST_ID:
            raise InvalidInput(
                f"labels[{position}]: request_id is longer than {MAX_REQUEST_ID} characters"
            )
        if item.index < 0:
            raise InvalidInput(f"labels[{position}]: index {item.index} is negative")
        if not 0 <= item.label < NUM_CLASSES:
            raise InvalidInput(
                f"labels[{position}]: label {item.label} is not a class (0..{NUM_CLASSES - 1})"
            )


class RecentPredictions:
    """The predictions of the last `capacity` images, by (request ID, index)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._calls: OrderedDict[str, _Remembered] = OrderedDict()
        self._images = 0

    @property
    def images(self) -> int:
        return self._images

    def observe(self, call: Call, images: np.ndarray, prediction: Prediction, version: int) -> None:
        request_id = call.request_id
        if not self.capacity or not request_id:
            return
        count = len(prediction.classes)
        calls = self._calls
        previous = calls.pop(request_id, None)  # a caller that reuses its ID: the last call
        if previous is not None:
            self._images -= len(previous.predicted)
        calls[request_id] = _Remembered(
            version, prediction.classes.astype(np.int8), np.zeros(count, np.bool_)
        )
        self._images += count
        while self._images > self.capacity and calls:
            _, oldest = calls.popitem(last=False)
            self._images -= len(oldest.predicted)

    def feedback(self, labelled: Sequence[Labelled]) -> None:
        """This observer is where labels are joined; it needs no telling."""

    def join(self, labels: Sequence[FeedbackLabel]) -> FeedbackOutcome:
        """Join checked labels to their predictions; count them and live accuracy."""
        outcome = FeedbackOutcome()
        per_version: dict[int, list[int]] = {}  # version -> [total, correct]
        calls = self._calls
        for position, item in enumerate(labels):
            remembered = calls.get(item.request_id)
            if remembered is None or item.index >= len(remembered.predicted):
                outcome.unknown += 1
                outcome.unknown_indices.append(position)
                continue
            if remembered.labelled[item.index]:
                outcome.duplicate += 1
                continue
            remembered.labelled[item.index] = True
            predicted = int(remembered.predicted[item.index])
            outcome.accepted += 1
            counts = per_version.setdefault(remembered.version, [0, 0])
            counts[0] += 1
            counts[1] += predicted == item.label
            outcome.labelled.append(
                Labelled(item.request_id, item.index, item.label, remembered.version, predicted)
            )
        for version, (total, correct) in per_version.items():
            metrics.FEEDBACK.labels(str(version)).inc(total)
            metrics.FEEDBACK_CORRECT.labels(str(version)).inc(correct)  # 0: the series exists
        for result, count in (
            ("accepted", outcome.accepted),
            ("unknown", outcome.unknown),
            ("duplicate", outcome.duplicate),
        ):
            if count:
                metrics.FEEDBACK_LABELS.labels(result).inc(count)
        return outcome
