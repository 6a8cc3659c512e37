"""Several worker processes on one port under a supervisor: real processes, real clients.

Which worker a connection reached is read from the health service: each worker says
SERVING for "mnist_serving.worker.<its index>" and NOT_FOUND for the other names. Every
wait is on a condition, with a generous bound.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.client import AsyncMnistClient, MnistClient
from mnist_serving.client.errors import MnistError, NotFound
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.cpus import cgroup_cpu_quota, usable_cpus
from mnist_serving.server.settings import Settings
from mnist_serving.server.worker_link import WORKER_HEALTH_PREFIX

from .support import Samples, ServerProcess, scrape

SERVING = health_pb2.HealthCheckResponse.SERVING
WORKERS = 2
MAX_CONNECTIONS = 200  # each lands on a given worker with p = 1/2: never all on one


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting: {what}"
        time.sleep(0.05)


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def version_info(samples: Samples, version: str) -> float:
    """mnist_model_version_info of `version`, whichever runtime serves it (0 when absent)."""
    return max(
        (
            sample
            for (name, labels), sample in samples.items()
            if name == "mnist_model_version_info"
            and dict(labels).get("name") == "mnist"
            and dict(labels).get("version") == version
        ),
        default=0.0,
    )


def own_connection(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def worker_behind(channel: grpc.Channel) -> int:
    """The index of the worker that this channel's connection reached."""
    index = scan_workers(channel)
    if index is None:
        raise AssertionError("no worker name answered on this connection")
    return index


def scan_workers(channel: grpc.Channel) -> int | None:
    """The worker that answers its own name on this channel; None when none did, which
    happens only if the connection moved to another worker between two of the checks."""
    health = health_pb2_grpc.HealthStub(channel)
    for index in range(WORKERS):
        try:
            answer = health.Check(
                health_pb2.HealthCheckRequest(service=f"{WORKER_HEALTH_PREFIX}{index}"),
                timeout=10,
            )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            continue
        assert answer.status == SERVING
        return index
    return None


def connection_to_each_worker(target: str) -> dict[int, grpc.Channel]:
    """Open connections until every worker has one; close the others."""
    reached: dict[int, grpc.Channel] = {}
    for _ in range(MAX_CONNECTIONS):
        channel = own_connection(target)
        index = worker_behind(channel)
        if index in reached:
            channel.close()
        else:
            reached[index] = channel
        if len(reached) == WORKERS:
            return reached
    raise AssertionError(f"{MAX_CONNECTIONS} connections reached only workers {list(reached)}")


def predict(channel: grpc.Channel, count: int = 1, timeout: float = 30) -> pb.PredictResponse:
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    request = pb.PredictRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes())
    )
    response: pb.PredictResponse = predict_pb2_grpc.MnistServiceStub(channel).Predict(
        request, timeout=timeout
    )
    return response


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """The newest pid of each worker, from the supervisor's "worker started" lines."""
    pids: dict[int, int] = {}
    for line in list(server.log_lines):
        found = re.search(r'msg="worker started" child=(\d+) pid=(\d+)', line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def logged(server: ServerProcess, pattern: str) -> list[str]:
    return [line for line in list(server.log_lines) if re.search(pattern, line)]


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_model_dir, "--workers", str(WORKERS), "--poll-interval", "0")
    yield server
    assert server.stop() == 0, server.log


def test_every_worker_serves_the_one_port(two_workers: ServerProcess) -> None:
    channels = connection_to_each_worker(two_workers.target)
    for channel in channels.values():
        assert predict(channel, 2).classes.shape == [2]
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == SERVING
    for index in range(WORKERS):
        serving = logged(two_workers, rf'worker={index} msg="worker serving" port=(\d+)')
        assert serving, two_workers.log
        assert f"port={two_workers.port} " in serving[0]
    assert len(logged(two_workers, r" msg=serving ")) == 1  # the supervisor's


def test_metrics_count_the_calls_of_every_worker_exactly(two_workers: ServerProcess) -> None:
    channels = connection_to_each_worker(two_workers.target)
    before = scrape(two_workers)
    for channel in channels.values():
        for _ in range(5):
            predict(channel, 3)
    after = scrape(two_workers)

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    calls = 5 * WORKERS
    ok = {
        "api": "native",
        "method": "Predict",
        "code": "OK",
        "priority": "online",
        "caller": "anonymous",
    }
    assert delta("mnist_requests_total", **ok) == calls
    seconds = {"api": "native", "method": "Predict", "priority": "online", "caller": "anonymous"}
    assert delta("mnist_request_duration_seconds_count", **seconds) == calls
    assert delta("mnist_images_predicted_total") == 3 * calls
    assert delta("mnist_batch_size_images_sum") == 3 * calls
    # Gauges: totals over the live workers, or true of at least one; never one per process.
    assert value(after, "mnist_requests_in_flight") == 0
    assert value(after, "mnist_batch_queue_depth") == 0
    assert version_info(after, "1") == 1
    assert value(after, "mnist_model_load_seconds", version="1") > 0
    assert value(after, "mnist_worker_restarts_total") == 0
    assert not [key for key in after if "pid" in dict(key[1])]


def test_the_clients_spread_their_calls_over_connections(two_workers: ServerProcess) -> None:
    connections = 64  # all on one worker: p = 2 ** -63
    with MnistClient(two_workers.target, connections=connections) as client:
        answered = []
        for _ in range(connections):  # round-robin: one health check per connection
            try:
                answered.append(client.health(f"{WORKER_HEALTH_PREFIX}0"))
            except NotFound:
                answered.append("NOT_FOUND")
        assert 0 < answered.count("SERVING") < connections
        assert client.predict(np.zeros((5, 28, 28), np.uint8)).classes.shape == (5,)
    with pytest.raises(ValueError, match="connections"):
        MnistClient(two_workers.target, connections=0)


async def test_the_async_client_spreads_its_calls_too(two_workers: ServerProcess) -> None:
    connections = 64
    async with AsyncMnistClient(two_workers.target, connections=connections) as client:
        answered = []
        for _ in range(connections):
            try:
                answered.append(await client.health(f"{WORKER_HEALTH_PREFIX}1"))
            except NotFound:
                answered.append("NOT_FOUND")
        assert 0 < answered.count("SERVING") < connections
        prediction = await client.predict(np.zeros((4, 28, 28), np.uint8))
        assert prediction.classes.shape == (4,)


def test_mnist_client_score_spreads_over_connections(
    two_workers: ServerProcess, tmp_path: Path
) -> None:
    source, output = tmp_path / "digits.npy", tmp_path / "scores.csv"
    np.save(source, np.zeros((300, 28, 28), np.uint8))
    score = [sys.executable, "-m", "mnist_serving.client", "score", "--target", two_workers.target]
    args = ["--input", str(source), "--output", str(output), "--batch-size", "16"]
    before = scrape(two_workers)
    result = subprocess.run(
        [*score, *args, "--connections", "8", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(output.read_text().splitlines()) == 301  # a header and a row per image
    after = scrape(two_workers)
    images = value(after, "mnist_images_predicted_total") - value(
        before, "mnist_images_predicted_total"
    )
    assert images == 300
    refused = subprocess.run(
        [*score, *args, "--connections", "0"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "--connections" in refused.stderr


def test_a_killed_worker_is_replaced_and_no_call_fails(tiny_model_dir: Path) -> None:
    server = ServerProcess(tiny_model_dir, "--workers", str(WORKERS), "--poll-interval", "0")
    try:
        victim = worker_pids(server)[1]
        answered = [0]
        failures: list[BaseException] = []
        stop = threading.Event()
        counting = threading.Lock()
        client = MnistClient(server.target, connections=8)  # DEFAULT_RETRY

        def load() -> None:
            while not stop.is_set():
                try:
                    client.predict(np.zeros((1, 28, 28), np.uint8))
                    with counting:
                        answered[0] += 1
                except MnistError as error:
                    failures.append(error)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: answered[0] >= 100, "load running")
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: bool(logged(server, 'msg="worker replaced" child=1')), "replaced")
            wait_until(
                lambda: value(scrape(server), "mnist_worker_restarts_total") == 1, "restart counted"
            )
            after_replacement = answered[0]
            wait_until(lambda: answered[0] >= after_replacement + 100, "load after the restart")
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            client.close()
        assert failures == []
        assert logged(server, rf'msg="worker exited" child=1 pid={victim} code=-9')
        replacement = worker_pids(server)[1]
        assert replacement != victim
        environ = Path(f"/proc/{replacement}/environ").read_bytes().split(b"\0")
        folder = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
                      .split(b"=", 1)[1].decode())  # fmt: skip
        assert not list(folder.glob(f"*_{victim}.db"))  # folded into the archive
        assert (folder / "counter_archive.db").exists()
        assert set(connection_to_each_worker(server.target)) == {0, 1}
        samples = scrape(server)
        assert value(samples, "mnist_requests_in_flight") == 0
        assert version_info(samples, "1") == 1
        # The dead worker's answers are still in the sum (they came from the archive).
        ok = value(
            samples, "mnist_requests_total",
            api="native", method="Predict", code="OK", priority="online", caller="anonymous",
        )  # fmt: skip
        assert ok >= answered[0]
    finally:
        assert server.stop() == 0, server.log


def test_a_worker_that_cannot_restart_is_retried_while_the_others_serve(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "mnist"
    shutil.copytree(tiny_model_dir, model_dir)
    server = ServerProcess(model_dir, "--workers", str(WORKERS), "--poll-interval", "0")
    try:
        # The loaded version keeps serving; a new worker would find nothing to load.
        (model_dir / "1").rename(model_dir / ".away")
        os.kill(worker_pids(server)[1], signal.SIGKILL)
        wait_until(
            lambda: bool(logged(server, r'restarting it" child=1 .*no loadable model version')),
            "a failed restart",
        )
        channel = own_connection(server.target)
        assert predict(channel).model_spec.version == 1  # worker 0 still serves
        (model_dir / ".away").rename(model_dir / "1")
        wait_until(lambda: bool(logged(server, 'msg="worker replaced" child=1')), "replaced")
        assert value(scrape(server), "mnist_worker_restarts_total") >= 2
        assert set(connection_to_each_worker(server.target)) == {0, 1}
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0, server.log


def test_sigterm_drains_every_worker_and_exits_0(tiny_model_dir: Path) -> None:
    # A long batch timeout keeps one call queued in each worker while SIGTERM arrives.
    server = ServerProcess(
        tiny_model_dir,
        *("--workers", str(WORKERS), "--batch-timeout-ms", "1000", "--grace-period", "30"),
    )
    pids = worker_pids(server)
    channels = connection_to_each_worker(server.target)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    request = pb.PredictRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[3, 28, 28], content=images.tobytes())
    )
    in_flight = [
        predict_pb2_grpc.MnistServiceStub(channel).Predict.future(request, timeout=60)
        for channel in channels.values()
    ]
    wait_until(
        lambda: value(scrape(server), "mnist_batch_queue_depth") == 3 * WORKERS,
        "both calls queued",
        timeout=30,
    )
    server.process.send_signal(signal.SIGTERM)
    for call in in_flight:
        assert np.frombuffer(call.result(timeout=60).classes.content, "<i8").shape == (3,)
    assert server.stop() == 0, server.log
    for index, pid in pids.items():
        assert logged(server, rf"worker={index} msg=stopped"), server.log
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert logged(server, r"worker=supervisor msg=stopped")


def gone(pid: int) -> bool:
    """Exited (a zombie that nobody has reaped yet counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_workers_stop_when_the_supervisor_is_killed(tiny_model_dir: Path, tmp_path: Path) -> None:
    # TMPDIR: a killed supervisor cannot delete its metrics dir; pytest deletes tmp_path.
    server = ServerProcess(
        tiny_model_dir,
        *("--workers", str(WORKERS), "--poll-interval", "0"),
        env={"TMPDIR": str(tmp_path)},
    )
    pids = worker_pids(server)
    server.process.kill()
    server.process.wait(30)
    for index, pid in pids.items():
        wait_until(lambda pid=pid: gone(pid), f"worker {index} exiting")  # type: ignore[misc]
    assert len(logged(server, r"msg=stopped")) == WORKERS


def test_long_lived_connections_move_between_workers(tiny_model_dir: Path) -> None:
    server = ServerProcess(
        tiny_model_dir, *("--workers", str(WORKERS), "--max-connection-age", "0.5")
    )
    try:
        channel = own_connection(server.target)
        seen: set[int | None] = {None}

        def reached_both() -> bool:
            # gRPC reconnects after each GOAWAY, possibly in the middle of a scan (None).
            seen.add(scan_workers(channel))
            return len(seen - {None}) == WORKERS

        wait_until(reached_both, "one channel reaching both workers")
        channel.close()
    finally:
        assert server.stop() == 0, server.log


def test_a_new_version_is_served_by_every_worker(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "mnist"
    shutil.copytree(tiny_model_dir, model_dir)
    server = ServerProcess(model_dir, "--workers", str(WORKERS), "--poll-interval", "0.2")
    try:
        channels = connection_to_each_worker(server.target)
        assert {predict(c).model_spec.version for c in channels.values()} == {1}
        shutil.copytree(model_dir / "1", model_dir / ".2.partial")
        (model_dir / ".2.partial").rename(model_dir / "2")
        for index, channel in channels.items():

            def serves_2(channel: grpc.Channel = channel) -> bool:
                return predict(channel).model_spec.version == 2

            wait_until(serves_2, f"worker {index} serving version 2")
        for index in range(WORKERS):
            assert logged(server, rf'worker={index} msg="serving versions" versions=\[2\]')

        def only_version_2_listed() -> bool:
            samples = scrape(server)
            return version_info(samples, "2") == 1 and version_info(samples, "1") == 0

        wait_until(only_version_2_listed, "version 1 off the metrics page")
    finally:
        assert server.stop() == 0, server.log


def test_workers_that_cannot_start_stop_the_server_with_one_message(tmp_path: Path) -> None:
    result = run_serve(
        *("--model-dir", str(tmp_path), "--workers", str(WORKERS)),
        *("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("no loadable model version") == 1, result.stderr
    assert result.stderr.count('msg="cannot start"') == 1
    assert "Traceback" not in result.stderr
    assert " msg=serving " not in result.stderr


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_in_use_is_refused_before_any_worker_starts(
    tiny_model_dir: Path, reuse_port: bool
) -> None:
    # With SO_REUSEPORT the workers could join the other program's port: refused too.
    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(
            *("--model-dir", str(tiny_model_dir), "--workers", str(WORKERS)),
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count(f"cannot listen on 127.0.0.1:{port}") == 1, result.stderr
    assert "worker started" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["0", "many", "-2"])
def test_a_bad_worker_count_stops_start_up_with_exit_code_2(bad: str) -> None:
    result = run_serve("--workers", bad)
    assert result.returncode == 2
    assert "--workers" in result.stderr


def test_the_worker_flag_is_only_for_the_supervisor() -> None:
    result = run_serve("--worker", "0")
    assert result.returncode == 2
    assert "supervisor" in result.stderr


def test_auto_is_one_worker_per_usable_cpu() -> None:
    assert Settings.model_validate({"workers": "auto"}).workers == usable_cpus() >= 1
    assert usable_cpus() <= len(os.sched_getaffinity(0))


def fake_cgroups(root: Path, own: str, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "self-cgroup").write_text(own)
    return root / "self-cgroup"


def test_the_cgroup_quota_caps_the_cpus(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    own = fake_cgroups(
        v2, "0::/kubepods/pod1\n", {"kubepods/cpu.max": "50000 100000\n", "cpu.max": "max 100000"}
    )
    assert cgroup_cpu_quota(v2, own) == 0.5
    assert usable_cpus(v2, own) == 1  # rounded down, at least one
    unlimited = tmp_path / "none"
    own = fake_cgroups(unlimited, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(unlimited, own) is None
    assert usable_cpus(unlimited, own) == cpus
    v1 = tmp_path / "v1"
    own = fake_cgroups(
        v1,
        "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n",
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(v1, own) == 2.5
    assert usable_cpus(v1, own) == min(cpus, 2)
