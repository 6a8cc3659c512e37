"""The lean install: a virtualenv with only `mnist-serving[server]` (no TensorFlow) serves
a version's twin through the native and TensorFlow Serving APIs.

Builds the project's wheel and a fresh venv from PyPI (pip's cache makes it about a
minute); skipped, with pip's reason, where that cannot be done (no index reachable).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.runtimes import litert

from .support import ServerProcess

REPO = Path(__file__).resolve().parent.parent


def run(*command: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def lean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a venv holding the wheel built from this checkout, with [server] only."""
    root = tmp_path_factory.mktemp("lean")
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--wheel-dir", root / "wheels", REPO,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (root / "wheels").glob("mnist_serving-*.whl")
    venv = root / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    installed = run(
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        f"mnist-serving[server] @ {wheel.as_uri()}",
        timeout=600,
    )  # fmt: skip
    if installed.returncode != 0:
        pytest.skip(f"cannot build the lean venv (no package index?): {installed.stderr[-500:]}")
    return python


@pytest.mark.slow
def test_the_lean_install_has_no_tensorflow_and_serves_both_apis(
    lean_python: Path, tiny_model_dir: Path
) -> None:
    absent = run(lean_python, "-c", "import tensorflow")
    assert absent.returncode != 0
    assert "No module named 'tensorflow'" in absent.stderr
    listed = run(lean_python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "tensorflow" not in listed  # neither tensorflow nor tensorflow-serving-api
    assert "ai-edge-litert" in listed or "ai_edge_litert" in listed

    images = np.random.default_rng(3).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    expected = litert.load_model(tiny_model_dir / "1", "mnist", 1).predict(images)
    with ServerProcess(tiny_model_dir, "--poll-interval", "0", python=str(lean_python)) as server:
        assert "runtimes=1:litert" in server.log
        with grpc.insecure_channel(server.target) as channel:
            native = predict_pb2_grpc.MnistServiceStub(channel).Predict(
                pb.PredictRequest(
                    images=pb.Tensor(
                        dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes()
                    )
                ),
                timeout=30,
            )
            tfserving = tfserving_predict(channel, images)
        assert server.stop() == 0, server.log
    probabilities = np.frombuffer(native.probabilities.content, "<f4").reshape(-1, 10)
    np.testing.assert_array_equal(probabilities, expected.probabilities)
    np.testing.assert_array_equal(np.frombuffer(native.classes.content, "<i8"), expected.classes)
    np.testing.assert_array_equal(tfserving[0], expected.probabilities)
    np.testing.assert_array_equal(tfserving[1], expected.classes)


def tfserving_predict(channel: grpc.Channel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TF Serving's official stubs (from the dev env, not the lean venv)."""
    from mnist_serving.contract.tfquiet import import_tensorflow

    tf = import_tensorflow()
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        request, timeout=30
    )
    return (
        tf.make_ndarray(response.outputs["probabilities"]),
        tf.make_ndarray(response.outputs["classes"]),
    )
