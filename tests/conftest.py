"""Shared fixtures: the real data set, a trained model (once per session), a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ServerProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    """The real MNIST file from MNIST_PATH; tests that need it skip where it is unset."""
    value = os.environ.get("MNIST_PATH")
    if not value:
        pytest.skip("MNIST_PATH is not set: real-data tests need the MNIST npz (CI sets it)")
    path = Path(value)
    if not path.exists():
        pytest.skip(f"MNIST_PATH={value} does not exist")
    return path


@pytest.fixture(scope="session")
def trained_model_dir(mnist_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A default `mnist-train` run on the real data (5-epoch MLP, seed 0), exported as version 1.

    Trained once per test session in its own process, exactly as a user runs the trainer.
    """
    model_dir = tmp_path_factory.mktemp("trained") / "mnist"
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_serving.trainer",
            "--data",
            str(mnist_path),
            "--model-dir",
            str(model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert (model_dir / "1" / "saved_model.pb").exists()
    return model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained MLP exported in the real layout: for tests that need any model, fast."""
    from mnist_serving.contract.tfquiet import import_tensorflow
    from mnist_serving.trainer.export import export_saved_model
    from mnist_serving.trainer.model import build_model

    import_tensorflow().keras.utils.set_random_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny") / "mnist"
    export_saved_model(build_model("mlp"), model_dir, version=1)
    return model_dir


@pytest.fixture(scope="session")
def served_tiny(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """A server on the untrained tiny model: for API behaviour that needs no accuracy."""
    server = ServerProcess(tiny_model_dir, "--poll-interval", "0")
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="session")
def served_trained(trained_model_dir: Path) -> Iterator[ServerProcess]:
    """A server on the real 5-epoch model trained on MNIST."""
    server = ServerProcess(trained_model_dir, "--poll-interval", "0")
    yield server
    assert server.stop() == 0, server.log
