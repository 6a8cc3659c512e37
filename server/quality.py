"""Drift signals: live traffic compared with each version's training reference.

An Observer (server/observers.py). On the call path it only computes each image's
statistics (top probability, mean intensity, ink fraction: a few vectorised numpy passes
over the batch) and writes them, with the predicted class, into the version's ring of the
last `--drift-window` images. Every `--drift-interval` seconds `refresh()` (a task of the
server) adds the images seen since the last refresh to the histograms in bulk and sets the
gauges from the ring:

- mnist_class_mix_divergence: Jensen-Shannon divergence of the window's predicted class
  mix from the version's predicted mix on the test set (not from the training labels: the
  model's own errors would then count as drift);
- mnist_confidence_divergence, mnist_low_confidence_rate: the top probability;
- mnist_input_{mean_intensity,ink_fraction}_divergence: the inputs themselves.

Jensen-Shannon (in bits) rather than PSI: it is bounded (0..1, so one threshold fits every
signal), symmetric, and finite when a class is absent from the window ("only sevens"),
where PSI is infinite or as large as the epsilon that hides the empty bin.

Gauges appear once a window holds `--drift-min-images`. A version whose metrics.json has no
reference (exported before the trainer wrote one) is served without drift signals. With
several workers every worker keeps its own windows (its share of the traffic): the gauges
show the largest value over the live workers, the window sizes their sum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mnist_serving.contract.reference import (
    CONFIDENCE_EDGES,
    INK_FRACTION_EDGES,
    MEAN_INTENSITY_EDGES,
    REFERENCE_KEY,
    bin_counts,
    check_reference,
    input_statistics,
    js_divergence,
)

from . import metrics
from .call_context import Call
from .logs import RateLimitedLog
from .observers import Labelled
from .runtimes.base import Prediction
from .settings import Settings
from .versions import ModelRegistry

logger = logging.getLogger(__name__)
ERROR_LOG_INTERVAL = 60.0


class VersionWindow:
    """The last `size` images one version answered: four rings written in slices."""

    def __init__(
        self, version: int, reference: Mapping[str, Any], size: int, min_images: int
    ) -> None:
        self.version = version
        self.reference = reference
        self.size = size
        self.min_images = min_images
        self.classes = np.zeros(size, np.int8)
        self.confidence = np.zeros(size, np.float32)
        self.intensity = np.zeros(size, np.float32)
        self.ink = np.zeros(size, np.float32)
        self._rings: tuple[np.ndarray, ...] = (
            self.classes,
            self.confidence,
            self.intensity,
            self.ink,
        )
        self.written = 0  # images ever written
        self.flushed = 0  # images ever added to the histograms
        label = str(version)
        self._histograms = (
            (metrics.PREDICTION_CONFIDENCE.labels(label), self.confidence, CONFIDENCE_EDGES),
            (metrics.INPUT_MEAN_INTENSITY.labels(label), self.intensity, MEAN_INTENSITY_EDGES),
            (metrics.INPUT_INK_FRACTION.labels(label), self.ink, INK_FRACTION_EDGES),
        )
        self._gauges_set = False
        self.low_confidence_threshold = float(reference["low_confidence_threshold"])

    def add(self, columns: Sequence[np.ndarray]) -> None:
        """One call's per-image values: classes, confidence, mean intensity, ink fraction."""
        count = len(columns[0])
        if count >= self.size:  # one call fills the ring: count all of it, keep its tail
            self.flush()
            for (child, _, edges), values in zip(self._histograms, columns[1:], strict=True):
                _add(child, values, edges)
            for ring, values in zip(self._rings, columns, strict=True):
                ring[:] = values[count - self.size :]
            self.written += count
            self.written -= self.written % self.size  # the ring starts over at 0
            self.flushed = self.written
            return
        if self.written - self.flushed + count > self.size:
            self.flush()  # what the histograms have not counted yet is about to be overwritten
        start = self.written % self.size
        end = start + count
        if end <= self.size:
            for ring, values in zip(self._rings, columns, strict=True):
                ring[start:end] = values
        else:
            split = self.size - start
            for ring, values in zip(self._rings, columns, strict=True):
                ring[start:] = values[:split]
                ring[: end - self.size] = values[split:]
        self.written += count

    def flush(self) -> None:
        """Add the images written since the last flush to the histograms."""
        pending = self.written - self.flushed
        if not pending:
            return
        start = self.flushed % self.size
        end = start + pending
        for child, ring, edges in self._histograms:
            if end <= self.size:
                values = ring[start:end]
            else:
                values = np.concatenate((ring[start:], ring[: end - self.size]))
            _add(child, values, edges)
        self.flushed = self.written

    @property
    def images(self) -> int:
        return min(self.written, self.size)

    def signals(self) -> dict[metrics.DriftGauge, float]:
        """Each drift gauge's value over the window as it is now."""
        count = self.images
        reference = self.reference
        classes = self.classes[:count]
        confidence = self.confidence[:count]
        mix = np.bincount(classes, minlength=len(reference["predicted_distribution"]))
        return {
            metrics.CLASS_MIX_DIVERGENCE: js_divergence(mix, reference["predicted_distribution"]),
            metrics.CONFIDENCE_DIVERGENCE: _divergence(confidence, reference["confidence"]),
            metrics.LOW_CONFIDENCE_RATE: float(
                np.count_nonzero(confidence < self.low_confidence_threshold) / count
            ),
            metrics.INPUT_MEAN_INTENSITY_DIVERGENCE: _divergence(
                self.intensity[:count], reference["mean_intensity"]
            ),
            metrics.INPUT_INK_FRACTION_DIVERGENCE: _divergence(
                self.ink[:count], reference["ink_fraction"]
            ),
        }

    def refresh(self) -> None:
        self.flush()
        label = str(self.version)
        if self.images:
            metrics.DRIFT_WINDOW_IMAGES.labels(label).set(self.images)
        if self.images < self.min_images:
            return
        for gauge, value in self.signals().items():
            gauge.labels(label).set(value)
        self._gauges_set = True

    def remove(self) -> None:
        """Take the version's gauges off the page (it is no longer served)."""
        label = str(self.version)
        for gauge in (*metrics.DRIFT_GAUGES, metrics.DRIFT_WINDOW_IMAGES):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(label)


def _add(child: Any, values: np.ndarray, edges: Sequence[float]) -> None:
    metrics.add_to_histogram(child, bin_counts(values, edges), float(values.sum(dtype=np.float64)))


def _divergence(values: np.ndarray, reference: Mapping[str, Any]) -> float:
    """Divergence of `values`' histogram on the reference's own edges from the reference's."""
    return js_divergence(bin_counts(values, reference["edges"]), reference["fractions"])


class Quality:
    """The drift observer of one server process: a window per served version."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.size = settings.drift_window
        self.min_images = settings.drift_min_images
        self.interval = settings.drift_interval
        self.registry = registry
        # version -> its window, or None for a version without a (valid) reference.
        self._windows: dict[int, VersionWindow | None] = {}
        self._errors = RateLimitedLog(logger, ERROR_LOG_INTERVAL)

    def observe(self, call: Call, images: np.ndarray, prediction: Prediction, version: int) -> None:
        try:
            window = self._windows[version]
        except KeyError:
            window = self._windows[version] = self._open(version)
        if window is None:
            return
        try:
            intensity, ink = input_statistics(images)
            window.add((prediction.classes, prediction.probabilities.max(axis=1), intensity, ink))
        except Exception as error:  # never into the call
            self._errors.warning("drift accounting failed", error=repr(error))

    def feedback(self, labelled: Sequence[Labelled]) -> None:
        """Labels are live accuracy's business (server/feedback.py), not drift's."""

    def _open(self, version: int) -> VersionWindow | None:
        report: Mapping[str, Any] = {}
        for served in self.registry.served:
            if served.version == version:
                report = served.model.report or {}
        if REFERENCE_KEY not in report:
            logger.info(
                "no training reference in this version's metrics.json: no drift signals",
                extra={"version": version},
            )
            return None
        try:
            reference = check_reference(report[REFERENCE_KEY])
        except ValueError as error:
            logger.warning(
                "the version's training reference is malformed: no drift signals",
                extra={"version": version, "reason": str(error)},
            )
            return None
        return VersionWindow(version, reference, self.size, self.min_images)

    def refresh(self) -> None:
        """Update every window's histograms and gauges; forget versions no longer served."""
        served = {s.version for s in self.registry.served}
        for version, window in list(self._windows.items()):
            if version not in served:
                del self._windows[version]
                if window is not None:
                    window.remove()
            elif window is not None:
                window.refresh()

    async def run(self) -> None:
        """refresh() every interval until cancelled (a task of the server)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.refresh()
            except Exception:
                logger.exception("updating the drift signals failed")

    def close(self) -> None:
        """The last refresh: what was counted reaches the histograms."""
        for window in self._windows.values():
            if window is not None:
                window.flush()
