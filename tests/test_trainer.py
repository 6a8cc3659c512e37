"""The trainer end to end: accuracy on the real data, the report, the CLI and its errors."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnist_serving.contract import REPORT_DIR
from mnist_serving.trainer.data import load_path
from mnist_serving.trainer.report import FIGURES, confusion_matrix, per_class
from mnist_serving.trainer.train import TrainConfig, train_and_export

from .synthetic_mnist import make_arrays, write_idx_folder, write_npz

# The keys the server reads from metrics.json, with their types.
METRICS_KEYS: dict[str, Any] = {
    "test_accuracy": float,
    "test_loss": float,
    "trained_at": str,
    "architecture": str,
    "epochs": int,
    "batch_size": int,
    "seed": (int, type(None)),
    "parameters": int,
    "per_class": list,
    "data": dict,
    "train_seconds": float,
    "version": int,
    "tensorflow_version": str,
}


def run_trainer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_serving.trainer", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def read_report(version_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    extras = version_dir / REPORT_DIR
    metrics = json.loads((extras / "metrics.json").read_text())
    history = json.loads((extras / "history.json").read_text())
    return metrics, history


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def check_metrics(metrics: dict[str, Any], history: dict[str, Any]) -> None:
    """The report's keys and types, and that its numbers agree with one another."""
    for key, kind in METRICS_KEYS.items():
        assert isinstance(metrics[key], kind), (key, metrics[key])
    trained_at = datetime.strptime(metrics["trained_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(datetime.now(timezone.utc).replace(tzinfo=None) - trained_at).days == 0
    assert metrics["architecture"] in {"mlp", "cnn"}
    assert metrics["train_seconds"] > 0
    assert metrics["tensorflow_version"].split(".")[0] == "2"
    rows = metrics["per_class"]
    assert [row["label"] for row in rows] == [str(d) for d in range(10)]
    assert all(set(row) == {"label", "precision", "recall", "support"} for row in rows)
    assert all(0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 for row in rows)
    total = sum(row["support"] for row in rows)
    assert total == metrics["data"]["test_images"]
    # Recall weighted by support is the accuracy: predict() and evaluate() agree.
    hits = sum(row["recall"] * row["support"] for row in rows)
    assert hits / total == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert history["epoch"] == list(range(1, metrics["epochs"] + 1))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(history[key]) == metrics["epochs"], key


# --- the real data (the session's trained model) ------------------------------------------


@pytest.mark.slow
def test_default_mlp_reaches_test_accuracy(trained_model_dir: Path) -> None:
    metrics, _ = read_report(trained_model_dir / "1")
    assert metrics["test_accuracy"] >= 0.975


@pytest.mark.slow
def test_real_run_report(trained_model_dir: Path, mnist_path: Path) -> None:
    version_dir = trained_model_dir / "1"
    metrics, history = read_report(version_dir)
    check_metrics(metrics, history)
    assert metrics["architecture"] == "mlp"
    assert metrics["epochs"] == 5
    assert metrics["batch_size"] == 32
    assert metrics["seed"] == 0
    assert metrics["version"] == 1
    assert metrics["parameters"] == 784 * 128 + 128 + 128 * 10 + 10
    assert metrics["data"]["source"] == str(mnist_path)
    assert metrics["data"]["sha256"] == hashlib.sha256(mnist_path.read_bytes()).hexdigest()
    assert metrics["data"]["train_images"] == 60000
    assert sum(row["support"] for row in metrics["per_class"]) == 10000
    assert history["loss"][-1] < history["loss"][0]
    for name in FIGURES:
        width, height = png_size(version_dir / REPORT_DIR / name)
        assert width >= 400, name
        assert height >= 300, name
    assert list(trained_model_dir.iterdir()) == [version_dir]  # no temporary folder left


# --- the CLI on a small generated data set ------------------------------------------------


def test_cli_smoke_cnn_from_idx_folder(tmp_path: Path) -> None:
    """Every flag at once, on IDX files: a tiny CNN run exported as the version asked for."""
    data = write_idx_folder(tmp_path / "idx", make_arrays(train=300, test=100))
    model_dir = tmp_path / "models"
    result = run_trainer(
        "--data", str(data), "--model-dir", str(model_dir), "--arch", "cnn", "--epochs", "2",
        "--batch-size", "16", "--seed", "3", "--early-stopping", "2", "--version", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The product's own output only: no TensorFlow start-up or runtime log lines.
    assert result.stderr == ""
    assert 'Model: "mnist_cnn"' in result.stdout
    assert "Epoch 1/2" in result.stdout
    assert "Test loss " in result.stdout
    assert f"Exported version 4 to {model_dir / '4'}" in result.stdout
    assert sorted(p.name for p in model_dir.iterdir()) == ["4"]
    metrics, history = read_report(model_dir / "4")
    check_metrics(metrics, history)
    assert metrics["architecture"] == "cnn"
    assert metrics["version"] == 4
    assert metrics["batch_size"] == 16
    assert metrics["seed"] == 3
    assert metrics["early_stopping"] == 2
    assert metrics["data"]["source"] == str(data)
    assert metrics["data"]["sha256"] == load_path(data).sha256
    assert metrics["test_accuracy"] >= 0.9  # the generated classes are easy to tell apart
    for name in FIGURES:
        png_size(model_dir / "4" / REPORT_DIR / name)


def test_cli_refuses_an_existing_version_before_training(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    (model_dir / "2").mkdir(parents=True)
    result = run_trainer(
        "--data", str(write_npz(tmp_path / "m.npz")), "--model-dir", str(model_dir),
        "--version", "2",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"mnist-train: error: {model_dir / '2'} already exists; versions are never "
        "overwritten (next free: 3)\n"
    )
    assert "Epoch" not in result.stdout
    assert sorted(p.name for p in model_dir.iterdir()) == ["2"]


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_cli_bad_data_is_one_line(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "mnist.npz"
    if problem == "corrupt":
        write_npz(path)
        path.write_bytes(path.read_bytes()[:1000])
    result = run_trainer("--data", str(path), "--model-dir", str(tmp_path / "models"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mnist-train: error: {path}: ")
    assert not (tmp_path / "models").exists()


def test_cli_reads_mnist_path_when_no_data_flag(tmp_path: Path) -> None:
    """MNIST_PATH is used when --data is absent (shown by the file it complains about)."""
    path = tmp_path / "from-env.npz"
    path.write_text("not an archive")
    env = {**os.environ, "MNIST_PATH": str(path)}
    result = run_trainer("--model-dir", str(tmp_path / "models"), env=env)
    assert result.returncode == 1
    assert result.stderr.startswith(f"mnist-train: error: {path}: not an npz archive")


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    result = run_trainer("--epochs", "0", "--model-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--epochs: must be a positive integer, got 0" in result.stderr


# --- training in-process on generated data ------------------------------------------------


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    dataset = load_path(write_npz(tmp_path / "m.npz", make_arrays(train=100, test=20)))
    model_dir = tmp_path / "models"
    histories = []
    for seed in (5, 5, 6):
        result = train_and_export(TrainConfig(model_dir, epochs=1, seed=seed), dataset)
        histories.append(read_report(result.version_dir)[1])
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "3"]
    assert histories[0] == histories[1]
    assert histories[0] != histories[2]


def test_early_stopping_stops_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    """Validation labels (Keras holds out the last 10%) are shifted by one, so the better
    the model learns the training set, the worse val_loss gets: it must stop early."""
    arrays = make_arrays(train=400, test=50)
    arrays["y_train"][-40:] = (arrays["y_train"][-40:] + 1) % 10
    dataset = load_path(write_npz(tmp_path / "m.npz", arrays))
    config = TrainConfig(tmp_path / "models", epochs=20, seed=0, early_stopping=1)
    metrics, history = read_report(train_and_export(config, dataset).version_dir)
    assert metrics["epochs"] < 20
    assert len(history["val_loss"]) == metrics["epochs"]
    best = int(np.argmin(history["val_loss"])) + 1
    assert metrics["best_epoch"] == best
    assert metrics["epochs"] == best + 1  # patience 1: one epoch without improvement


def test_per_class_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 2, 2])
    counts = confusion_matrix(labels, predicted)
    expected = np.zeros((10, 10), dtype=np.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 2] = expected[2, 2] = 1
    expected[1, 1] = 2
    np.testing.assert_array_equal(counts, expected)
    rows = per_class(counts)
    assert rows[0] == {"label": "0", "precision": 1.0, "recall": 0.5, "support": 2}
    assert rows[1] == {"label": "1", "precision": 2 / 3, "recall": 2 / 3, "support": 3}
    assert rows[2] == {"label": "2", "precision": 0.5, "recall": 1.0, "support": 1}
    assert rows[9] == {"label": "9", "precision": 0.0, "recall": 0.0, "support": 0}
