"""Drift signals: live traffic compared with each version's training reference.

An Observer (server/observers.py). On the call path it only copies the call's pixels,
probabilities and classes into the version's rings of the last `--drift-window` images (a
few slice assignments, whatever the batch size). Every `--drift-interval` seconds
`refresh()` (a task of the server) derives each new image's statistics (top probability,
mean intensity, ink fraction) in one vectorised pass, adds them to the histograms in bulk,
and sets the gauges from the window:

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
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mnist_serving.contract import IMAGE_SIDE, NUM_CLASSES
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
# The input statistics (mean intensity, ink fraction) of at most this many images per flush,
# evenly spaced: at high rates they are most of drift's cost (0.3 us an image), and a sample
# of this size estimates their histograms well. The confidence and the class mix count every
# image.
INPUT_SAMPLE = 1024
PIXELS = IMAGE_SIDE * IMAGE_SIDE


class VersionWindow:
    """The last `size` images one version answered, in rings written in slices.

    `add` (the call path) only copies the call's pixels, probabilities and classes into the
    rings: a few slice assignments whatever the batch size. `flush` (each refresh, or when
    unflushed images are about to be overwritten) derives the per-image statistics of the
    images added since the last flush, in one vectorised pass over all of them, and adds
    them to the histograms.
    """

    def __init__(
        self,
        version: int,
        reference: Mapping[str, Any],
        size: int,
        min_images: int,
        input_sample: int | None = INPUT_SAMPLE,
    ) -> None:
        self.version = version
        self.input_sample = input_sample  # None: the statistics of every image
        self.reference = reference
        self.size = size
        self.min_images = min_images
        # What calls write (about 840 bytes an image: 8.4 MB for 10,000 images)...
        self.classes = np.zeros(size, np.int8)
        self.probabilities = np.zeros((size, NUM_CLASSES), np.float32)
        self.pixels = np.zeros((size, PIXELS), np.uint8)
        # ...and what flush derives from it.
        self.confidence = np.zeros(size, np.float32)
        self.intensity = np.zeros(size, np.float32)
        self.ink = np.zeros(size, np.float32)
        self.written = 0  # images ever written
        self.flushed = 0  # images ever derived and added to the histograms
        label = str(version)
        self._histograms = (
            (metrics.PREDICTION_CONFIDENCE.labels(label), CONFIDENCE_EDGES),
            (metrics.INPUT_MEAN_INTENSITY.labels(label), MEAN_INTENSITY_EDGES),
            (metrics.INPUT_INK_FRACTION.labels(label), INK_FRACTION_EDGES),
        )
        self.low_confidence_threshold = float(reference["low_confidence_threshold"])

    def add(self, pixels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> None:
        """One call: uint8 pixels [N, 784], probabilities [N, 10], classes [N]."""
        count = len(classes)
        if count >= self.size:  # one call fills the ring: count all of it, keep its tail
            self.flush()
            derived = _derive(pixels, probabilities, classes, self.input_sample)
            self._count(derived)
            tail = slice(count - self.size, count)
            self.classes[:] = classes[tail]
            self.probabilities[:] = probabilities[tail]
            self.pixels[:] = pixels[tail]
            self.confidence[:], self.intensity[:], self.ink[:] = (v[tail] for v in derived)
            self.written = self.flushed = (self.written // self.size + 1) * self.size
            return
        if self.written - self.flushed + count > self.size:
            self.flush()  # what the histograms have not counted yet is about to be overwritten
        start = self.written % self.size
        end = start + count
        if end <= self.size:
            self.classes[start:end] = classes
            self.probabilities[start:end] = probabilities
            self.pixels[start:end] = pixels
        else:
            split = self.size - start
            rest = end - self.size
            self.classes[start:] = classes[:split]
            self.classes[:rest] = classes[split:]
            self.probabilities[start:] = probabilities[:split]
            self.probabilities[:rest] = probabilities[split:]
            self.pixels[start:] = pixels[:split]
            self.pixels[:rest] = pixels[split:]
        self.written += count

    def flush(self) -> None:
        """Derive the statistics of the images written since the last flush; count them."""
        pending = self.written - self.flushed
        if not pending:
            return
        start = self.flushed % self.size
        end = start + pending
        spans = [(start, end)] if end <= self.size else [(start, self.size), (0, end - self.size)]
        parts = []
        sample = self.input_sample
        for first, last in spans:
            derived = _derive(
                self.pixels[first:last],
                self.probabilities[first:last],
                self.classes[first:last],
                None if sample is None else sample * (last - first) // pending,
            )
            self.confidence[first:last], self.intensity[first:last], self.ink[first:last] = derived
            parts.append(derived)
        if len(parts) == 1:
            self._count(parts[0])
        else:
            self._count(
                tuple(np.concatenate(values) for values in zip(*parts, strict=True))  # type: ignore[arg-type]
            )
        self.flushed = self.written

    def _count(self, derived: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        for (child, edges), values in zip(self._histograms, derived, strict=True):
            values = values[~np.isnan(values)]  # the images whose statistics were sampled
            metrics.add_to_histogram(
                child, bin_counts(values, edges), float(values.sum(dtype=np.float64))
            )

    @property
    def images(self) -> int:
        return min(self.written, self.size)

    def signals(self) -> dict[metrics.DriftGauge, float]:
        """Each drift gauge's value over the window (flushed first)."""
        count = self.images
        reference = self.reference
        confidence = self.confidence[:count]
        mix = np.bincount(self.classes[:count], minlength=NUM_CLASSES)
        return {
            metrics.CLASS_MIX_DIVERGENCE: js_divergence(mix, reference["predicted_distribution"]),
            metrics.CONFIDENCE_DIVERGENCE: _divergence(confidence, reference["confidence"]),
            metrics.LOW_CONFIDENCE_RATE: float(
                np.count_nonzero(confidence < self.low_confidence_threshold) / count
            ),
            metrics.INPUT_MEAN_INTENSITY_DIVERGENCE: _divergence(
                _sampled(self.intensity[:count]), reference["mean_intensity"]
            ),
            metrics.INPUT_INK_FRACTION_DIVERGENCE: _divergence(
                _sampled(self.ink[:count]), reference["ink_fraction"]
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

    def remove(self) -> None:
        """Take the version's gauges off the page (it is no longer served)."""
        label = str(self.version)
        for gauge in (*metrics.DRIFT_GAUGES, metrics.DRIFT_WINDOW_IMAGES):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(label)


def _derive(
    pixels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray, sample: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top probability (the predicted class's: a gather, 50x cheaper than a max over rows
    of 10) of each image, and the mean intensity and ink fraction of each, or, with
    `sample`, of at most about that many evenly spaced images (NaN for the others)."""
    count = len(classes)
    rows = np.arange(count) * NUM_CLASSES
    confidence = probabilities.reshape(-1)[rows + classes]
    if sample is None or count <= max(sample, 1):
        intensity, ink = input_statistics(pixels)
    else:
        step = -(-count // max(sample, 1))
        intensity = np.full(count, np.nan, np.float32)
        ink = np.full(count, np.nan, np.float32)
        intensity[::step], ink[::step] = input_statistics(np.ascontiguousarray(pixels[::step]))
    return confidence, intensity, ink


def _sampled(values: np.ndarray) -> np.ndarray:
    """The values of the images whose input statistics were derived."""
    sampled: np.ndarray = values[~np.isnan(values)]
    return sampled


def as_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 784]: the pixels as sent, or float32 images in [0, 1] rounded to 0..255
    (their statistics then agree with the float values' to within that rounding)."""
    flat = images.reshape(len(images), PIXELS)
    if flat.dtype == np.uint8:
        return flat
    pixels: np.ndarray = np.rint(np.clip(flat, 0.0, 1.0) * 255).astype(np.uint8)
    return pixels


def _divergence(values: np.ndarray, reference: Mapping[str, Any]) -> float:
    """Divergence of `values`' histogram on the reference's own edges from the reference's."""
    return js_divergence(bin_counts(values, reference["edges"]), reference["fractions"])


class Quality:
    """The drift observer of one server process: a window per served version."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.size = settings.drift_window
        self.min_images = settings.drift_min_images
        self.interval = settings.drift_interval
        self.sample_rate = settings.drift_sample_rate
        self.registry = registry
        # version -> its window, or None for a version without a (valid) reference.
        self._windows: dict[int, VersionWindow | None] = {}
        self._errors = RateLimitedLog(logger, ERROR_LOG_INTERVAL)

    def observe(self, call: Call, images: np.ndarray, prediction: Prediction, version: int) -> None:
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return
        try:
            window = self._windows[version]
        except KeyError:
            window = self._windows[version] = self._open(version)
        if window is None:
            return
        try:
            window.add(as_pixels(images), prediction.probabilities, prediction.classes)
        except Exception as error:  # never into the call
            self._errors.warning("drift accounting failed", error=repr(error))

    def feedback(self, labelled: Sequence[Labelled]) -> None:
        """Labels are live accuracy's business (server/feedback.py), not drift's."""

    def _open(self, version: int) -> VersionWindow | None:
        report = self.registry.report_of(version)
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
