"""The HTTP port of the real server: TF Serving's REST API, KServe v2 REST (JSON and binary
tensors, through tritonclient[http] and plain HTTP), /metrics, errors, shedding, drain.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from .support import ServerProcess, native, scrape


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def call(
    server: ServerProcess,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; errors are answers, not exceptions."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        server.http_url + path, data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def call_json(server: ServerProcess, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    status, headers, data = call(server, path, body, **kw)
    assert headers["Content-Type"].startswith("application/json"), headers
    return status, json.loads(data)


@pytest.fixture(scope="module")
def client(served_tiny: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"{served_tiny.host}:{served_tiny.http_port}")
    yield client
    client.close()


def infer_input(images: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


# KServe v2 REST


def test_tritonclient_http_reads_liveness_readiness_and_metadata(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("mnist", "4")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    model = client.get_model_metadata("mnist")
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_infer_equals_the_native_api(
    served_tiny: ServerProcess, client: triton.InferenceServerClient, binary: bool
) -> None:
    images = pixels(6, seed=1)
    outputs = [
        triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "classes")
    ]
    result = client.infer("mnist", [infer_input(images, "UINT8", binary)], outputs=outputs)
    probabilities, classes = native(served_tiny.target, images)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("classes"), classes)
    floats = (images / 255.0).astype(np.float32)
    result = client.infer("mnist", [infer_input(floats, "FP32", binary)], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)


def test_default_tritonclient_request_is_binary_both_ways(
    served_tiny: ServerProcess,
) -> None:
    images = pixels(256, seed=2)
    request, json_size = triton.InferenceServerClient.generate_request_body(
        [infer_input(images, "UINT8", True)]
    )
    status, headers, body = call(
        served_tiny,
        "/v2/models/mnist/infer",
        request,
        headers={"Inference-Header-Content-Length": str(json_size)},
    )
    assert status == 200, body[:300]
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [256 * 40, 256 * 8]
    assert len(body) == length + 256 * 48
    result = triton.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("classes"), native(served_tiny.target, images)[1])


def test_plain_json_infer_with_nested_data_and_an_id(served_tiny: ServerProcess) -> None:
    images = pixels(2, seed=4)
    status, answer = call_json(
        served_tiny,
        "/v2/models/mnist/versions/1/infer",
        {
            "id": "abc",
            "inputs": [
                {
                    "name": "images",
                    "shape": [2, 28, 28],
                    "datatype": "UINT8",
                    "data": images.tolist(),
                }
            ],
            "outputs": [{"name": "classes"}],
        },
    )
    assert status == 200, answer
    assert answer["id"] == "abc"
    assert answer["model_version"] == "1"
    [classes] = answer["outputs"]
    assert (classes["name"], classes["datatype"], classes["shape"]) == ("classes", "INT64", [2])
    assert classes["data"] == native(served_tiny.target, images)[1].tolist()


def test_served_accuracy_over_http_equals_the_native_api(
    served_trained: ServerProcess, mnist_path: Path
) -> None:
    with np.load(mnist_path) as data:
        images, labels = data["x_test"][:2000], data["y_test"][:2000]
    client = triton.InferenceServerClient(f"{served_trained.host}:{served_trained.http_port}")
    classes = client.infer("mnist", [infer_input(images, "UINT8", True)]).as_numpy("classes")
    client.close()
    np.testing.assert_array_equal(classes, native(served_trained.target, images)[1])
    assert (classes == labels).mean() > 0.9


# TF Serving REST


def test_tfserving_row_and_columnar_formats_answer_the_grpc_probabilities(
    served_tiny: ServerProcess,
) -> None:
    images = pixels(3, seed=5)
    probabilities, classes = native(served_tiny.target, images)
    for path in ("/v1/models/mnist:predict", "/v1/models/mnist/versions/1:predict"):
        status, rows = call_json(served_tiny, path, {"instances": images.tolist()})
        assert status == 200, rows
        got = np.array([row["probabilities"] for row in rows["predictions"]], dtype=np.float32)
        assert np.abs(got - probabilities).max() <= 1e-6
        assert [row["classes"] for row in rows["predictions"]] == classes.tolist()
    status, named = call_json(
        served_tiny,
        "/v1/models/mnist:predict",
        {"instances": [{"images": image} for image in images.reshape(3, 784).tolist()]},
    )
    assert status == 200, named
    assert named == rows
    for inputs in (images.tolist(), {"images": images.tolist()}):
        status, columns = call_json(served_tiny, "/v1/models/mnist:predict", {"inputs": inputs})
        assert status == 200, columns
        got = np.array(columns["outputs"]["probabilities"], dtype=np.float32)
        assert np.abs(got - probabilities).max() <= 1e-6
        assert columns["outputs"]["classes"] == classes.tolist()
    floats = (images / 255.0).astype(np.float32)
    status, scaled = call_json(
        served_tiny,
        "/v1/models/mnist:predict",
        {"signature_name": "serving_float", "inputs": floats.tolist()},
    )
    assert status == 200, scaled
    np.testing.assert_allclose(scaled["outputs"]["probabilities"], probabilities, atol=1e-6)


def test_tfserving_model_status_and_metadata(served_tiny: ServerProcess) -> None:
    available = [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
    for path in ("/v1/models/mnist", "/v1/models/mnist/versions/1"):
        assert call_json(served_tiny, path) == (200, {"model_version_status": available})
    status, metadata = call_json(served_tiny, "/v1/models/mnist/metadata")
    assert status == 200
    assert metadata["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "serving_float"} <= set(signatures)
    assert signatures["serving_default"]["inputs"]["images"]["dtype"] == "DT_UINT8"


# Bad input: a 4xx with a JSON error, and the server keeps serving.

PREDICT = "/v1/models/mnist:predict"
INFER = "/v2/models/mnist/infer"
ONE = pixels(1).tolist()
V2_INPUT = {
    "name": "images",
    "shape": [1, 28, 28],
    "datatype": "UINT8",
    "data": pixels(1).ravel().tolist(),
}
BAD = [
    ("/v1/models/mnist:predict", b"{not json", {}, 400, "not valid JSON"),
    ("/v1/models/mnist:predict", b"[1, 2]", {}, 400, "JSON object"),
    (PREDICT, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "deeply"),
    ("/v1/models/mnist:predict", {"instances": [[1, 2, 3]]}, {}, 400, "shape"),
    ("/v1/models/mnist:predict", {"instances": [[["a"] * 28] * 28]}, {}, 400, "numbers"),
    (PREDICT, {"instances": [[[1] * 28] * 27, [[1] * 28] * 28]}, {}, 400, "rectangular"),
    ("/v1/models/mnist:predict", {"instances": [[[300] * 28] * 28]}, {}, 400, "0..255"),
    ("/v1/models/mnist:predict", {"instances": [[[0.5] * 28] * 28]}, {}, 400, "whole numbers"),
    ("/v1/models/mnist:predict", {"inputs": ONE, "instances": ONE}, {}, 400, "exactly one"),
    ("/v1/models/mnist:predict", {"instances": ONE, "signature_name": "x"}, {}, 400, "signature"),
    (PREDICT, {"instances": ONE, "signature_name": []}, {}, 400, "signature"),  # was a 500
    ("/v1/models/mnist:predict", {"instances": [{"pixels": ONE[0]}]}, {}, 400, "'images'"),
    ("/v1/models/mnist:predict", {"instances": []}, {}, 400, "non-empty"),
    ("/v1/models/other:predict", {"instances": ONE}, {}, 404, "no model named"),
    ("/v1/models/mnist/versions/9:predict", {"instances": ONE}, {}, 404, "version 9"),
    ("/v1/models/mnist/versions/%C2%B2:predict", {"instances": ONE}, {}, 404, "'²'"),  # was 500
    ("/v1/models/mnist/labels/stable:predict", {"instances": ONE}, {}, 400, "label"),
    ("/v1/models/mnist:classify", {"examples": []}, {}, 501, ":classify"),
    (PREDICT, {"instances": ONE}, {"X-Request-Timeout-Ms": "soon"}, 400, "Timeout"),
    ("/v2/models/mnist/infer", {"inputs": [{**V2_INPUT, "datatype": "INT8"}]}, {}, 400, "UINT8"),
    ("/v2/models/mnist/infer", {"inputs": [{**V2_INPUT, "shape": [1, 784, 1]}]}, {}, 400, "shape"),
    ("/v2/models/mnist/infer", {"inputs": [{**V2_INPUT, "shape": "1x784"}]}, {}, 400, "shape"),
    ("/v2/models/mnist/infer", {"inputs": [{**V2_INPUT, "data": [1, 2]}]}, {}, 400, "needs 784"),
    ("/v2/models/mnist/infer", {"inputs": [{**V2_INPUT, "name": "x"}]}, {}, 400, "unknown input"),
    ("/v2/models/mnist/infer", {"inputs": [V2_INPUT, V2_INPUT]}, {}, 400, "exactly one"),
    ("/v2/models/mnist/infer", {"inputs": "images"}, {}, 400, "list"),
    (INFER, {"inputs": [V2_INPUT], "outputs": [{"name": "logits"}]}, {}, 400, "unknown outputs"),
    (INFER, {"inputs": [V2_INPUT], "parameters": {"timeout": -1}}, {}, 400, "timeout"),
    (INFER, b"{}", {"Inference-Header-Content-Length": "99"}, 400, "Inference-Header"),
    (INFER, b"{}", {"Inference-Header-Content-Length": "²"}, 400, "Inference-Header"),
    (
        "/v2/models/mnist/infer",
        {"inputs": [{**V2_INPUT, "data": None, "parameters": {"binary_data_size": 784}}]},
        {},
        400,
        "both",
    ),
    ("/v2/models/other/infer", {"inputs": [V2_INPUT]}, {}, 404, "no model named"),
    ("/v2/models/mnist/versions/3/infer", {"inputs": [V2_INPUT]}, {}, 404, "version 3"),
    ("/v2/models/mnist/versions/x", None, {}, 400, "not a version"),
    ("/v2/models/other/ready", None, {}, 404, "no model named"),
    ("/v3/nothing", None, {}, 404, "/v2/"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "headers", "status", "words"), BAD)
def test_bad_http_requests_get_a_json_error_and_the_server_keeps_serving(
    served_tiny: ServerProcess,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    words: str,
) -> None:
    got, answer = call_json(served_tiny, path, body, headers=headers)
    assert got == status, answer
    assert set(answer) == {"error"}
    assert words in answer["error"]
    assert call_json(served_tiny, "/v1/models/mnist:predict", {"instances": ONE})[0] == 200


def test_a_binary_size_that_disagrees_with_the_body_is_refused(served_tiny: ServerProcess) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1, 28, 28],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": 784},
                }
            ]
        }
    ).encode()
    status, answer = call_json(
        served_tiny,
        "/v2/models/mnist/infer",
        header + bytes(700),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 400
    assert "700 bytes follow" in answer["error"]


def test_a_wrong_method_is_a_json_405(served_tiny: ServerProcess) -> None:
    status, answer = call_json(served_tiny, "/v2/health/ready", b"{}", method="POST")
    assert status == 405
    assert "Method Not Allowed" in answer["error"]


def test_a_huge_body_is_413_and_the_server_keeps_serving(served_tiny: ServerProcess) -> None:
    # Sent by hand: the server may answer and close before reading everything.
    connection = http.client.HTTPConnection(served_tiny.host, served_tiny.http_port, timeout=60)
    size = 65 * 1024 * 1024
    connection.putrequest("POST", "/v1/models/mnist:predict")
    connection.putheader("Content-Length", str(size))
    connection.putheader("Content-Type", "application/json")
    connection.endheaders()
    chunk = b" " * (1 << 20)
    try:
        for _ in range(size // len(chunk)):
            connection.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = connection.getresponse()
    assert answer.status == 413
    assert "exceeds" in json.loads(answer.read())["error"]
    connection.close()
    assert call_json(served_tiny, "/v1/models/mnist:predict", {"instances": ONE})[0] == 200


def test_an_expired_http_deadline_is_not_run(served_tiny: ServerProcess) -> None:
    for path, body in (
        ("/v1/models/mnist:predict", {"instances": ONE}),
        ("/v2/models/mnist/infer", {"inputs": [V2_INPUT]}),
    ):
        status, answer = call_json(
            served_tiny, path, body, headers={"X-Request-Timeout-Ms": "0.001"}
        )
        assert status == 504, answer
    status, answer = call_json(
        served_tiny, "/v2/models/mnist/infer", {"inputs": [V2_INPUT], "parameters": {"timeout": 1}}
    )
    assert status == 504, answer


# /metrics, counting, health


def test_metrics_are_on_the_http_port_and_count_http_calls(served_tiny: ServerProcess) -> None:
    assert served_tiny.metrics_url == served_tiny.http_url + "/metrics"
    status, headers, _ = call(served_tiny, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")

    def key(api: str, method: str, code: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        labels = (
            ("api", api),
            ("caller", "anonymous"),
            ("code", code),
            ("method", method),
            ("priority", "online"),
        )
        return ("mnist_requests_total", labels)

    wanted = [
        key("tfserving_rest", "Predict", "OK"),
        key("tfserving_rest", "Predict", "INVALID_ARGUMENT"),
        key("v2_rest", "ModelInfer", "NOT_FOUND"),
        key("v2_rest", "ServerReady", "OK"),
        key("http", "unrouted", "NOT_FOUND"),
    ]
    before = scrape(served_tiny)
    call(served_tiny, "/v1/models/mnist:predict", {"instances": ONE})
    call(served_tiny, "/v1/models/mnist:predict", b"{")
    call(served_tiny, "/v2/models/mnist/versions/5/infer", {"inputs": [V2_INPUT]})
    call(served_tiny, "/v2/health/ready")
    call(served_tiny, "/nowhere")
    after = scrape(served_tiny)
    for sample in wanted:
        assert after[sample] == before.get(sample, 0.0) + 1, sample
    seconds = (
        "mnist_request_duration_seconds_count",
        (
            ("api", "v2_rest"),
            ("caller", "anonymous"),
            ("method", "ModelInfer"),
            ("priority", "online"),
        ),
    )
    assert after[seconds] == before.get(seconds, 0.0) + 1


def test_health_endpoints(served_tiny: ServerProcess) -> None:
    assert call_json(served_tiny, "/v2/health/live") == (200, {"live": True})
    assert call_json(served_tiny, "/v2/health/ready") == (200, {"ready": True})
    assert call_json(served_tiny, "/v2/models/mnist/ready") == (
        200,
        {"name": "mnist", "ready": True},
    )
    assert call_json(served_tiny, "/v2/models/mnist/versions/2/ready")[0] == 503
    status, metadata = call_json(served_tiny, "/v2")
    assert (status, metadata["name"]) == (200, "mnist-serving")


def test_a_separate_metrics_port_can_be_asked_for(tiny_model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--metrics-port", str(port)
    ) as server:
        assert server.metrics_port == port != server.http_port
        with urllib.request.urlopen(server.metrics_url, timeout=10) as answer:
            assert b"mnist_requests_total" in answer.read()
        assert call(server, "/metrics")[0] == 200  # still on the HTTP port too


def test_a_full_queue_is_429_and_sigterm_drains_http(tiny_model_dir: Path) -> None:
    server = ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0", "--max-queued-images", "4", "--max-batch-size", "4",
        "--batch-timeout-ms", "1000", "--grace-period", "20",
    )  # fmt: skip
    try:
        status, answer = call_json(
            server, "/v1/models/mnist:predict", {"instances": pixels(5).tolist()}
        )
        assert status == 429, answer
        assert "queue is full" in answer["error"]
        assert call_json(server, "/v2/health/ready") == (200, {"ready": True})
        # A call the batcher holds (a 1 s batch timeout) while SIGTERM arrives still finishes.
        answers: list[tuple[int, Any]] = []
        worker = threading.Thread(
            target=lambda: answers.append(
                call_json(server, "/v2/models/mnist/infer", {"inputs": [V2_INPUT]})
            )
        )
        worker.start()
        give_up = time.monotonic() + 10
        while scrape(server).get(("mnist_batch_queue_depth", ()), 0.0) < 1:
            assert time.monotonic() < give_up, "the call never reached the server's queue"
            time.sleep(0.01)
        server.process.send_signal(15)
        worker.join(30)
        assert len(answers) == 1
        assert answers[0][0] == 200, answers
        assert server.stop() == 0, server.log
        with pytest.raises(urllib.error.URLError, match="refused"):
            urllib.request.urlopen(server.http_url + "/v2/health/ready", timeout=5)
    finally:
        if server.process.poll() is None:
            server.stop()


def test_during_the_first_load_live_is_200_and_ready_is_503(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The first version's saved_model.pb is a FIFO nobody writes to: its load hangs.
    model_dir = tmp_path / "mnist"
    shutil.copytree(tiny_model_dir / "1", model_dir / "1")
    (model_dir / "1" / "saved_model.pb").unlink()
    os.mkfifo(model_dir / "1" / "saved_model.pb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mnist_serving.server", "--model-dir", str(model_dir),
            "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        port = 0
        for line in process.stderr:
            if ' msg="http listening" ' in line:
                port = int(line.rsplit("http_port=", 1)[1].split()[0])
            if 'msg="loading version"' in line:
                break
        assert port, "the server never said where HTTP listens"
        base = SimpleNamespace(http_url=f"http://127.0.0.1:{port}")
        server: Any = base
        assert call_json(server, "/v2/health/live") == (200, {"live": True})
        assert call_json(server, "/v2/health/ready") == (503, {"ready": False})
        status, answer = call_json(server, "/v2/models/mnist/infer", {"inputs": [V2_INPUT]})
        assert status == 503, answer
        assert "still loading" in answer["error"]
        assert call(server, "/metrics")[0] == 200
    finally:
        process.terminate()
        assert process.wait(30) == 0
