"""The client library and `mnist-client` against the real server (`mnist-serve` processes
from tests/conftest.py: an untrained tiny model, and the real 5-epoch model)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mnist_serving.client import (
    NO_RETRY,
    InvalidInput,
    MnistClient,
    NotFound,
    Overloaded,
    RetryPolicy,
)
from mnist_serving.client.scoring import score

from .support import ServerProcess


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_serving.client", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def test_set(mnist_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(mnist_path) as data:
        return data["x_test"], data["y_test"]


@pytest.fixture
def tiny(served_tiny: ServerProcess) -> Iterator[MnistClient]:
    with MnistClient(served_tiny.target) as client:
        yield client


def random_images(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def read_csv(path: Path) -> Rows:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def read_jsonl(path: Path) -> Rows:
    return [json.loads(line) for line in path.read_text().splitlines()]


Rows = list[dict[str, Any]]


def assert_same_rows(rows: Rows, reference: Rows) -> None:
    """Same inputs, same classes, probabilities equal to float32 precision: the server
    batches requests differently from run to run, which may move the last bit."""
    assert [r["index"] for r in rows] == [r["index"] for r in reference]
    assert [int(r["class"]) for r in rows] == [int(r["class"]) for r in reference]

    def probabilities(table: Rows) -> np.ndarray:
        if "probabilities" in table[0]:
            return np.array([r["probabilities"] for r in table], np.float64)
        return np.array([[float(r[f"p{i}"]) for i in range(10)] for r in table])

    np.testing.assert_allclose(probabilities(rows), probabilities(reference), atol=1e-6)


# --- the library -----------------------------------------------------------------------


def test_predict_on_the_real_server(tiny: MnistClient) -> None:
    images = random_images(300)
    whole = tiny.predict(images)
    assert whole.model_version == 1
    assert whole.probabilities.shape == (300, 10)
    np.testing.assert_allclose(whole.probabilities.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(whole.classes, whole.probabilities.argmax(axis=1))
    as_float = tiny.predict(images.astype(np.float32) / 255)
    np.testing.assert_array_equal(as_float.classes, whole.classes)
    np.testing.assert_allclose(as_float.probabilities, whole.probabilities, atol=1e-6)
    flat_single = tiny.predict(images[7].reshape(784))
    np.testing.assert_allclose(flat_single.probabilities[0], whole.probabilities[7], atol=1e-6)


def test_split_requests_reassemble_in_order(served_tiny: ServerProcess, tiny: MnistClient) -> None:
    images = random_images(1000)
    whole = tiny.predict(images)
    with MnistClient(served_tiny.target, max_images_per_request=64) as small:
        parts = small.predict(images)
    np.testing.assert_array_equal(parts.classes, whole.classes)
    np.testing.assert_allclose(parts.probabilities, whole.probabilities, atol=1e-6)


def test_metadata_and_health(tiny: MnistClient) -> None:
    metadata = tiny.metadata()
    assert metadata.name == "mnist"
    assert [v.version for v in metadata.versions] == [1]
    assert metadata.class_labels == tuple("0123456789")
    assert metadata.max_images_per_request == 4096
    assert {(s.dtype, s.shape) for s in metadata.inputs} >= {("uint8", (-1, 28, 28))}
    assert tiny.health() == "SERVING"
    assert tiny.health("") == "SERVING"


def test_typed_errors_from_the_real_server(served_tiny: ServerProcess, tiny: MnistClient) -> None:
    images = random_images(2)
    with pytest.raises(NotFound) as caught:
        tiny.predict(images, model_version=9)
    assert "9" in caught.value.details
    with MnistClient(served_tiny.target, model_name="fashion") as other, pytest.raises(NotFound):
        other.predict(images)
    with pytest.raises(InvalidInput, match=r"\[0, 1\]") as invalid:
        tiny.predict(images.astype(np.float32))  # 0..255 floats: not scaled
    assert invalid.value.code is not None
    with (
        MnistClient(served_tiny.target, max_images_per_request=5000) as big,
        pytest.raises(InvalidInput, match="at most 4096"),
    ):
        big.predict(random_images(5000))


def test_load_shedding_is_typed_and_retried(tiny_model_dir: Path) -> None:
    """A server with a tiny queue sheds a burst with RESOURCE_EXHAUSTED; with retries and
    backoff, the same burst gets through."""
    server = ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0", "--max-queued-images", "64", "--max-batch-size", "64",
        "--batch-timeout-ms", "20",
    )  # fmt: skip
    try:
        images = random_images(64)
        burst = 48

        def fire(client: MnistClient) -> str:
            try:
                client.predict(images)
            except Overloaded as error:
                return error.details
            return "ok"

        with (
            MnistClient(server.target, retry=NO_RETRY) as client,
            ThreadPoolExecutor(burst) as pool,
        ):
            outcomes = list(pool.map(fire, [client] * burst))
        shed = [o for o in outcomes if o != "ok"]
        assert shed, "the burst was not shed; the test cannot see retries"
        retry = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=2.0)
        with (
            MnistClient(server.target, retry=retry, timeout=60) as client,
            ThreadPoolExecutor(burst) as pool,
        ):
            outcomes = list(pool.map(fire, [client] * burst))
        # Backoff with jitter spreads the retries out; the model drains 64 images in
        # milliseconds, so every call gets through within its five attempts.
        assert outcomes == ["ok"] * burst, (len(shed), outcomes)
    finally:
        assert server.stop() == 0, server.log


# --- the CLI ---------------------------------------------------------------------------


def test_cli_health_metadata_and_errors(served_tiny: ServerProcess, tmp_path: Path) -> None:
    result = cli("health", "--target", served_tiny.target)
    assert (result.returncode, result.stdout) == (0, "SERVING\n")
    result = cli("metadata", "--target", served_tiny.target, "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["versions"][0]["version"] == 1
    np.save(tmp_path / "x.npy", random_images(3))
    result = cli("predict", "--target", served_tiny.target, "--model-version", "9",
                 tmp_path / "x.npy")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"mnist-client: {served_tiny.target}: NOT_FOUND")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_cli_predict_pngs_with_the_trained_model(
    served_trained: ServerProcess, test_set: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Test digits drawn large, off-centre and dark on white: read the MNIST way, the
    trained model still gets nearly all of them."""
    x_test, y_test = test_set
    rng = np.random.default_rng(1)
    files = []
    for i in range(40):
        big = Image.fromarray(x_test[i]).resize((140, 140), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (320, 240), 0)
        canvas.paste(big, (int(rng.integers(0, 180)), int(rng.integers(0, 100))))
        files.append(tmp_path / f"digit{i:02d}.png")
        Image.eval(canvas, lambda v: 255 - v).convert("RGB").save(files[-1])
    result = cli("predict", "--target", served_trained.target, "--invert", "--json", *files)
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert [p["input"] for p in predictions] == [str(f) for f in files]
    classes = np.array([p["class"] for p in predictions])
    assert (classes == y_test[:40]).mean() >= 0.9
    # Without --invert they are refused with a one-line hint, not guessed at.
    result = cli("predict", "--target", served_trained.target, files[0])
    assert result.returncode == 2
    assert "pass --invert" in result.stderr


def test_score_the_test_set_matches_the_trainers_accuracy(
    served_trained: ServerProcess,
    trained_model_dir: Path,
    mnist_path: Path,
    test_set: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    metrics = json.loads((trained_model_dir / "1" / "assets.extra" / "metrics.json").read_text())
    out = tmp_path / "scores.csv"
    result = cli("score", "--target", served_trained.target, "--input", mnist_path,
                 "--output", out, "--batch-size", "500", "--concurrency", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["index"]) for r in rows] == list(range(10000))
    classes = np.array([int(r["class"]) for r in rows])
    accuracy = (classes == test_set[1]).mean()
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    correct = int((classes == test_set[1]).sum())
    assert f"accuracy {accuracy:.4f} ({correct}/10000" in result.stdout
    confusion = np.loadtxt(tmp_path / "scores.confusion.csv", delimiter=",", skiprows=1)[:, 1:]
    assert confusion.sum() == 10000
    assert np.trace(confusion) == round(accuracy * 10000)
    probabilities = np.array([[float(r[f"p{i}"]) for i in range(10)] for r in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)


def test_score_idx_folder_matches_the_npz(
    served_trained: ServerProcess, mnist_path: Path, tmp_path: Path
) -> None:
    if not (mnist_path.parent / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the IDX files are not next to MNIST_PATH")
    npz_out, idx_out = tmp_path / "npz.jsonl", tmp_path / "idx.jsonl"
    for source, out in ((mnist_path, npz_out), (mnist_path.parent, idx_out)):
        result = cli("score", "--target", served_trained.target, "--input", source,
                     "--output", out, "--no-progress")  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert_same_rows(read_jsonl(npz_out), read_jsonl(idx_out))


def test_score_resumes_after_a_kill(
    served_tiny: ServerProcess, mnist_path: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference.csv"
    result = cli("score", "--target", served_tiny.target, "--input", mnist_path,
                 "--output", reference, "--batch-size", "100")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "killed.csv"
    # Small batches, one in flight: slow enough to be caught part-way.
    args = ["score", "--target", served_tiny.target, "--input", mnist_path, "--output", out,
            "--batch-size", "100", "--concurrency", "1"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_serving.client", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > 1000:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the job ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    rows_before = out.read_bytes().count(b"\n") - 1
    assert 1000 <= rows_before < 10000
    result = cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"kept {rows_before} rows" in result.stdout
    rows = read_csv(out)
    assert [int(r["index"]) for r in rows] == list(range(10000))
    assert_same_rows(rows, read_csv(reference))


def test_score_function_for_the_bench(
    served_trained: ServerProcess, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    x_test, y_test = test_set
    stats = score(served_trained.target, x_test, batch_size=256, concurrency=4)
    assert stats.failed_ranges == []
    assert stats.images == 10000
    assert stats.model_version == 1
    assert (stats.classes == y_test).mean() > 0.95
    assert stats.probabilities is not None
    np.testing.assert_array_equal(stats.probabilities.argmax(axis=1), stats.classes)
