"""Limits at the door, against the real server process and raw sockets: a body declared too
large is refused before it is sent, slow headers and bodies are cut off, connections beyond
the cap are refused, and floods of idle connections leave both ports serving.

Every test orders things by events (an answer read, a metric changed, a connection closed by
the server); socket timeouts are only safety nets for a server that never answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.fds import connection_cap

from .support import ServerProcess, scrape

PREDICT = "/v1/models/mnist:predict"
SAFETY_NET = 120.0  # seconds: only a server that never answers runs into it
ONE = json.dumps({"instances": np.zeros((1, 28, 28), dtype=int).tolist()}).encode()


def head(path: str = PREDICT, length: int | None = None, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(server: ServerProcess, port: int | None = None) -> socket.socket:
    sock = socket.create_connection((server.host, port or server.http_port))
    sock.settimeout(SAFETY_NET)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def status_and_body(answer: bytes) -> tuple[int, dict[str, Any]]:
    header, _, body = answer.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(body)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, f"gave up waiting for {what}"
        time.sleep(0.01)


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    return scrape(server).get((name, tuple(sorted(labels.items()))), 0.0)


def http_ok(server: ServerProcess) -> bool:
    request = urllib.request.Request(server.http_url + PREDICT, data=ONE, method="POST")
    with urllib.request.urlopen(request, timeout=SAFETY_NET) as answer:
        return bool(answer.status == 200)


def grpc_ok(server: ServerProcess) -> bool:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes())
    with grpc.insecure_channel(
        server.target, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        answer = stub.Predict(pb.PredictRequest(images=tensor), timeout=SAFETY_NET)
    return tuple(answer.classes.shape) == (2,)


@pytest.fixture(scope="module")
def door(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """A server with short HTTP timeouts (the limits under test), /metrics on its own port."""
    server = ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0", "--http-header-timeout", "1", "--http-body-timeout", "1",
        "--metrics-port", "0",
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(door: ServerProcess) -> None:
    before = metric(
        door, "mnist_requests_total", api="tfserving_rest", code="RESOURCE_EXHAUSTED",
        method="Predict", priority="online", caller="anonymous",
    )  # fmt: skip
    with connect(door) as sock:
        sock.sendall(head(length=1 << 30))  # 1 GiB declared; not a byte of it sent
        status, body = status_and_body(read_until_closed(sock))  # answered, then closed
    assert status == 413
    assert "exceeds" in body["error"]
    after = metric(
        door, "mnist_requests_total", api="tfserving_rest", code="RESOURCE_EXHAUSTED",
        method="Predict", priority="online", caller="anonymous",
    )  # fmt: skip
    assert after == before + 1
    assert http_ok(door)


@pytest.mark.parametrize("sends", ["nothing", "its headers a byte at a time"])
def test_a_connection_whose_headers_do_not_arrive_in_time_is_closed(
    door: ServerProcess, sends: str
) -> None:
    before = metric(door, "mnist_http_connections_closed_total", reason="header_timeout")
    closed = threading.Event()
    with connect(door) as sock:

        def trickle() -> None:  # one byte every 50 ms, for as long as the server listens
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Padding: ")
                while not closed.is_set():
                    sock.sendall(b"a")
                    closed.wait(0.05)

        sender = threading.Thread(target=trickle)
        if sends != "nothing":
            sender.start()
        try:
            with contextlib.suppress(ConnectionResetError):
                assert read_until_closed(sock) == b""  # closed by the server, no answer
        finally:
            closed.set()
            if sender.is_alive():
                sender.join()
    after = metric(door, "mnist_http_connections_closed_total", reason="header_timeout")
    assert after == before + 1
    assert http_ok(door)


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(
    door: ServerProcess,
) -> None:
    def counted() -> float:
        return metric(
            door, "mnist_requests_total", api="tfserving_rest", code="DEADLINE_EXCEEDED",
            method="Predict", priority="online", caller="anonymous",
        )  # fmt: skip

    before = counted()
    with connect(door) as sock:
        sock.sendall(head(length=len(ONE)) + ONE[:10])  # then nothing more
        status, body = status_and_body(read_until_closed(sock))
    assert status == 408
    assert "did not arrive" in body["error"]
    assert counted() == before + 1
    assert http_ok(door)


def test_connections_beyond_the_cap_are_refused_and_both_ports_keep_serving(
    tiny_model_dir: Path,
) -> None:
    with ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0", "--max-connections", "20", "--metrics-port", "0",
        "--http-header-timeout", "600",  # idle connections stay: only the cap is tested
    ) as server:  # fmt: skip
        idle = [connect(server) for _ in range(20)]
        try:
            wait_until(
                lambda: metric(server, "mnist_http_connections") == 20, "20 open connections"
            )
            with connect(server) as extra:
                status, body = status_and_body(read_until_closed(extra))
            assert status == 503
            assert "limit" in body["error"]
            assert metric(server, "mnist_http_connections_closed_total", reason="limit") == 1
            assert grpc_ok(server)  # the other port has its own cap
            idle.pop().close()
            wait_until(lambda: metric(server, "mnist_http_connections") == 19, "a free place")
            assert http_ok(server)
        finally:
            for sock in idle:
                sock.close()


@contextlib.contextmanager
def open_files_limit(soft: int) -> Iterator[None]:
    """This process's soft limit on open files, for as long as the block runs."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_each_port_gets_half_the_open_files_left_by_default() -> None:
    assert connection_cap(0, 1024) == 384  # (1024 - 256) / 2
    assert connection_cap(0, 20_000) == 9872
    assert connection_cap(0, 1 << 20) == 10_000  # the most by default
    assert connection_cap(384, 1024) == 384
    with pytest.raises(ValueError, match="ulimit"):
        connection_cap(385, 1024)


def test_a_cap_the_open_file_limit_cannot_hold_stops_start_up(tiny_model_dir: Path) -> None:
    with open_files_limit(1024):  # inherited by the server, which raises it to the hard limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        too_many = (hard - 256) // 2 + 1 if hard != resource.RLIM_INFINITY else 1 << 40
        process = subprocess.run(
            [
                sys.executable, "-m", "mnist_serving.server", "--model-dir", str(tiny_model_dir),
                "--port", "0", "--http-port", "0", "--max-connections", str(too_many),
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert process.returncode == 1, process.stderr[-2000:]
    assert "--max-connections" in process.stderr
    assert "Traceback" not in process.stderr


FLOOD = 2000


@pytest.mark.parametrize("port", ["gRPC", "HTTP"])
def test_an_idle_flood_leaves_both_ports_serving(tiny_model_dir: Path, port: str) -> None:
    # Started as many services are (systemd, Docker 25+): 1024 open files, a higher hard
    # limit. 2,000 idle connections used to take every descriptor the process had.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * FLOOD + 600:
        pytest.skip(f"the hard limit on open files ({hard}) is too low for the flood")
    with open_files_limit(1024):
        server = ServerProcess(
            tiny_model_dir, "--poll-interval", "0", "--http-header-timeout", "600"
        )
    pid = server.process.pid
    baseline = len(os.listdir(f"/proc/{pid}/fd"))
    flood: list[socket.socket] = []
    try:
        with open_files_limit(hard if hard != resource.RLIM_INFINITY else 1 << 16):
            target = server.port if port == "gRPC" else server.http_port
            flood = [connect(server, target) for _ in range(FLOOD)]
            wait_until(  # every one accepted and held by the server
                lambda: len(os.listdir(f"/proc/{pid}/fd")) >= baseline + FLOOD,
                f"the server to hold {FLOOD} connections",
            )
            assert grpc_ok(server)
            assert http_ok(server)
    finally:
        for sock in flood:
            sock.close()
        code = server.stop()
    assert code == 0, server.log[-3000:]
    assert "level=error" not in server.log, server.log[-3000:]


def test_2000_pipelined_bad_requests_each_get_400_and_the_server_keeps_serving(
    door: ServerProcess,
) -> None:
    bad = head(length=9) + b"{not json"
    count = 2000
    with connect(door) as sock:
        answers = b""

        def read() -> None:
            nonlocal answers
            while answers.count(b"HTTP/1.1 ") < count and (chunk := sock.recv(65536)):
                answers += chunk

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(bad * count)
        reader.join()
    assert answers.count(b"HTTP/1.1 400 ") == count
    assert http_ok(door)
