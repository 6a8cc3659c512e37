"""The training reference: what live traffic is compared with to see drift.

The trainer writes it into metrics.json under REFERENCE_KEY; the server reads it with each
version and compares a sliding window of its traffic with it. Both compute the same
statistics with the same functions and the same histogram edges, defined here (numpy only).

    "reference": {
      "class_distribution":     [10 floats], the training labels' class shares
      "predicted_distribution": [10 floats], the model's predicted classes on the test set
      "confidence":  {"edges", "fractions"}, top probability on the test set
      "low_confidence_threshold": 0.5, "low_confidence_rate": test-set share below it
      "mean_intensity": {"edges", "fractions", "mean", "std"}, per-image mean pixel in [0, 1]
      "ink_fraction":   {"edges", "fractions", "mean", "std"}, per-image share of pixels > 0.5
    }

Histogram bins are (edges[i], edges[i+1]], the first one closed at edges[0] and the last
one open above: the same bins as Prometheus buckets `le` edges[1:-1] and +Inf.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import NUM_CLASSES

REFERENCE_KEY = "reference"
LOW_CONFIDENCE_THRESHOLD = 0.5
# Top probability: at least 1/10 by construction; the resolution is where models live.
CONFIDENCE_EDGES = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
# MNIST digits: mean pixel about 0.13, ink about 0.1 of the pixels; the fine bins cover
# that, the coarse ones catch what is not a white digit on black (inverted: ~0.87; noise: ~0.5).
INPUT_EDGES = (
    0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0,
)  # fmt: skip
MEAN_INTENSITY_EDGES = INPUT_EDGES
INK_FRACTION_EDGES = INPUT_EDGES
INK_THRESHOLD_UINT8 = 127  # a pixel is ink when > 0.5 of full scale: > 127 of 255

FloatArray = npt.NDArray[np.float32]
_HIGH_BITS = np.uint64(0x8080808080808080)
_bitwise_count = getattr(np, "bitwise_count", None)  # numpy >= 2.0


def input_statistics(images: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """Per-image mean intensity in [0, 1] and ink fraction (share of pixels > 0.5) of
    uint8 (0..255) or float (already in [0, 1]) images, [N, 28, 28] or [N, 784]."""
    count = len(images)
    flat = images.reshape(count, -1)
    pixels = flat.shape[1] if count else 1
    if flat.dtype == np.uint8:
        sums = flat.sum(axis=1, dtype=np.uint32)
        mean = sums.astype(np.float32) / np.float32(255 * pixels)
        if _bitwise_count is not None and pixels % 8 == 0 and flat.flags.c_contiguous:
            # A pixel > 127 has its high bit set: count those bits 8 pixels at a time
            # (4x faster than comparing and counting, on 10,000 images).
            ink = _bitwise_count(flat.view(np.uint64) & _HIGH_BITS).sum(axis=1, dtype=np.uint32)
        else:
            ink = np.count_nonzero(flat > INK_THRESHOLD_UINT8, axis=1)
    else:
        mean = flat.mean(axis=1, dtype=np.float32)
        ink = np.count_nonzero(flat > 0.5, axis=1)
    return mean.astype(np.float32, copy=False), (ink / np.float32(pixels)).astype(np.float32)


def bin_index(values: np.ndarray, edges: Sequence[float]) -> npt.NDArray[np.intp]:
    """The bin of each value: (edges[i], edges[i+1]], as Prometheus' `le` buckets."""
    return np.searchsorted(np.asarray(edges[1:-1], dtype=np.float64), values, side="left")


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> npt.NDArray[np.int64]:
    return np.bincount(bin_index(values, edges), minlength=len(edges) - 1).astype(np.int64)


def shares(counts: np.ndarray) -> npt.NDArray[np.float64]:
    """Counts as fractions of their total (zeros when there is nothing)."""
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts))


def histogram(values: np.ndarray, edges: Sequence[float]) -> dict[str, Any]:
    """The reference's form of a statistic: edges, fractions per bin, mean and std."""
    return {
        "edges": [float(e) for e in edges],
        "fractions": [float(f) for f in shares(bin_counts(values, edges))],
        "mean": float(np.mean(values)) if len(values) else 0.0,
        "std": float(np.std(values)) if len(values) else 0.0,
    }


def class_distribution(classes: np.ndarray) -> list[float]:
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=NUM_CLASSES)
    return [float(f) for f in shares(counts[:NUM_CLASSES])]


def build_reference(
    train_images: np.ndarray, train_labels: np.ndarray, test_probabilities: np.ndarray
) -> dict[str, Any]:
    """The reference of a trained model: its training data and its test-set answers."""
    confidence = np.asarray(test_probabilities).max(axis=1)
    intensity, ink = input_statistics(train_images)
    conf = histogram(confidence, CONFIDENCE_EDGES)
    del conf["mean"], conf["std"]
    return {
        "class_distribution": class_distribution(train_labels),
        "predicted_distribution": class_distribution(np.asarray(test_probabilities).argmax(1)),
        "confidence": conf,
        "low_confidence_threshold": LOW_CONFIDENCE_THRESHOLD,
        "low_confidence_rate": float(np.mean(confidence < LOW_CONFIDENCE_THRESHOLD)),
        "mean_intensity": histogram(intensity, MEAN_INTENSITY_EDGES),
        "ink_fraction": histogram(ink, INK_FRACTION_EDGES),
    }


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions, in bits: 0 (same) to 1 (disjoint).

    Bounded and defined when a bin is empty on one side (PSI is not: one empty live class
    makes it infinite, or as large as the epsilon chosen to hide that)."""
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    a = a / a.sum() if a.sum() else a
    b = b / b.sum() if b.sum() else b
    m = (a + b) / 2

    def kl(x: npt.NDArray[np.float64]) -> float:
        present = x > 0
        return float(np.sum(x[present] * np.log2(x[present] / m[present])))

    return max(0.0, (kl(a) + kl(b)) / 2)


def check_reference(value: object, *, lenient: bool = False) -> dict[str, Any]:
    """The reference as read from metrics.json, or ValueError saying what is wrong with it.
    `lenient` (a reader of a prediction log): the input statistics and the threshold may be
    missing, and are checked where present."""
    if not isinstance(value, Mapping):
        raise ValueError(f"the reference is a {type(value).__name__}, not an object")
    reference = dict(value)
    for key in ("class_distribution", "predicted_distribution"):
        shares_ = reference.get(key)
        if not isinstance(shares_, list) or len(shares_) != NUM_CLASSES:
            raise ValueError(f"{key} must be a list of {NUM_CLASSES} numbers")
    for key in ("confidence", "mean_intensity", "ink_fraction"):
        if lenient and key != "confidence" and key not in reference:
            continue
        hist = reference.get(key)
        if not isinstance(hist, Mapping):
            raise ValueError(f"{key} must be an object with edges and fractions")
        edges, fractions = hist.get("edges"), hist.get("fractions")
        if (
            not isinstance(edges, list)
            or not isinstance(fractions, list)
            or len(edges) < 2
            or len(fractions) != len(edges) - 1
            or any(b <= a for a, b in itertools.pairwise(edges))
        ):
            raise ValueError(f"{key}: edges must increase and there must be one fraction per bin")
    threshold = reference.get("low_confidence_threshold")
    if lenient and threshold is None:
        return reference
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError("low_confidence_threshold must be a number in (0, 1]")
    return reference
