"""A real gRPC server for client tests: MnistService answered by numpy, plus health.

No TensorFlow and no model: the "prediction" is a deterministic function of the pixels
(`expected`), so tests can check order and reassembly exactly. Failures are injected per
call (`fail_next`) and every attempt is recorded (`calls`, with the priority class its
metadata declared), which is how retry tests count.

Like the real server, every Predict answer carries a request ID (the caller's x-request-id,
else a new one) in its trailing metadata, and Feedback joins (request_id, index, label) to
the predictions it made, by the contract of protos/mnist/v1/predict.proto (at most 10,000
labels a call; label 0..9 and a request ID, else INVALID_ARGUMENT).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2, predict_pb2_grpc

SERVICE_NAME = "mnist.v1.MnistService"
PRIORITY_METADATA = "mnist-priority"  # the server's key (server/call_context.py)
REQUEST_ID_METADATA = "x-request-id"
MAX_FEEDBACK_LABELS = 10_000
VERSIONS = (2, 1)  # newest first


def expected(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the fake answers: class = (sum of 0..255 pixels) mod 10, with probability 0.91."""
    pixels = images.reshape(len(images), -1)
    if pixels.dtype != np.uint8:
        pixels = np.rint(pixels.astype(np.float64) * 255)
    classes = (pixels.astype(np.int64).sum(axis=1) % 10).astype(np.int64)
    probabilities = np.full((len(images), 10), 0.01, np.float32)
    probabilities[np.arange(len(images)), classes] = 0.91
    return probabilities, classes


@dataclass
class Call:
    method: str
    images: int
    version: int
    model: str
    priority: str | None = None  # the mnist-priority metadata value; None: not sent


@dataclass
class FakeMnistService(predict_pb2_grpc.MnistServiceServicer):  # type: ignore[misc]
    max_images_per_request: int = 4096
    delay: float = 0.0
    send_request_ids: bool = True  # False: a server from before request IDs
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0  # the most Predict calls handled at once
    # (request_id, index) -> the class predicted; and those that got a label, with it.
    predicted: dict[tuple[str, int], int] = field(default_factory=dict)
    labelled: dict[tuple[str, int], int] = field(default_factory=dict)
    feedback_sizes: list[int] = field(default_factory=list)  # labels per Feedback call
    _failures: deque[tuple[grpc.StatusCode, str]] = field(default_factory=deque)
    _failing_method: str = "Predict"
    _let_through: int = 0
    _next_id: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(
        self,
        code: grpc.StatusCode,
        times: int = 1,
        details: str = "",
        after: int = 0,
        method: str = "Predict",
    ) -> None:
        """Let `after` calls of `method` through, then fail `times` of them with `code`."""
        with self._lock:
            self._let_through = after
            self._failing_method = method
            for _ in range(times):
                self._failures.append((code, details or f"injected {code.name}"))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def predict_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == "Predict"]

    def _enter(self, context: grpc.ServicerContext, call: Call) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == PRIORITY_METADATA:
                call.priority = str(value)
        with self._lock:
            self.calls.append(call)
            failure = None
            if call.method == self._failing_method and self._failures:
                if self._let_through:
                    self._let_through -= 1
                else:
                    failure = self._failures.popleft()
        if failure is not None:
            context.abort(*failure)
        if call.model not in ("", "mnist"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {call.model!r} is not served")
        if call.version and call.version not in VERSIONS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {call.version} is not loaded")

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        tensor = request.images
        shape = tuple(tensor.shape)
        self._enter(
            context,
            Call(
                "Predict",
                shape[0] if shape else 0,
                request.model_spec.version,
                request.model_spec.name,
            ),
        )
        dtype = {predict_pb2.DATA_TYPE_UINT8: "u1", predict_pb2.DATA_TYPE_FLOAT32: "<f4"}.get(
            tensor.dtype
        )
        if dtype is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "images dtype must be uint8/float32")
        if len(shape) not in (2, 3) or shape[1:] not in ((28, 28), (784,)) or shape[0] < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad images shape {list(shape)}")
        if shape[0] > self.max_images_per_request:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{shape[0]} images exceed max_images_per_request {self.max_images_per_request}",
            )
        if len(tensor.content) != np.dtype(dtype).itemsize * int(np.prod(shape)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "content size does not match shape")
        images = np.frombuffer(tensor.content, dtype).reshape(shape)
        if dtype == "<f4" and (images.min() < 0 or images.max() > 1):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "float pixels must be in [0, 1]")
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            probabilities, classes = expected(images)
        finally:
            with self._lock:
                self.in_flight -= 1
        if self.send_request_ids:
            request_id = self._request_id(context)
            with self._lock:
                for index, klass in enumerate(classes.tolist()):
                    self.predicted[(request_id, index)] = klass
            context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
        return predict_pb2.PredictResponse(
            model_spec=predict_pb2.ModelSpec(
                name="mnist", version=request.model_spec.version or VERSIONS[0]
            ),
            probabilities=predict_pb2.Tensor(
                dtype=predict_pb2.DATA_TYPE_FLOAT32,
                shape=probabilities.shape,
                content=probabilities.astype("<f4").tobytes(),
            ),
            classes=predict_pb2.Tensor(
                dtype=predict_pb2.DATA_TYPE_INT64,
                shape=classes.shape,
                content=classes.astype("<i8").tobytes(),
            ),
        )

    def _request_id(self, context: grpc.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_METADATA and 1 <= len(str(value)) <= 128:
                return str(value)
        with self._lock:
            self._next_id += 1
            return f"fake-{self._next_id:08d}"

    def Feedback(
        self, request: predict_pb2.FeedbackRequest, context: grpc.ServicerContext
    ) -> predict_pb2.FeedbackResponse:
        self._enter(context, Call("Feedback", len(request.labels), 0, ""))
        if len(request.labels) > MAX_FEEDBACK_LABELS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.labels)} labels exceed the limit of {MAX_FEEDBACK_LABELS} a call",
            )
        for position, label in enumerate(request.labels):
            if not label.request_id:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"labels[{position}]: empty request_id"
                )
            if not 0 <= label.label <= 9:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"labels[{position}]: label {label.label} is not 0..9",
                )
        accepted = duplicate = 0
        unknown: list[int] = []
        with self._lock:
            self.feedback_sizes.append(len(request.labels))
            for position, label in enumerate(request.labels):
                key = (label.request_id, label.index)
                if key not in self.predicted:
                    unknown.append(position)
                elif key in self.labelled:
                    duplicate += 1
                else:
                    self.labelled[key] = label.label
                    accepted += 1
        return predict_pb2.FeedbackResponse(
            accepted=accepted,
            unknown=len(unknown),
            duplicate=duplicate,
            unknown_indices=unknown,
        )

    def GetModelMetadata(
        self, request: predict_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> predict_pb2.GetModelMetadataResponse:
        self._enter(context, Call("GetModelMetadata", 0, 0, request.name))
        return predict_pb2.GetModelMetadataResponse(
            name="mnist",
            versions=[
                predict_pb2.VersionInfo(
                    version=v, test_accuracy=0.9 + v / 100, test_loss=0.3, architecture="fake"
                )
                for v in VERSIONS
            ],
            inputs=[
                predict_pb2.TensorSpec(
                    name="images", dtype=predict_pb2.DATA_TYPE_UINT8, shape=[-1, 28, 28]
                )
            ],
            outputs=[
                predict_pb2.TensorSpec(
                    name="probabilities", dtype=predict_pb2.DATA_TYPE_FLOAT32, shape=[-1, 10]
                ),
                predict_pb2.TensorSpec(
                    name="classes", dtype=predict_pb2.DATA_TYPE_INT64, shape=[-1]
                ),
            ],
            class_labels=[str(i) for i in range(10)],
            max_images_per_request=self.max_images_per_request,
        )


@dataclass
class FakeServer:
    target: str
    service: FakeMnistService
    health: health.HealthServicer
    server: grpc.Server

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)


@contextmanager
def running_fake_server(**service_options: object) -> Iterator[FakeServer]:
    """Start the fake on a free loopback port; stop it (no grace) on exit."""
    service = FakeMnistService(**service_options)  # type: ignore[arg-type]
    limit = 64 << 20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    predict_pb2_grpc.add_MnistServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake = FakeServer(f"127.0.0.1:{port}", service, health_servicer, server)
    fake.set_serving(True)
    try:
        yield fake
    finally:
        server.stop(grace=None)


def free_port() -> int:
    """A loopback port with nothing listening (for unreachable-server tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
