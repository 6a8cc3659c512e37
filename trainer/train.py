"""Fit a network on MNIST, evaluate it on the test set, export it with its report."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import next_version
from mnist_serving.contract.reference import REFERENCE_KEY, build_reference
from mnist_serving.contract.tfquiet import import_tensorflow

from . import report
from .data import Dataset, scale
from .export import export_saved_model
from .model import build_model

logger = logging.getLogger(__name__)

VALIDATION_SPLIT = 0.1
_PREDICT_BATCH = 1024  # evaluation only; any size gives the same numbers, larger is faster


@dataclass(frozen=True)
class TrainConfig:
    model_dir: Path
    arch: str = "mlp"
    epochs: int = 5
    batch_size: int = 32
    seed: int | None = None
    early_stopping: int | None = None  # patience in epochs on val_loss; None: train all epochs
    version: int | None = None  # None: the next free version number
    verbose: bool = False  # show the LiteRT converter's own log lines


@dataclass(frozen=True)
class TrainResult:
    version_dir: Path
    metrics: dict[str, Any]


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    result: npt.NDArray[np.float64] = exponentials / exponentials.sum(axis=-1, keepdims=True)
    return result


def utc_now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def train_and_export(config: TrainConfig, dataset: Dataset) -> TrainResult:
    """Train as configured, print Keras' progress, export <model_dir>/<version> with its report."""
    tf = import_tensorflow()
    keras = tf.keras
    if config.seed is not None:
        # Seeds Python, numpy and TensorFlow; determinism makes the same seed give the same
        # weights on the same machine (CPU reductions are otherwise free to reorder).
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()

    model = build_model(config.arch)
    model.summary()
    callbacks: list[Any] = []
    stopper = None
    if config.early_stopping is not None:
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping, restore_best_weights=True
        )
        callbacks.append(stopper)

    x_train, x_test = scale(dataset.x_train), scale(dataset.x_test)
    started = time.monotonic()
    fitted = model.fit(
        x_train,
        dataset.y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        validation_split=VALIDATION_SPLIT,
        callbacks=callbacks,
        # A progress bar on a terminal; one line per epoch in a log file.
        verbose=1 if sys.stdout.isatty() else 2,
    )
    train_seconds = time.monotonic() - started
    history = {key: [float(v) for v in values] for key, values in fitted.history.items()}

    test_loss, test_accuracy = model.evaluate(
        x_test, dataset.y_test, batch_size=_PREDICT_BATCH, verbose=0
    )
    probabilities = softmax(model.predict(x_test, batch_size=_PREDICT_BATCH, verbose=0))
    predicted = probabilities.argmax(axis=-1)
    confusion = report.confusion_matrix(dataset.y_test, predicted)
    samples = report.pick_samples(dataset.y_test, predicted)

    # Chosen as late as possible; if another run takes the number meanwhile, the export's
    # rename fails instead of overwriting it.
    version = config.version if config.version is not None else next_version(config.model_dir)
    metrics: dict[str, Any] = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "trained_at": utc_now_rfc3339(),
        "architecture": config.arch,
        "epochs": len(history["loss"]),
        "batch_size": config.batch_size,
        "seed": config.seed,
        "parameters": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
        "per_class": report.per_class(confusion),
        "data": {
            "source": dataset.source,
            "sha256": dataset.sha256,
            "files": dataset.files,
            "train_images": len(dataset.x_train),
            "test_images": len(dataset.x_test),
        },
        "train_seconds": round(train_seconds, 3),
        "version": version,
        "tensorflow_version": tf.__version__,
        "validation_split": VALIDATION_SPLIT,
        "early_stopping": config.early_stopping,
        "best_epoch": stopper.best_epoch + 1 if stopper is not None else None,
        # What the server compares live traffic with (drift signals; contract/reference.py).
        REFERENCE_KEY: build_reference(dataset.x_train, dataset.y_train, probabilities),
    }

    def write_extras(folder: Path) -> None:
        report.write_report(
            folder,
            metrics,
            history,
            confusion,
            dataset.x_test[samples],
            dataset.y_test[samples],
            probabilities[samples],
        )

    # The LiteRT twin is checked on the whole test set before it is published with the version.
    version_dir = export_saved_model(
        model,
        config.model_dir,
        version,
        write_extras=write_extras,
        check_images=dataset.x_test,
        verbose=config.verbose,
    )
    return TrainResult(version_dir, metrics)
