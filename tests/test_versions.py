"""Hot reload against the real server process: new versions, broken ones, pinning, unloading.

Versions are real SavedModels written the way the trainer writes them (a hidden temporary
folder renamed into place). Every wait polls for its condition with a bounded deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import ServerProcess, scrape

POLL = "0.2"
IMAGES = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
REQUEST = pb.PredictRequest(
    images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=IMAGES.shape, content=IMAGES.tobytes())
)


def export_version(model_dir: Path, version: int, arch: str = "mlp") -> Path:
    """The trainer's export of a fresh model, seeded by its version so that answers differ."""
    from mnist_serving.contract.tfquiet import import_tensorflow
    from mnist_serving.trainer.export import export_saved_model
    from mnist_serving.trainer.model import build_model

    import_tensorflow().keras.utils.set_random_seed(version)
    return export_saved_model(build_model(arch), model_dir, version=version)


def publish_copy(source: Path, model_dir: Path, version: int) -> Path:
    """Copy a version folder in as the trainer would: hidden name first, then one rename."""
    staging = model_dir / f".tmp-{version}-copy"
    shutil.copytree(source, staging)
    final = model_dir / str(version)
    os.rename(staging, final)
    return final


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model dir of this test's own, holding version 1 (the session's tiny model)."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    publish_copy(tiny_model_dir / "1", folder, 1)
    return folder


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with `servers(model_dir, *flags)`; each is stopped (exit code 0) after."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, *flags: str) -> ServerProcess:
        server = ServerProcess(model_dir, "--poll-interval", POLL, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.stop() == 0, server.log


def stub_for(server: ServerProcess) -> predict_pb2_grpc.MnistServiceStub:
    return predict_pb2_grpc.MnistServiceStub(grpc.insecure_channel(server.target))


def predict(stub: predict_pb2_grpc.MnistServiceStub, version: int = 0) -> pb.PredictResponse:
    request = pb.PredictRequest()
    request.CopyFrom(REQUEST)
    request.model_spec.version = version
    response: pb.PredictResponse = stub.Predict(request, timeout=10)
    return response


def probabilities(response: pb.PredictResponse) -> np.ndarray:
    tensor = response.probabilities
    return np.frombuffer(tensor.content, dtype="<f4").reshape(tuple(tensor.shape))


def loaded(stub: predict_pb2_grpc.MnistServiceStub) -> list[int]:
    metadata = stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=10)
    return [v.version for v in metadata.versions]


def load_failures(server: ServerProcess) -> float:
    return scrape(server).get(("mnist_model_load_failures_total", ()), 0.0)


def versions_in_metrics(server: ServerProcess) -> list[int]:
    """Versions with mnist_model_version_info == 1, newest first."""
    return sorted(
        (
            int(dict(labels)["version"])
            for (name, labels), value in scrape(server).items()
            if name == "mnist_model_version_info" and value == 1
        ),
        reverse=True,
    )


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def scans_pass(server: ServerProcess, count: int = 5) -> None:
    """Let `count` poll intervals go by: for asserting that something did NOT happen."""
    time.sleep(count * float(POLL))


def log_count(server: ServerProcess, fragment: str) -> int:
    return sum(fragment in line for line in server.log_lines)


class SteadyTraffic:
    """Client threads sending Predict back to back; every answer and error is recorded."""

    def __init__(self, server: ServerProcess, threads: int = 2) -> None:
        self.stub = stub_for(server)
        self.answers: list[list[tuple[float, float, pb.PredictResponse]]] = [
            [] for _ in range(threads)
        ]
        self.errors: list[grpc.RpcError] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(log,), daemon=True) for log in self.answers
        ]

    def _run(self, log: list[tuple[float, float, pb.PredictResponse]]) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                response = predict(self.stub)
            except grpc.RpcError as error:
                self.errors.append(error)
                continue
            log.append((sent, time.monotonic() - sent, response))

    def __enter__(self) -> SteadyTraffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def versions_seen(self) -> set[int]:
        return {r.model_spec.version for log in self.answers for _, _, r in list(log)}

    def count(self, version: int) -> int:
        return sum(r.model_spec.version == version for log in self.answers for _, _, r in log)


@pytest.mark.parametrize("batching", ["--batching", "--no-batching"])
def test_a_new_version_takes_over_under_traffic_without_a_failed_request(
    model_dir: Path, servers: Callable[..., ServerProcess], batching: str
) -> None:
    server = servers(model_dir, batching)
    with SteadyTraffic(server) as traffic:
        wait_for(lambda: traffic.count(1) >= 20, "answers from version 1")
        export_version(model_dir, 2)
        published = time.monotonic()
        wait_for(lambda: 2 in traffic.versions_seen(), "the switch to version 2")
        wait_for(lambda: traffic.count(2) >= 50, "answers from version 2")
    assert traffic.errors == []
    first_v2 = min(
        sent for log in traffic.answers for sent, _, r in log if r.model_spec.version == 2
    )
    for log in traffic.answers:
        seen = [r.model_spec.version for _, _, r in log]
        assert seen == sorted(seen), "an answer came from version 1 after version 2"
        assert seen[0] == 1
        assert seen[-1] == 2
    # Each answer really comes from the version it names: the two models answer differently.
    reference = {v: probabilities(predict_for(traffic, v)) for v in (1, 2)}
    assert not np.allclose(reference[1], reference[2], atol=1e-3)
    for log in traffic.answers:
        for _, _, response in log:
            np.testing.assert_allclose(
                probabilities(response), reference[response.model_spec.version], atol=1e-5
            )
    stub = stub_for(server)
    wait_for(lambda: loaded(stub) == [2], "metadata listing version 2 alone")
    wait_for(lambda: versions_in_metrics(server) == [2], "the version metric to follow")
    wait_for(lambda: log_count(server, 'msg="version unloaded" version=1') == 1, "unloading v1")
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    assert health.Check(health_pb2.HealthCheckRequest()).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    latencies = sorted(latency for log in traffic.answers for _, latency, _ in log)
    print(
        f"\n[{batching}] {sum(map(len, traffic.answers))} answers, 0 errors; "
        f"export -> first v2 answer sent at +{first_v2 - published:.2f} s "
        f"(poll {POLL} s + load + warm-up); latency p50 {latencies[len(latencies) // 2] * 1e3:.1f}"
        f" ms, max {latencies[-1] * 1e3:.1f} ms"
    )


def predict_for(traffic: SteadyTraffic, version: int) -> pb.PredictResponse:
    return next(r for log in traffic.answers for _, _, r in log if r.model_spec.version == version)


def test_broken_and_half_written_versions_are_kept_out_and_the_last_good_one_serves(
    model_dir: Path, servers: Callable[..., ServerProcess]
) -> None:
    export_version(model_dir, 2)
    server = servers(model_dir)
    stub = stub_for(server)
    assert loaded(stub) == [2]
    failures = load_failures(server)

    # A corrupt saved_model.pb.
    broken = model_dir / "3"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a protobuf at all")
    wait_for(lambda: load_failures(server) == failures + 1, "the failure to be counted")
    assert predict(stub).model_spec.version == 2
    assert loaded(stub) == [2]
    assert versions_in_metrics(server) == [2]
    scans_pass(server)
    assert load_failures(server) == failures + 1, "retried although nothing changed"
    assert log_count(server, 'msg="loading version" version=3') == 1

    # Rewritten in place: tried again (and fails again).
    (broken / "saved_model.pb").write_bytes(b"still not a protobuf, but a different one")
    wait_for(lambda: load_failures(server) == failures + 2, "a retry after the change")

    # A real SavedModel whose signature breaks the contract (float [N, 784]).
    write_wrong_signature(model_dir, 4)
    wait_for(lambda: load_failures(server) == failures + 3, "the wrong signature refused")
    assert "does not take" in server.log
    assert predict(stub).model_spec.version == 2

    # Half-written exports under the trainer's hidden names are never looked at, even
    # complete ones, until the rename publishes them.
    (model_dir / ".tmp-5-xyz").mkdir()
    (model_dir / ".tmp-5-xyz" / "saved_model.pb").write_bytes(b"half")
    shutil.copytree(model_dir / "1", model_dir / ".tmp-6-abc")
    scans_pass(server)
    assert loaded(stub) == [2]
    assert load_failures(server) == failures + 3
    assert ".tmp-" not in "".join(s for s in server.log_lines if "loading version" in s)
    os.rename(model_dir / ".tmp-6-abc", model_dir / "6")
    wait_for(lambda: loaded(stub) == [6], "the published version 6")
    assert predict(stub).model_spec.version == 6
    assert load_failures(server) == failures + 3


def write_wrong_signature(model_dir: Path, version: int) -> None:
    from mnist_serving.contract.tfquiet import import_tensorflow

    tf = import_tensorflow()
    module = tf.Module()
    module.w = tf.Variable(tf.zeros([784, 10]))

    @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name="images")])  # type: ignore[untyped-decorator]
    def serve(images: Any) -> dict[str, Any]:
        probabilities = tf.nn.softmax(images @ module.w)
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    staging = model_dir / f".tmp-{version}-wrong"
    signatures = {"serving_default": serve, "serving_float": serve}
    tf.saved_model.save(module, str(staging), signatures=signatures)
    os.rename(staging, model_dir / str(version))


def test_pinning_unloading_and_keeping_the_last_version_under_policy_all(
    model_dir: Path, servers: Callable[..., ServerProcess]
) -> None:
    export_version(model_dir, 2)
    server = servers(model_dir, "--version-policy", "all")
    stub = stub_for(server)
    assert loaded(stub) == [2, 1]
    assert versions_in_metrics(server) == [2, 1]
    assert predict(stub).model_spec.version == 2  # no version: the newest
    assert predict(stub, 1).model_spec.version == 1
    assert not np.allclose(probabilities(predict(stub, 1)), probabilities(predict(stub, 2)))
    with pytest.raises(grpc.RpcError) as raised:
        predict(stub, 7)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "loaded: 2, 1" in (raised.value.details() or "")

    shutil.rmtree(model_dir / "1")
    wait_for(lambda: loaded(stub) == [2], "version 1 to leave the metadata")
    wait_for(lambda: log_count(server, 'msg="version unloaded" version=1'), "unloading v1")
    assert versions_in_metrics(server) == [2]
    with pytest.raises(grpc.RpcError) as raised:
        predict(stub, 1)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "loaded: 2)" in (raised.value.details() or "")
    assert predict(stub, 2).model_spec.version == 2

    # The last folder goes too: availability wins, version 2 keeps serving, with a warning.
    shutil.rmtree(model_dir / "2")
    wait_for(lambda: log_count(server, "still serving the last loaded one"), "the warning")
    scans_pass(server)
    assert log_count(server, "still serving the last loaded one") == 1
    assert loaded(stub) == [2]
    assert versions_in_metrics(server) == [2]
    assert predict(stub).model_spec.version == 2

    export_version(model_dir, 3)
    wait_for(lambda: loaded(stub) == [3], "version 3 replacing the orphaned version 2")
    assert predict(stub).model_spec.version == 3
    wait_for(lambda: versions_in_metrics(server) == [3], "the version metric to follow")


def test_specific_serves_exactly_the_listed_versions(
    model_dir: Path, servers: Callable[..., ServerProcess]
) -> None:
    for version in (2, 3):
        publish_copy(model_dir / "1", model_dir, version)
    server = servers(model_dir, "--version-policy", "specific", "--versions", "1,3")
    stub = stub_for(server)
    assert loaded(stub) == [3, 1]
    assert versions_in_metrics(server) == [3, 1]
    assert predict(stub).model_spec.version == 3
    assert predict(stub, 1).model_spec.version == 1
    with pytest.raises(grpc.RpcError) as raised:
        predict(stub, 2)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "loaded: 3, 1" in (raised.value.details() or "")

    publish_copy(model_dir / "1", model_dir, 4)  # newer, but not listed
    scans_pass(server)
    assert loaded(stub) == [3, 1]
    assert log_count(server, "version=4") == 0

    shutil.rmtree(model_dir / "3")  # rollback by removing the folder: 1 stays
    wait_for(lambda: loaded(stub) == [1], "version 3 to be unloaded")
    assert predict(stub).model_spec.version == 1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def heavy_versions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two ~80 MB models (20M weights): a leaked version would show plainly in the RSS."""
    from mnist_serving.contract.tfquiet import import_tensorflow
    from mnist_serving.trainer.export import export_saved_model

    keras = import_tensorflow().keras
    folder = tmp_path_factory.mktemp("heavy")
    exported = []
    for version in (1, 2):
        keras.utils.set_random_seed(version)
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                keras.layers.Flatten(),
                keras.layers.Dense(4096, activation="relu"),
                keras.layers.Dense(4096, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        exported.append(export_saved_model(model, folder, version=version))
    return exported


@pytest.mark.slow
def test_memory_stays_bounded_over_reload_cycles(
    tmp_path: Path, heavy_versions: list[Path], servers: Callable[..., ServerProcess]
) -> None:
    model_dir = tmp_path / "mnist"
    model_dir.mkdir()
    publish_copy(heavy_versions[0], model_dir, 1)
    server = servers(model_dir)
    stub = stub_for(server)
    pid = server.process.pid
    rss = {0: rss_mb(pid)}
    for cycle in range(1, 11):
        version = cycle + 1
        publish_copy(heavy_versions[cycle % 2], model_dir, version)
        # wait_for calls its lambdas before the loop moves on, so late binding is safe.
        wait_for(lambda: loaded(stub) == [version], f"version {version}", timeout=60)  # noqa: B023
        shutil.rmtree(model_dir / str(version - 1))
        unloaded = f'msg="version unloaded" version={version - 1}'
        wait_for(lambda: log_count(server, unloaded), f"unloaded {version - 1}")  # noqa: B023
        assert predict(stub).model_spec.version == version
        rss[cycle] = rss_mb(pid)
    print("\nserver RSS (MB) after each reload cycle:", {k: round(v) for k, v in rss.items()})
    assert rss[10] < rss[2] * 1.25, rss


def publish_stuck(source: Path, model_dir: Path, version: int) -> None:
    """A version whose load hangs, as on a hung network file system: saved_model.pb is a
    FIFO nobody writes to, so the loader blocks reading it."""
    staging = model_dir / f".tmp-{version}-stuck"
    shutil.copytree(source, staging)
    (staging / "saved_model.pb").unlink()
    os.mkfifo(staging / "saved_model.pb")
    os.rename(staging, model_dir / str(version))


def test_shutdown_does_not_wait_for_a_load_in_progress(
    model_dir: Path, servers: Callable[..., ServerProcess]
) -> None:
    server = servers(model_dir)
    stub = stub_for(server)
    publish_stuck(model_dir / "1", model_dir, 2)
    wait_for(lambda: log_count(server, 'msg="loading version" version=2'), "the load to start")
    time.sleep(0.5)
    assert server.process.poll() is None
    assert predict(stub).model_spec.version == 1  # the stuck loader is not in the way
    assert loaded(stub) == [1]
    started = time.monotonic()
    assert server.stop(timeout=20) == 0, server.log
    print(f"\nstopped in {time.monotonic() - started:.2f} s with a load hanging")
    assert time.monotonic() - started < 10
    assert "exiting while a model version was still loading" in server.log


def test_sigterm_during_the_first_load_exits_promptly(tmp_path: Path, tiny_model_dir: Path) -> None:
    model_dir = tmp_path / "mnist"
    model_dir.mkdir()
    publish_stuck(tiny_model_dir / "1", model_dir, 1)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mnist_serving.server", "--model-dir", str(model_dir),
            "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    assert process.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("loading version" in line for line in lines), "the first load")
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(5)
    assert "exiting while a model version was still loading" in "".join(lines)
    assert "Traceback" not in "".join(lines)
