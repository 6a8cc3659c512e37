"""Start-up settings and graceful shutdown of the real server process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import ServerProcess, scrape

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--version-policy", "newest"], "version-policy"),
        (["--version-policy", "specific"], "needs --versions"),
        (["--no-such-flag"], "unrecognized"),
        (["--port", "9000", "--http-port", "9000"], "must differ"),
        (["--http-port", "8600", "--metrics-port", "8600"], "must differ"),
        (["--http-port", "-1"], "--http-port"),
    ],
)
def test_a_bad_setting_stops_start_up_with_exit_code_2(args: list[str], words: str) -> None:
    result = run_serve(*args)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_also_come_from_the_environment(tmp_path: Path) -> None:
    import os

    result = run_serve(env={**os.environ, "MNIST_SERVING_PORT": "not-a-port"})
    assert result.returncode == 2
    assert "--port" in result.stderr


def test_a_model_dir_without_versions_is_a_clear_error(tmp_path: Path) -> None:
    result = run_serve("--model-dir", str(tmp_path), "--port", "0", "--http-port", "0")
    assert result.returncode == 1
    assert "no loadable model version" in result.stderr
    assert "Traceback" not in result.stderr


def test_start_up_output_is_one_line_per_event_without_tensorflow_noise(
    served_tiny: ServerProcess,
) -> None:
    lines = served_tiny.log.splitlines()
    assert lines, "the server logged nothing"
    assert all(line.startswith("ts=") for line in lines), served_tiny.log
    assert any('msg="version loaded" version=1' in line for line in lines)
    for noise in ("cuda", "oneDNN", "cpu_feature_guard", "absl"):
        assert noise not in served_tiny.log


def test_sigterm_flips_health_and_lets_the_call_in_flight_finish(tiny_model_dir: Path) -> None:
    # A long batch timeout keeps one request queued in the server while SIGTERM arrives.
    server = ServerProcess(tiny_model_dir, "--batch-timeout-ms", "1000", "--grace-period", "20")
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == SERVING
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    in_flight = predict_pb2_grpc.MnistServiceStub(channel).Predict.future(
        pb.PredictRequest(
            images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[3, 28, 28], content=images.tobytes())
        )
    )
    statuses: list[int] = []
    endings: list[grpc.StatusCode] = []

    def read_updates() -> None:
        try:
            statuses.extend(update.status for update in watch)
        except grpc.RpcError as error:  # our own cancel() below ends the stream
            endings.append(error.code())

    reader = threading.Thread(target=read_updates)
    reader.start()
    # SIGTERM only once the server holds the call: one still on the wire would be refused.
    give_up = time.monotonic() + 10
    while scrape(server).get(("mnist_batch_queue_depth", ()), 0.0) < 3:
        assert time.monotonic() < give_up, "the call never reached the server's queue"
        time.sleep(0.01)
    server.process.send_signal(15)
    answer = in_flight.result(timeout=20)
    assert np.frombuffer(answer.classes.content, dtype="<i8").shape == (3,)
    watch.cancel()
    reader.join(10)
    assert statuses[:1] == [NOT_SERVING]
    assert endings == [grpc.StatusCode.CANCELLED]
    assert server.stop() == 0, server.log
    with pytest.raises(grpc.RpcError) as raised:
        health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
