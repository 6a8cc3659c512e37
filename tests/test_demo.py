"""The README's main command, `make demo`, end to end: train, serve, score, stop."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_demo_trains_serves_scores_and_stops_cleanly(mnist_path: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "mnist"
    output = tmp_path / "scores.csv"
    demo = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "demo",
            f"MODEL_DIR={model_dir}",
            f"DEMO_ARGS=--port 0 --http-port 0 --output {output}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "MNIST_PATH": str(mnist_path)},
    )
    shown = demo.stdout[-4000:] + demo.stderr[-4000:]
    assert demo.returncode == 0, shown
    assert (model_dir / "1" / "saved_model.pb").exists()
    assert (model_dir / "1" / "model.tflite").exists()  # the verified twin
    assert "training: no model" in demo.stdout
    assert re.search(r"SERVING at 127\.0\.0\.1:\d+ \(version:runtime 1:litert\)", demo.stdout), (
        shown
    )
    accuracy = re.search(
        r"^accuracy (0\.\d+) \(\d+/10000 with a prediction", demo.stdout, re.MULTILINE
    )
    assert accuracy is not None, shown
    assert float(accuracy.group(1)) >= 0.97
    assert "mnist_images_predicted_total" in demo.stdout
    assert "server exited with 0" in demo.stdout
    assert len(output.read_text().splitlines()) == 10_001  # header + every test image
