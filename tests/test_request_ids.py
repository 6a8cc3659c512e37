"""Request IDs and the access log, against real server processes.

Every call's answer carries its request ID (gRPC trailing metadata x-request-id, HTTP
header X-Request-Id), the caller's when it sent a valid one, else a new one; the client
library exposes it on answers and errors; log lines about the call carry it; the access log
has exactly one line per call (sample rate 1), none at rate 0, and a writer that cannot
keep up drops lines (counted) while every call still succeeds.
"""

from __future__ import annotations

import json
import os
import re
import select
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient import grpc as triton_grpc

from mnist_serving.client import AsyncMnistClient, MnistClient
from mnist_serving.client.errors import NotFound
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import ServerProcess

GENERATED = re.compile(r"[0-9a-f]{32}")
WAIT_SECONDS = 30.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def native_request(images: int = 1, version: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(
        model_spec=pb.ModelSpec(version=version),
        images=pb.Tensor(
            dtype=pb.DATA_TYPE_UINT8, shape=[images, 28, 28], content=bytes(784 * images)
        ),
    )


def native_call(
    target: str, request: pb.PredictRequest, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str | None]:
    """The status and the x-request-id of one native Predict."""
    with grpc.insecure_channel(target) as channel:
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        try:
            _, call = stub.Predict.with_call(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code(), trailing_request_id(error.trailing_metadata())
        return grpc.StatusCode.OK, trailing_request_id(call.trailing_metadata())


def trailing_request_id(metadata: Any) -> str | None:
    values = [value for key, value in metadata or () if key == "x-request-id"]
    assert len(values) <= 1, metadata
    return values[0] if values else None


def http_call(url: str, body: Any | None, headers: dict[str, str]) -> tuple[int, str | None]:
    """The status and the X-Request-Id of one HTTP call (POST when there is a body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers.get("X-Request-Id")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("X-Request-Id")


def access_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(check: Callable[[], bool], what: str) -> None:
    """Until `check()` holds; fails after WAIT_SECONDS (the log is written off the call)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines_until(path: Path, request_id: str) -> list[dict[str, Any]]:
    """The access log once the line of `request_id` is in it: lines are written in order,
    so every call answered before that one has its line by then."""
    wait_for(
        lambda: any(line["request_id"] == request_id for line in access_lines(path)),
        f"the access log line of {request_id}",
    )
    return access_lines(path)


@pytest.fixture(scope="module")
def logged(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    """A server writing every call to its access log."""
    path = tmp_path_factory.mktemp("access") / "access.jsonl"
    server = ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0",
        "--access-log", str(path),
        "--access-log-sample-rate", "1",
    )  # fmt: skip
    yield server, path
    assert server.stop() == 0, server.log


# --- request IDs -------------------------------------------------------------------------


def test_grpc_answers_carry_the_callers_request_id_or_a_new_one(
    logged: tuple[ServerProcess, Path],
) -> None:
    target = logged[0].target
    assert native_call(target, native_request(), (("x-request-id", "order-17/a"),)) == (
        grpc.StatusCode.OK,
        "order-17/a",
    )
    code, generated = native_call(target, native_request())
    assert code == grpc.StatusCode.OK
    assert generated is not None
    assert GENERATED.fullmatch(generated)
    code, again = native_call(target, native_request())
    assert again != generated


def test_grpc_errors_carry_the_request_id(logged: tuple[ServerProcess, Path]) -> None:
    target = logged[0].target
    missing_version = native_request(version=99)
    assert native_call(target, missing_version, (("x-request-id", "lost-1"),)) == (
        grpc.StatusCode.NOT_FOUND,
        "lost-1",
    )
    code, generated = native_call(target, missing_version)
    assert code == grpc.StatusCode.NOT_FOUND
    assert generated is not None
    assert GENERATED.fullmatch(generated)
    # Refused by the call path itself (a priority that is not a class).
    assert native_call(
        target, native_request(), (("x-request-id", "prio-1"), ("mnist-priority", "urgent"))
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "prio-1")


@pytest.mark.parametrize("value", ["x" * 129, ""])
def test_a_request_id_that_is_not_printable_ascii_up_to_128_is_replaced(
    logged: tuple[ServerProcess, Path], value: str
) -> None:
    code, request_id = native_call(logged[0].target, native_request(), (("x-request-id", value),))
    assert code == grpc.StatusCode.OK
    assert request_id is not None
    assert GENERATED.fullmatch(request_id)


@pytest.mark.parametrize("value", ["caf\u00e9", "tab\there", "y" * 200])
def test_an_http_request_id_that_is_not_printable_ascii_up_to_128_is_replaced(
    logged: tuple[ServerProcess, Path], value: str
) -> None:
    status, request_id = http_call(
        logged[0].http_url + "/v2/models/mnist", None, {"X-Request-Id": value}
    )
    assert status == 200
    assert request_id is not None
    assert GENERATED.fullmatch(request_id)


def test_the_longest_request_id_is_kept(logged: tuple[ServerProcess, Path]) -> None:
    longest = "~" * 64 + "A" * 64
    assert native_call(logged[0].target, native_request(), (("x-request-id", longest),)) == (
        grpc.StatusCode.OK,
        longest,
    )


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/models/mnist:predict", {"instances": [[0] * 784]}, 200),
        ("/v1/models/mnist:predict", {"instances": [[0] * 3]}, 400),
        ("/v2/models/mnist/infer", {"inputs": [{"name": "images", "shape": [1, 784],
                                                "datatype": "UINT8", "data": [0] * 784}]}, 200),
        ("/v2/models/nope/infer", {"inputs": []}, 404),
        ("/v2/models/mnist", None, 200),
        ("/v1/models/mnist/versions/42", None, 404),
    ],
)  # fmt: skip
def test_http_answers_and_errors_carry_the_request_id(
    logged: tuple[ServerProcess, Path], path: str, body: Any, status: int
) -> None:
    url = logged[0].http_url + path
    assert http_call(url, body, {"X-Request-Id": "http-" + str(status)}) == (
        status,
        "http-" + str(status),
    )
    answered, generated = http_call(url, body, {})
    assert answered == status
    assert generated is not None
    assert GENERATED.fullmatch(generated)


def test_the_client_library_exposes_the_request_id_of_answers_and_errors(
    logged: tuple[ServerProcess, Path],
) -> None:
    images = np.zeros((5, 28, 28), np.uint8)
    with MnistClient(logged[0].target, max_images_per_request=2) as client:
        mine = client.predict(images[:1], request_id="lib-1")
        assert mine.request_id == "lib-1"
        assert mine.request_ids == ("lib-1",)
        split = client.predict(images)  # three RPCs, three IDs
        assert len(split.request_ids) == 3
        assert all(GENERATED.fullmatch(i) for i in split.request_ids)
        assert len(set(split.request_ids)) == 3
        with pytest.raises(NotFound) as refused:
            client.predict(images[:1], model_version=99, request_id="lib-err")
        assert refused.value.request_id == "lib-err"
        with pytest.raises(NotFound) as generated:
            client.predict(images[:1], model_version=99)
        assert generated.value.request_id is not None
        assert GENERATED.fullmatch(generated.value.request_id)


async def test_the_async_client_exposes_the_request_id_of_answers_and_errors(
    logged: tuple[ServerProcess, Path],
) -> None:
    images = np.zeros((3, 784), np.uint8)
    async with AsyncMnistClient(logged[0].target, max_images_per_request=2) as client:
        answer = await client.predict(images, request_id="aio-1")
        assert answer.request_ids == ("aio-1", "aio-1")  # one ID for every part
        generated = await client.predict(images[:1])
        assert generated.request_id is not None
        assert GENERATED.fullmatch(generated.request_id)
        with pytest.raises(NotFound) as refused:
            await client.predict(images[:1], model_version=99, request_id="aio-err")
        assert refused.value.request_id == "aio-err"


def test_log_lines_about_a_call_carry_its_request_id(logged: tuple[ServerProcess, Path]) -> None:
    server = logged[0]
    with grpc.insecure_channel(server.target) as channel:
        predict = channel.unary_unary(
            "/mnist.v1.MnistService/Predict",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as refused:
            predict(b"\xff\xff not a message", metadata=(("x-request-id", "garbled-7"),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def logged_line() -> bool:
        return any(
            "undecodable request" in line and "request_id=garbled-7" in line
            for line in server.log_lines
        )

    wait_for(logged_line, "the log line about the undecodable request")
    # Lines logged outside any call carry none.
    serving = next(line for line in server.log_lines if " msg=serving " in line)
    assert "request_id=" not in serving


# --- the access log ----------------------------------------------------------------------


def test_the_access_log_has_one_line_per_call_with_its_fields(
    logged: tuple[ServerProcess, Path],
) -> None:
    server, path = logged
    target, base = server.target, server.http_url
    native_call(target, native_request(3), (("x-request-id", "log-native"),))
    native_call(
        target,
        native_request(),
        (("x-request-id", "log-batch"), ("mnist-priority", "batch"), ("traceparent", TRACEPARENT)),
    )
    native_call(target, native_request(version=99), (("x-request-id", "log-missing"),))
    http_call(
        base + "/v1/models/mnist:predict",
        {"instances": [[0] * 784] * 2},
        {"X-Request-Id": "log-rest", "traceparent": TRACEPARENT},
    )
    http_call(base + "/v2/models/nope/infer", {"inputs": []}, {"X-Request-Id": "log-rest-404"})
    triton = triton_grpc.InferenceServerClient(target)
    images = triton_grpc.InferInput("images", [1, 784], "UINT8")
    images.set_data_from_numpy(np.zeros((1, 784), np.uint8))
    triton.infer("mnist", [images], headers={"x-request-id": "log-triton"})
    triton_rest = triton_http.InferenceServerClient(base.removeprefix("http://"))
    rest_images = triton_http.InferInput("images", [1, 784], "UINT8")
    rest_images.set_data_from_numpy(np.zeros((1, 784), np.uint8))
    triton_rest.infer("mnist", [rest_images], headers={"X-Request-Id": "log-triton-rest"})
    native_call(target, native_request(), (("x-request-id", "log-last"),))

    lines = lines_until(path, "log-last")
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_id.setdefault(line["request_id"], []).append(line)
    ours = [
        "log-native", "log-batch", "log-missing", "log-rest", "log-rest-404", "log-triton",
        "log-triton-rest", "log-last",
    ]  # fmt: skip
    assert {i: len(by_id.get(i, ())) for i in ours} == dict.fromkeys(ours, 1)
    native = by_id["log-native"][0]
    assert set(native) == {
        "time", "request_id", "caller", "api", "method", "status", "duration_ms", "images",
        "model_version", "priority", "trace_id", "peer",
    }  # fmt: skip
    assert native["api"] == "native"
    assert native["method"] == "Predict"
    assert native["status"] == "OK"
    assert native["images"] == 3
    assert native["model_version"] == 1
    assert native["priority"] == "online"
    assert native["caller"] == "anonymous"
    assert native["trace_id"] == ""
    assert "127.0.0.1" in native["peer"]
    assert native["duration_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", native["time"])
    batch = by_id["log-batch"][0]
    assert (batch["priority"], batch["trace_id"]) == ("batch", TRACE_ID)
    missing = by_id["log-missing"][0]
    assert (missing["status"], missing["model_version"]) == ("NOT_FOUND", 0)
    rest = by_id["log-rest"][0]
    assert (rest["api"], rest["method"], rest["status"], rest["http_status"]) == (
        "tfserving_rest", "Predict", "OK", 200,
    )  # fmt: skip
    assert (rest["images"], rest["trace_id"]) == (2, TRACE_ID)
    assert rest["peer"] == "127.0.0.1"
    not_found = by_id["log-rest-404"][0]
    assert (not_found["api"], not_found["status"], not_found["http_status"]) == (
        "v2_rest", "NOT_FOUND", 404,
    )  # fmt: skip
    assert (by_id["log-triton"][0]["api"], by_id["log-triton"][0]["method"]) == (
        "v2",
        "ModelInfer",
    )
    assert by_id["log-triton-rest"][0]["api"] == "v2_rest"


def test_at_sample_rate_0_the_access_log_stays_empty(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--access-log", str(path),
        "--access-log-sample-rate", "0",
    )  # fmt: skip
    with server:
        for _ in range(5):
            assert native_call(server.target, native_request())[0] == grpc.StatusCode.OK
        assert http_call(server.http_url + "/v2/models/mnist", None, {})[0] == 200
    # Stopped: the writer wrote everything it was given before the process ended.
    assert server.process.returncode == 0, server.log
    assert path.exists()
    assert access_lines(path) == []


def test_a_writer_that_cannot_keep_up_drops_lines_and_counts_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The log is a pipe nobody reads yet: the writer is stuck opening it, its queue (2
    lines) fills, and every further line is dropped and counted, the calls unharmed."""
    fifo = tmp_path / "access.pipe"
    os.mkfifo(fifo)
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--access-log", str(fifo),
        "--access-log-queue-size", "2",
    )  # fmt: skip
    with server:
        calls = 10
        for index in range(calls):
            code, _ = native_call(
                server.target, native_request(), (("x-request-id", f"q-{index}"),)
            )
            assert code == grpc.StatusCode.OK
        dropped = server.scrape()[("mnist_access_log_dropped_total", ())]
        assert dropped == calls - 2
        # A reader at last: the two queued lines come through, the first two calls'.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            text = b""
            deadline = time.monotonic() + WAIT_SECONDS
            while text.count(b"\n") < 2 and time.monotonic() < deadline:
                select.select([reader], [], [], 1.0)
                try:
                    text += os.read(reader, 65536)
                except BlockingIOError:
                    continue
        finally:
            os.close(reader)
    assert [json.loads(line)["request_id"] for line in text.splitlines()] == ["q-0", "q-1"]
