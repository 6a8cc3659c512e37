"""`python -m bench.drift_signals --model-dir DIR [--data mnist.npz]`: the drift signals
of normal and drifted traffic, measured through a real server, and what drift accounting
costs per call. The alert thresholds in deploy/ come from this table
(docs/operations/model-quality.md).

Each scenario starts a fresh server (an empty window), sends its images over the native
API in calls of 100, waits until the window holds them, and reads the gauges from /metrics.
"""

from __future__ import annotations

import argparse
import os
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mnist_serving.server.launcher import ServerProcess

SIGNALS = (
    "mnist_class_mix_divergence",
    "mnist_confidence_divergence",
    "mnist_low_confidence_rate",
    "mnist_input_mean_intensity_divergence",
    "mnist_input_ink_fraction_divergence",
)
SHORT = ("class_mix", "confidence", "low_conf", "intensity", "ink")
CALL_IMAGES = 100


def scenarios(x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal traffic (the test set, whole and in parts) and three kinds of drift."""
    rng = np.random.default_rng(seed)
    shuffled = x_test[rng.permutation(len(x_test))]
    return {
        "test set, 10,000 (a full window)": x_test,
        "test set, first 1,000 (smallest window shown)": x_test[:1000],
        "test set, shuffled 1,000": shuffled[:1000],
        "test set, last 2,000": x_test[-2000:],
        "inverted test images, 1,000": 255 - x_test[:1000],
        "only 7s, 1,000": x_test[y_test == 7][:1000],
        "uniform noise, 1,000": rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8),
        "10% noise mixed in, 10,000": np.where(
            (rng.random(len(x_test)) < 0.1)[:, None, None],
            rng.integers(0, 256, x_test.shape, dtype=np.uint8),
            x_test,
        ).astype(np.uint8),
    }


def send(target: str, images: np.ndarray) -> None:
    import grpc

    from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
    from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        for start in range(0, len(images), CALL_IMAGES):
            chunk = np.ascontiguousarray(images[start : start + CALL_IMAGES])
            stub.Predict(
                pb.PredictRequest(
                    images=pb.Tensor(
                        dtype=pb.DATA_TYPE_UINT8, shape=chunk.shape, content=chunk.tobytes()
                    )
                )
            )


def signals_after(server: ServerProcess, images: int, timeout: float = 60) -> dict[str, float]:
    """The gauges once the window holds `images` (the refresh after the last call)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = server.scrape()
        values = {name: v for (name, _), v in samples.items() if name in SIGNALS}
        held = next((v for (n, _), v in samples.items() if n == "mnist_drift_window_images"), 0)
        if held >= min(images, 10_000) and len(values) == len(SIGNALS):
            return values
        if time.monotonic() > deadline:
            raise TimeoutError(f"the window holds {held} of {images} images")
        time.sleep(0.1)


def observe_cost(model_dir: Path) -> list[tuple[str, float]]:
    """Microseconds one observe() of the drift and feedback observers takes, per call size."""
    import json

    from mnist_serving.contract import REPORT
    from mnist_serving.server.call_context import Call
    from mnist_serving.server.feedback import RecentPredictions
    from mnist_serving.server.quality import VersionWindow, as_pixels
    from mnist_serving.server.runtimes.base import Prediction
    from mnist_serving.server.settings import Settings

    latest = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    reference = json.loads((model_dir / str(latest) / REPORT).read_text())["reference"]
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    size, min_images = defaults["drift_window"], defaults["drift_min_images"]
    rng = np.random.default_rng(0)
    rows = []
    for size in (1, 16, 256):
        images = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
        probabilities = rng.dirichlet(np.ones(10), size).astype(np.float32)
        prediction = Prediction(probabilities, probabilities.argmax(1))
        window = VersionWindow(1, reference, size, min_images)
        recent = RecentPredictions(defaults["feedback_window"])
        counter = iter(range(10**9))

        def drift(
            window: VersionWindow = window,
            images: np.ndarray = images,
            prediction: Prediction = prediction,
        ) -> None:
            window.add(as_pixels(images), prediction.probabilities, prediction.classes)

        def feedback(
            recent: RecentPredictions = recent,
            images: np.ndarray = images,
            prediction: Prediction = prediction,
            ids: Iterator[int] = counter,
        ) -> None:
            call = Call("native", "Predict", request_id=str(next(ids)))
            recent.observe(call, images, prediction, 1)

        for name, work in (("drift", drift), ("feedback window", feedback)):
            rows.append((f"{name}, {size} image(s) per call", _best_us(work)))
        rows.append((f"window refresh (every --drift-interval), {size}", _best_us(window.refresh)))
    return rows


def _best_us(work: Callable[[], None], number: int = 2000) -> float:
    return min(timeit.repeat(work, number=number, repeat=5)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MNIST_PATH", "")))
    args = parser.parse_args()
    data = np.load(args.data)
    print(f"{'scenario':48} " + " ".join(f"{s:>10}" for s in SHORT))
    for name, images in scenarios(data["x_test"], data["y_test"]).items():
        with ServerProcess(args.model_dir, "--poll-interval", "0", "--drift-interval", "0.2") as s:
            send(s.target, images)
            values = signals_after(s, len(images))
        print(f"{name:48} " + " ".join(f"{values[k]:10.4f}" for k in SIGNALS))
    print()
    for label, micros in observe_cost(args.model_dir):
        print(f"{label:48} {micros:8.1f} us")


if __name__ == "__main__":
    main()
