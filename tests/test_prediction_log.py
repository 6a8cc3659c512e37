"""The prediction log (server/prediction_log.py) against a real server process: the Parquet
folder holds exactly the sampled calls, the CloudEvents sink is checked against a real HTTP
receiver that the test runs, a receiver that goes away loses no call, and a full queue drops
records (counted) and never a call."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from mnist_serving.contract import REPORT
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.call_context import Call
from mnist_serving.server.observers import Labelled
from mnist_serving.server.prediction_log import FeedbackRecord, PredictionLog
from mnist_serving.server.runtimes.base import Prediction
from mnist_serving.server.settings import Settings

from .support import ServerProcess, scrape

NAME = r"(predictions|feedback)-\d{8}T\d{6}Z-\d+-\d+\.parquet"
REFERENCE = {"class_distribution": [0.1] * 10, "low_confidence_threshold": 0.5}


def images_of(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def predict_native(target: str, images: np.ndarray, request_id: str) -> np.ndarray:
    """The classes the native API answers, for a call sent with `request_id`."""
    with grpc.insecure_channel(target) as channel:
        answer, call = predict_pb2_grpc.MnistServiceStub(channel).Predict.with_call(
            pb.PredictRequest(
                images=pb.Tensor(
                    dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes()
                )
            ),
            metadata=[("x-request-id", request_id)],
            timeout=30,
        )
    assert dict(call.trailing_metadata() or ())["x-request-id"] == request_id
    return np.frombuffer(answer.classes.content, "<i8")


def predict_v2_rest(url: str, images: np.ndarray, request_id: str) -> np.ndarray:
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [len(images), 784],
                "data": images.ravel().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/mnist/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["X-Request-Id"] == request_id
        outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
    return np.array(outputs["classes"]["data"])


def table_of(folder: Path, kind: str = "predictions") -> Any:
    files = sorted(folder.glob(f"{kind}-*.parquet"))
    assert files, f"no {kind} files in {sorted(p.name for p in folder.iterdir())}"
    return pq.ParquetDataset(files).read()


def wait_for(what: str, done: Any, timeout: float = 60) -> None:
    """Poll `done()` until true; fail (naming `what`) if it never is."""
    stop = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < stop, f"never happened: {what}"
        time.sleep(0.05)


def counter(server: ServerProcess, name: str, sink: str) -> float:
    return scrape(server).get((f"mnist_prediction_log_{name}_total", (("sink", sink),)), 0.0)


@pytest.fixture(scope="module")
def referenced_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, its metrics.json holding a training reference."""
    model_dir = tmp_path_factory.mktemp("referenced") / "mnist"
    shutil.copytree(tiny_model_dir, model_dir)
    report_path = model_dir / "1" / REPORT
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({**report, "reference": REFERENCE}))
    return model_dir


def test_the_folder_holds_every_call_once_with_its_answer_and_input(
    referenced_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "log"
    sent: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
    with ServerProcess(
        referenced_model_dir, "--poll-interval", "0", "--prediction-log", str(folder),
        "--log-inputs", "--prediction-log-max-rows", "7",
    ) as server:  # fmt: skip
        for i in range(30):
            images = images_of(i, 1 + i % 5)
            request_id = f"call-{i}"
            if i % 3:
                classes, api = predict_native(server.target, images, request_id), "native"
            else:
                classes, api = predict_v2_rest(server.http_url, images, request_id), "v2_rest"
            sent[request_id] = (images, classes, api)
        rows = sum(len(images) for images, _, _ in sent.values())
        wait_for("every row written", lambda: counter(server, "records", "dir") == rows)
        assert counter(server, "dropped", "dir") == 0
        assert server.stop() == 0, server.log

    names = sorted(p.name for p in folder.iterdir())
    assert "reference-v1.json" in names
    assert json.loads((folder / "reference-v1.json").read_text()) == REFERENCE
    assert not [n for n in names if n.endswith(".tmp")], names
    logged = [n for n in names if n.startswith("predictions-")]
    assert all(re.fullmatch(NAME, n) for n in logged), logged
    # Rotation by rows: a file passes --prediction-log-max-rows by less than one call.
    for name in logged:
        assert pq.read_metadata(folder / name).num_rows < 7 + 5

    table = table_of(folder)
    assert table.num_rows == rows
    keys = list(zip(table["request_id"].to_pylist(), table["index"].to_pylist(), strict=True))
    assert len(set(keys)) == rows  # each (request_id, index) exactly once
    expected = {
        (request_id, index) for request_id, (images, _, _) in sent.items()
        for index in range(len(images))
    }  # fmt: skip
    assert set(keys) == expected
    for row in table.to_pylist():
        images, classes, api = sent[row["request_id"]]
        index = row["index"]
        assert row["predicted"] == classes[index]
        assert row["api"] == api
        assert row["model_version"] == 1
        assert row["priority"] == "online"
        assert row["input"] == images[index].tobytes()
        assert int(np.argmax(row["probabilities"])) == row["predicted"]
        assert row["confidence"] == pytest.approx(max(row["probabilities"]))


def test_a_sampled_call_logs_all_its_images_and_an_unsampled_one_none(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "log"
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--prediction-log", str(folder),
        "--prediction-log-sample", "0.5",
    ) as server:  # fmt: skip
        for i in range(100):
            predict_native(server.target, images_of(i, 3), f"s-{i}")
        assert server.stop() == 0, server.log
    table = table_of(folder)
    by_call: dict[str, list[int]] = {}
    for request_id, index in zip(
        table["request_id"].to_pylist(), table["index"].to_pylist(), strict=True
    ):
        by_call.setdefault(request_id, []).append(index)
    assert 0 < len(by_call) < 100  # about half: all or none fails with odds 2**-99
    assert all(sorted(indices) == [0, 1, 2] for indices in by_call.values())
    assert table["input"].null_count == table.num_rows  # no --log-inputs: no inputs


class Receiver:
    """A CloudEvents receiver on a loopback port: keeps each POST's headers and body; can
    be stopped and started again on the same port, and held (answering nothing)."""

    def __init__(self, port: int = 0) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.release.set()
        self.held = threading.Event()  # set once a POST waits for release
        self.status = 202  # what it answers; posts are kept only when below 300
        self.connections: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                receiver.connections.append(self.connection)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not receiver.release.is_set():
                    receiver.held.set()
                    receiver.release.wait(60)
                status = receiver.status
                if status < 300:
                    with receiver.lock:
                        receiver.posts.append((dict(self.headers.items()), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def events(self) -> list[tuple[dict[str, str], Any]]:
        """(headers, data) of every event received (binary and batched mode)."""
        with self.lock:
            posts = list(self.posts)
        events = []
        for headers, body in posts:
            headers = {k.lower(): v for k, v in headers.items()}
            if headers["content-type"] == "application/cloudevents-batch+json":
                for event in json.loads(body):
                    events.append(({f"ce-{k}": v for k, v in event.items()}, event["data"]))
            else:
                events.append((headers, json.loads(body)))
        return events

    def response_ids(self) -> list[str]:
        return [
            h["ce-id"]
            for h, _ in self.events()
            if h["ce-type"] == "org.kubeflow.serving.inference.response"
        ]

    def stop(self) -> None:
        """Stop listening and cut the open (kept-alive) connections."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    sink = Receiver()
    yield sink
    sink.stop()


def test_cloudevents_reach_a_real_receiver_in_kserves_shape(
    tiny_model_dir: Path, receiver: Receiver
) -> None:
    sent: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--prediction-log-url", receiver.url,
        "--log-inputs",
    ) as server:  # fmt: skip
        for i in range(5):
            images = images_of(100 + i, 1 + i)
            sent[f"ce-{i}"] = (images, predict_native(server.target, images, f"ce-{i}"))
        assert server.stop() == 0, server.log  # a graceful stop sends what is queued
    events = receiver.events()
    assert len(events) == 10  # a request and a response event per call
    for headers, data in events:
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-source"].startswith("urn:mnist-serving:")
        assert headers["ce-time"].endswith("Z")
        assert headers["ce-inferenceservicename"] == "mnist"
        assert headers["content-type"] == "application/json"
        images, classes = sent[headers["ce-id"]]
        if headers["ce-type"] == "org.kubeflow.serving.inference.request":
            (inputs,) = data["inputs"]
            assert inputs["shape"] == [len(images), 784]
            assert bytes(inputs["data"]) == images.tobytes()
        else:
            assert headers["ce-type"] == "org.kubeflow.serving.inference.response"
            assert data["id"] == headers["ce-id"]
            assert data["model_name"] == "mnist"
            assert data["model_version"] == "1"
            outputs = {o["name"]: o for o in data["outputs"]}
            assert outputs["classes"]["data"] == classes.tolist()
            assert outputs["probabilities"]["shape"] == [len(images), 10]


def test_batched_mode_sends_several_events_per_post(
    tiny_model_dir: Path, receiver: Receiver
) -> None:
    receiver.release.clear()  # hold the first POST, so that the next ones batch up
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--prediction-log-url", receiver.url,
        "--prediction-log-url-batch", "50",
    ) as server:  # fmt: skip
        predict_native(server.target, images_of(0, 1), "b-first")
        wait_for("the first POST held", receiver.held.is_set)
        for i in range(20):
            predict_native(server.target, images_of(i, 1), f"b-{i}")
        receiver.release.set()
        assert server.stop() == 0, server.log
    assert sorted(receiver.response_ids()) == sorted(["b-first", *(f"b-{i}" for i in range(20))])
    assert len(receiver.posts) < 21  # the 20 calls made while the first was held: batched
    assert {h["Content-Type"] for h, _ in receiver.posts} == {BATCH_CONTENT_TYPE}


BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


def test_a_receiver_that_goes_away_loses_no_call(tiny_model_dir: Path) -> None:
    receiver = Receiver()
    port = receiver.port
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--prediction-log-url", receiver.url
    ) as server:
        ids = [f"k-{i}" for i in range(40)]
        for request_id in ids[:10]:
            predict_native(server.target, images_of(1, 2), request_id)
        wait_for("the first events delivered", lambda: len(receiver.response_ids()) == 10)
        receiver.stop()  # killed: the port refuses connections
        for request_id in ids[10:30]:  # every call still succeeds
            predict_native(server.target, images_of(2, 2), request_id)
        wait_for("a failed POST counted", lambda: counter(server, "errors", "url") >= 1)
        assert len(receiver.response_ids()) == 10
        again = Receiver(port)  # back on the same port: the queued events arrive (retry)
        try:
            for request_id in ids[30:]:
                predict_native(server.target, images_of(3, 2), request_id)
            wait_for("every event delivered", lambda: set(again.response_ids()) == set(ids[10:]))
            assert counter(server, "dropped", "url") == 0
            assert counter(server, "records", "url") >= 80  # 40 calls x 2 images
            assert server.stop() == 0, server.log
        finally:
            again.stop()
    assert "cannot send the prediction log" in server.log  # said, once per interval
    assert server.log.count("cannot send the prediction log") <= 2


def test_a_full_queue_drops_records_counts_them_and_never_fails_a_call(
    tiny_model_dir: Path, receiver: Receiver
) -> None:
    receiver.release.clear()  # the sink's first POST hangs until released
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--prediction-log-url", receiver.url,
        "--prediction-log-queue-size", "4",
    ) as server:  # fmt: skip
        predict_native(server.target, images_of(0, 1), "q-first")
        wait_for("the writer stuck in a POST", receiver.held.is_set)
        for i in range(50):  # the queue takes 4 rows; the rest are dropped, the calls answered
            assert len(predict_native(server.target, images_of(i, 1), f"q-{i}")) == 1
        dropped = counter(server, "dropped", "url")
        assert dropped == 50 - 4
        receiver.release.set()
        assert server.stop() == 0, server.log
    delivered = receiver.response_ids()
    assert len(delivered) == 1 + 4
    assert len(delivered) + dropped == 51  # every call either delivered or counted


def test_feedback_rows_go_to_feedback_files(tmp_path: Path) -> None:
    """The drift helper's feedback path calls observer.feedback: rows per the contract."""
    settings: dict[str, Any] = {"prediction_log": tmp_path}
    log = PredictionLog(Settings(**settings), lambda version: None)
    probabilities = np.eye(10, dtype=np.float32)[[3, 5]]
    log.observe(Call("native", "Predict", request_id="f-1"), images_of(0, 2),
                Prediction(probabilities, np.array([3, 5])), 2)  # fmt: skip
    log.feedback([Labelled("f-1", 0, 3, 2, 3), Labelled("f-1", 1, 4, 2, 5)])
    log.close()
    feedback = table_of(tmp_path, "feedback")
    assert feedback.column_names == [
        "time", "request_id", "index", "label", "model_version", "predicted",
    ]  # fmt: skip
    assert [(r["request_id"], r["index"], r["label"], r["predicted"])
            for r in feedback.to_pylist()] == [("f-1", 0, 3, 3), ("f-1", 1, 4, 5)]  # fmt: skip
    assert table_of(tmp_path)["predicted"].to_pylist() == [3, 5]
    assert not list(tmp_path.glob("reference-*"))  # a version without a reference: none


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prediction-log-url", "ftp://example/x"], "is not http(s)://"),
        (["--prediction-log-sample", "1.5"], "bad --prediction-log-sample"),
        (["--prediction-log", "{file}"], "cannot create it"),
    ],
)
def test_bad_prediction_log_settings_stop_the_start(
    tiny_model_dir: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    flags = [flag.replace("{file}", str(a_file / "log")) for flag in flags]
    run = subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", "--model-dir", str(tiny_model_dir),
         "--port", "0", "--http-port", "0", *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0
    assert message in run.stderr + run.stdout


def test_workers_write_files_of_their_own_and_lose_no_call(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "log"
    ids = [f"w-{i}" for i in range(40)]
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--workers", "2", "--prediction-log",
        str(folder), "--max-connection-age", "0",
    ) as server:  # fmt: skip
        for request_id in ids:  # a connection per call: the kernel spreads them over both
            predict_native(server.target, images_of(7, 1), request_id)
        assert server.stop() == 0, server.log
    names = [p.name for p in folder.glob("predictions-*.parquet")]
    table = table_of(folder)
    assert sorted(table["request_id"].to_pylist()) == sorted(ids)
    pids = {name.split("-")[2] for name in names}
    assert len(pids) == 2, names  # both workers answered and wrote; names carry the pid


def test_events_the_receiver_rejects_are_dropped_and_counted_not_retried(
    tiny_model_dir: Path, receiver: Receiver
) -> None:
    receiver.status = 400
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--prediction-log-url", receiver.url
    ) as server:
        for i in range(3):
            predict_native(server.target, images_of(i, 2), f"r-{i}")
        wait_for("the rejected rows counted", lambda: counter(server, "dropped", "url") == 6)
        receiver.status = 202
        for i in range(3, 5):
            predict_native(server.target, images_of(i, 2), f"r-{i}")
        assert server.stop() == 0, server.log
    assert sorted(receiver.response_ids()) == ["r-3", "r-4"]
    assert "the receiver rejects prediction log events" in server.log


def test_the_queue_is_bounded_in_rows_and_wakes_its_writer_once_a_group_waits() -> None:
    from mnist_serving.server.prediction_log import RecordQueue, ReferenceRecord

    queue = RecordQueue(capacity=10, wake_rows=4)
    record = FeedbackRecord(0.0, [Labelled("x", 0, 1, 1, 1)] * 3)  # 3 rows
    assert all(queue.offer(record, 3) for _ in range(3))
    assert not queue.offer(record, 3)  # 12 rows would pass the capacity: dropped
    assert queue.offer(ReferenceRecord(1, {}), 0)  # a reference weighs nothing: always kept
    assert queue.rows == 9
    assert len(queue.take(timeout=0, most_rows=4)) == 2  # whole records, up to about 4 rows
    assert queue.rows == 3
    woken = threading.Event()
    taken: list[object] = []

    def writer() -> None:
        taken.extend(queue.take(timeout=60, most_rows=100))
        woken.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not woken.wait(0.2)  # 3 rows wait: fewer than wake_rows, the writer sleeps on
    queue.offer(record, 3)  # 6 rows: the writer is woken
    thread.join(30)
    assert woken.is_set()
    assert [type(r).__name__ for r in taken] == [
        "FeedbackRecord", "ReferenceRecord", "FeedbackRecord",
    ]  # fmt: skip  # what was left, and the record that woke it: it waited for that one
    assert queue.rows == 0
