"""The run's report: metrics.json, history.json and four figures (numpy and matplotlib only).

Written into a version's assets.extra/ folder before the export is renamed into place:

    metrics.json            test loss/accuracy, per-class precision/recall, settings, data sha256
    history.json            per-epoch loss/accuracy on the training and validation splits
    loss.png, accuracy.png  training vs validation per epoch
    confusion_matrix.png    test set, true label (rows) vs predicted label (columns)
    samples.png             a few test images with their predicted probabilities

The server reads metrics.json's keys by name; keep them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from mnist_serving.contract import NUM_CLASSES

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
FIGURES = ("loss.png", "accuracy.png", "confusion_matrix.png", "samples.png")
_DPI = 100


def confusion_matrix(
    labels: npt.NDArray[np.integer[Any]], predicted: npt.NDArray[np.integer[Any]]
) -> npt.NDArray[np.int64]:
    """Counts [true label, predicted label], NUM_CLASSES x NUM_CLASSES."""
    counts = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return counts


def per_class(counts: npt.NDArray[np.int64]) -> list[dict[str, Any]]:
    """Precision, recall and support per label; 0.0 where a ratio has nothing to count."""
    rows = []
    for label in range(NUM_CLASSES):
        hits = int(counts[label, label])
        predicted = int(counts[:, label].sum())
        support = int(counts[label, :].sum())
        rows.append(
            {
                "label": str(label),
                "precision": hits / predicted if predicted else 0.0,
                "recall": hits / support if support else 0.0,
                "support": support,
            }
        )
    return rows


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever the process' default backend is
    return figure


def plot_history(
    history: Mapping[str, Sequence[float]], metric: str, title: str, path: Path
) -> None:
    """Training vs validation `metric` per epoch (validation omitted when it was not run)."""
    figure = _new_figure(6, 4)
    axes = figure.add_subplot()
    train = history[metric]
    epochs = np.arange(1, len(train) + 1)
    axes.plot(epochs, train, marker="o", label="training")
    validation = history.get(f"val_{metric}")
    if validation:
        axes.plot(epochs, validation, marker="o", label="validation")
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_xticks(epochs)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path)


def plot_confusion(counts: npt.NDArray[np.int64], path: Path) -> None:
    """Counts on a log colour scale so that the few mistakes show next to the large diagonal."""
    figure = _new_figure(7, 6)
    axes = figure.add_subplot()
    shown = np.ma.masked_equal(counts, 0)
    image = axes.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(int(counts.max()), 2)))
    figure.colorbar(image, ax=axes, label="images (log scale)")
    threshold = np.sqrt(max(int(counts.max()), 1))
    for true in range(NUM_CLASSES):
        for guess in range(NUM_CLASSES):
            count = int(counts[true, guess])
            if count:
                colour = "white" if count > threshold else "black"
                axes.text(
                    guess, true, str(count), ha="center", va="center", fontsize=8, color=colour
                )
    ticks = np.arange(NUM_CLASSES)
    axes.set_xticks(ticks)
    axes.set_yticks(ticks)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    accuracy = np.trace(counts) / max(int(counts.sum()), 1)
    axes.set_title(
        f"Confusion matrix, test set ({int(counts.sum())} images, accuracy {accuracy:.4f})"
    )
    figure.savefig(path)


def pick_samples(
    labels: npt.NDArray[np.integer[Any]], predicted: npt.NDArray[np.integer[Any]], count: int = 10
) -> npt.NDArray[np.int64]:
    """The first test images, then up to a third of `count` misclassified ones."""
    wrong = np.flatnonzero(labels != predicted)[: count // 3]
    right = np.setdiff1d(np.arange(len(labels)), wrong)[: count - len(wrong)]
    return np.concatenate([right, wrong]).astype(np.int64)


def plot_samples(
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.integer[Any]],
    probabilities: npt.NDArray[np.floating[Any]],
    path: Path,
) -> None:
    """Each image above a bar chart of its ten probabilities; the predicted bar highlighted."""
    count = len(images)
    figure = _new_figure(1.6 * count, 4.2)
    grid = figure.add_gridspec(2, count, height_ratios=[1.1, 1])
    for column in range(count):
        predicted = int(np.argmax(probabilities[column]))
        correct = predicted == int(labels[column])
        picture = figure.add_subplot(grid[0, column])
        picture.imshow(images[column], cmap="gray", vmin=0, vmax=255)
        picture.set_xticks([])
        picture.set_yticks([])
        confidence = probabilities[column][predicted]
        picture.set_title(
            f"true {int(labels[column])}\npred {predicted} ({confidence:.2f})",
            fontsize=9,
            color="black" if correct else "red",
        )
        bars = figure.add_subplot(grid[1, column])
        colours = ["tab:gray"] * NUM_CLASSES
        colours[predicted] = "tab:blue" if correct else "tab:red"
        bars.bar(np.arange(NUM_CLASSES), probabilities[column], color=colours)
        bars.set_ylim(0, 1)
        bars.set_xticks(np.arange(NUM_CLASSES))
        bars.tick_params(axis="x", labelsize=7)
        if column:
            bars.set_yticklabels([])
        else:
            bars.set_ylabel("probability")
    figure.suptitle("Test images and predicted probabilities (mistakes in red)")
    figure.savefig(path)


def write_report(
    folder: Path,
    metrics: Mapping[str, Any],
    history: Mapping[str, Sequence[float]],
    confusion: npt.NDArray[np.int64],
    sample_images: npt.NDArray[np.uint8],
    sample_labels: npt.NDArray[np.integer[Any]],
    sample_probabilities: npt.NDArray[np.floating[Any]],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / METRICS_FILE, metrics)
    epochs = len(next(iter(history.values()), []))
    write_json(folder / HISTORY_FILE, {"epoch": list(range(1, epochs + 1)), **history})
    plot_history(history, "loss", "Loss per epoch", folder / "loss.png")
    plot_history(history, "accuracy", "Accuracy per epoch", folder / "accuracy.png")
    plot_confusion(confusion, folder / "confusion_matrix.png")
    plot_samples(sample_images, sample_labels, sample_probabilities, folder / "samples.png")
    logger.debug("report written to %s", folder)
