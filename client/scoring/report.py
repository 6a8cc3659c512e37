"""The report both engines end with: accuracy over the rows that have a prediction, and the
confusion matrix (CSV, and PNG when matplotlib is importable)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import NUM_CLASSES


@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int  # rows with both a label and a prediction

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @staticmethod
    def of(matrix: npt.NDArray[np.int64]) -> Accuracy:
        return Accuracy(int(np.trace(matrix)), int(matrix.sum()))

    def __str__(self) -> str:
        return f"accuracy {self.value:.4f} ({self.correct}/{self.total} with a prediction)"


def confusion_matrix(
    labels: npt.NDArray[np.int64], classes: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Counts [true label, predicted class] over the rows that have a prediction."""
    ok = classes >= 0
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(matrix, (labels[ok], classes[ok]), 1)
    return matrix


def write_confusion(matrix: npt.NDArray[np.int64], output: Path) -> list[Path]:
    """`<output stem>.confusion.csv`, plus a .png when matplotlib is importable."""
    base = output.with_suffix("")
    csv_path = base.with_name(base.name + ".confusion.csv")
    with csv_path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(["label", *(f"predicted_{i}" for i in range(NUM_CLASSES))])
        for label, row in enumerate(matrix.tolist()):
            writer.writerow([label, *row])
    written = [csv_path]
    png_path = base.with_name(base.name + ".confusion.png")
    if _plot_confusion(matrix, png_path):
        written.append(png_path)
    return written


def _plot_confusion(matrix: npt.NDArray[np.int64], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 5.5))
    axes.imshow(np.log1p(matrix), cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            color = "white" if np.log1p(count) > 0.6 * np.log1p(matrix.max()) else "black"
            axes.text(col, row, str(count), ha="center", va="center", fontsize=7, color=color)
    axes.set_xticks(range(NUM_CLASSES))
    axes.set_yticks(range(NUM_CLASSES))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true label")
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    axes.set_title(f"Confusion matrix: {matrix.sum()} images, accuracy {accuracy:.4f}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
