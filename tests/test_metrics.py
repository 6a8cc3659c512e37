"""Prometheus metrics of the real server: text format, promtool, and a real Prometheus."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import Samples, ServerProcess, scrape

REPO = Path(__file__).resolve().parent.parent


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def predict(server: ServerProcess, count: int) -> pb.PredictResponse:
    stub = predict_pb2_grpc.MnistServiceStub(grpc.insecure_channel(server.target))
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    response: pb.PredictResponse = stub.Predict(
        pb.PredictRequest(
            images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes())
        )
    )
    return response


def test_calls_move_the_counters_and_histograms_by_what_was_sent(
    served_tiny: ServerProcess,
) -> None:
    before = scrape(served_tiny)
    for _ in range(3):
        predict(served_tiny, 7)
    with pytest.raises(grpc.RpcError):
        predict(served_tiny, 0)
    after = scrape(served_tiny)

    def delta(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    ok = {
        "api": "native",
        "method": "Predict",
        "code": "OK",
        "priority": "online",
        "caller": "anonymous",
    }
    assert delta("mnist_requests_total", **ok) == 3
    assert delta("mnist_requests_total", **{**ok, "code": "INVALID_ARGUMENT"}) == 1
    assert (
        delta(
            "mnist_request_duration_seconds_count",
            api="native", method="Predict", priority="online", caller="anonymous",
        )
        == 4
    )  # fmt: skip
    assert delta("mnist_images_predicted_total") == 21
    assert delta("mnist_batch_size_images_sum") == 21
    assert delta("mnist_batch_size_images_count") == 3
    assert delta("mnist_model_inference_seconds_count") == 3
    assert delta("mnist_batch_queue_wait_seconds_count", priority="online") == 3
    assert sum(delta("mnist_predicted_class_total", **{"class": str(d)}) for d in range(10)) == 21
    assert value(after, "mnist_requests_in_flight") == 0
    assert value(after, "mnist_batch_queue_depth") == 0
    info = {"name": "mnist", "version": "1", "runtime": "litert"}  # the tiny model has a twin
    assert value(after, "mnist_model_version_info", **info) == 1
    assert value(after, "mnist_model_load_seconds", version="1") > 0


def test_every_metric_follows_the_naming_rules(served_tiny: ServerProcess) -> None:
    with urllib.request.urlopen(served_tiny.metrics_url, timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    ours = [f for f in families if f.name.startswith("mnist_")]
    assert len(ours) >= 12
    for family in ours:
        assert family.type != "summary", family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if "seconds" in family.name or "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_nothing_to_report(served_tiny: ServerProcess) -> None:
    predict(served_tiny, 2)
    with urllib.request.urlopen(served_tiny.metrics_url, timeout=10) as response:
        text = response.read()
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert lint.returncode == 0, lint.stderr.decode() + lint.stdout.decode()
    assert lint.stdout.decode().strip() == ""
    assert lint.stderr.decode().strip() == ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus(served_tiny: ServerProcess, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the server every second; yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (.ci/run installs Debian's package)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mnist-serving\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{served_tiny.metrics_port}']}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def query(base: str, promql: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except OSError:
        return []  # not up yet
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def test_a_real_prometheus_computes_throughput_and_p99(
    served_tiny: ServerProcess, prometheus: str
) -> None:
    throughput = "rate(mnist_images_predicted_total[10s])"
    p99 = (
        "histogram_quantile(0.99, sum by (le) "
        "(rate(mnist_request_duration_seconds_bucket{method='Predict'}[10s])))"
    )
    seen: dict[str, float] = {}
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up and len(seen) < 2:
        for _ in range(20):
            predict(served_tiny, 16)
        for name, promql in (("throughput", throughput), ("p99", p99)):
            for row in query(prometheus, promql):
                number = float(row["value"][1])  # type: ignore[index]
                if number == number and number > 0:  # not NaN
                    seen[name] = number
        time.sleep(0.5)
    assert seen.get("throughput", 0) > 0, "rate() of the images counter never went positive"
    assert 0 < seen.get("p99", 0) < 10, "histogram_quantile of the latency never gave a number"


def test_concurrent_small_requests_are_merged_into_fewer_model_calls(
    tiny_model_dir: Path,
) -> None:
    # A 50 ms batch window makes the merge certain rather than a matter of timing.
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--batch-timeout-ms", "50"
    ) as server:
        before = scrape(server)
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: predict(server, 1), range(32)))
        after = scrape(server)
    assert all(len(a.classes.content) == 8 for a in answers)
    calls = value(after, "mnist_batch_size_images_count") - value(
        before, "mnist_batch_size_images_count"
    )
    images = value(after, "mnist_batch_size_images_sum") - value(
        before, "mnist_batch_size_images_sum"
    )
    assert images == 32
    assert calls < 16, f"32 concurrent requests took {calls:.0f} model calls"


# --- several workers' files ------------------------------------------------------------------

_WORKER = """
import os, sys
import numpy as np
from mnist_serving.server import metrics
n = int(sys.argv[1])
metrics.REQUESTS.labels("native", "Predict", "OK", "online", "anonymous").inc(n)
metrics.REQUESTS.labels("v2", "ModelInfer", "INVALID_ARGUMENT", "online", "anonymous").inc(1)
for seconds in (0.0002, 0.003, 0.3)[:n]:
    metrics.REQUEST_SECONDS.labels("native", "Predict", "online", "anonymous").observe(seconds)
metrics.count_classes(np.arange(n) % 10)
metrics.IN_FLIGHT.inc(n)
print(os.getpid())
"""


def kept_series(page: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counter and histogram samples of a page (what must survive a worker)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.decode())
        if family.type in ("counter", "histogram")
        for s in family.samples
    }


def test_a_dead_workers_counts_are_folded_into_the_archive_and_its_files_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the supervisor does when a worker exits: the page keeps every count, drops the
    worker's gauges, and the folder keeps one file per kind instead of one per worker."""
    from mnist_serving.server import metrics

    def worker(n: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _WORKER, str(n)],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return int(done.stdout)

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    first, second = worker(2), worker(3)
    before = kept_series(metrics.exposition()[0])
    assert before[("mnist_requests_total", (("api", "native"), ("caller", "anonymous"),
                                            ("code", "OK"),
                                            ("method", "Predict"),
                                            ("priority", "online")))] == 5  # fmt: skip
    metrics.process_gone(first)
    assert not list(tmp_path.glob(f"*_{first}.db"))
    assert kept_series(metrics.exposition()[0]) == before
    in_flight = [line for line in metrics.exposition()[0].decode().splitlines()
                 if line.startswith("mnist_requests_in_flight ")]  # fmt: skip
    assert in_flight == ["mnist_requests_in_flight 3.0"]  # the live worker's gauge only
    metrics.process_gone(second)
    assert kept_series(metrics.exposition()[0]) == before
    assert sorted(p.name for p in tmp_path.glob("*.db")) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]
    third = worker(1)
    after = kept_series(metrics.exposition()[0])
    key = (
        "mnist_requests_total",
        (
            ("api", "native"),
            ("caller", "anonymous"),
            ("code", "OK"),
            ("method", "Predict"),
            ("priority", "online"),
        ),
    )
    assert after[key] == 6
    metrics.process_gone(third)
    assert kept_series(metrics.exposition()[0]) == after
    count = (
        "mnist_request_duration_seconds_count",
        (("api", "native"), ("caller", "anonymous"), ("method", "Predict"), ("priority", "online")),
    )
    assert after[count] == 2 + 3 + 1
