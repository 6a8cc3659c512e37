"""The blocking client: `MnistClient(target).predict(images)`.

Retries are gRPC's own (a retryPolicy in the channel's service config): exponential backoff
with full jitter, within the call's deadline, only for UNAVAILABLE and RESOURCE_EXHAUSTED.
Predict is idempotent, so resending it is safe; health checks are never retried so that a
probe reports what it sees. Given several targets ("a:8500,b:8500"), a client keeps
channels to each and sends a call that failed on one to another (see routing.py).

Keepalive pings find a dead server even when nothing tells the client so (a partition:
no RST): by default a connection is dropped within 15 s of its last sign of life.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2, predict_pb2_grpc

from .codec import PIXELS, Prediction, as_batch, decode_prediction, encode_images
from .errors import REQUEST_ID_METADATA, MnistError, from_rpc_error, request_id_in
from .feedback import (
    MAX_FEEDBACK_LABELS,
    FeedbackLabel,
    FeedbackResult,
    feedback_requests,
    partial_failure,
)
from .metadata import ModelMetadata
from .routing import Router, split_targets
from .tracing import trace_metadata

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

SERVICE_NAME = "mnist.v1.MnistService"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_IMAGES_PER_REQUEST = 1024
# gRPC clamps maxAttempts to 5 (the first try and four retries).
MAX_ATTEMPTS_LIMIT = 5
_MIB = 1 << 20

# The server's two priority classes. "online" (the server's default when a call declares
# none) is for callers waiting on the answer; "batch" for bulk jobs, which the server runs
# in chunks behind online calls, in a queue of its own. A call declares its class in this
# metadata key.
Priority = Literal["online", "batch"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
ONLINE: Priority = "online"
BATCH: Priority = "batch"
PRIORITY_METADATA = "mnist-priority"
# An API key's token travels as `authorization: Bearer <token>` (server/auth.py).
AUTHORIZATION_METADATA = "authorization"


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE and RESOURCE_EXHAUSTED: attempt n waits a random time in
    [0, min(initial_backoff * backoff_multiplier ** (n - 1), max_backoff)] seconds."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be 1..{MAX_ATTEMPTS_LIMIT} (gRPC's limit)")
        if min(self.initial_backoff, self.max_backoff) <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoff times and multiplier must be positive")

    def service_config(self) -> dict[str, Any]:
        if self.max_attempts == 1:
            return {}
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff:.9f}s",
            "maxBackoff": f"{self.max_backoff:.9f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        }
        return {"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": policy}]}


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Keepalive:
    """Ping a connection after `time` seconds without a sign of life from the server, calls
    in flight or not, and drop it when no answer comes within `timeout`: a server that
    vanished without a word (a partition, a host powered off) is found within `time +
    timeout` seconds, and its calls fail UNAVAILABLE instead of waiting for their deadline.
    The server must permit pings that often (its --min-ping-interval, 5 s by default), or it
    answers GOAWAY too_many_pings."""

    time: float = 10.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if min(self.time, self.timeout) <= 0:
            raise ValueError("keepalive time and timeout must be positive")

    @property
    def bound(self) -> float:
        """Seconds after its last sign of life within which a dead peer is detected."""
        return self.time + self.timeout

    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", int(self.time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # 0: keep pinging however long no data has been sent (gRPC's default stops at 2).
            ("grpc.http2.max_pings_without_data", 0),
        ]


DEFAULT_KEEPALIVE = Keepalive()


def channel_options(
    max_images_per_request: int,
    retry: RetryPolicy,
    extra: Sequence[tuple[str, Any]] = (),
    load_balancing: str | None = None,
    keepalive: Keepalive | None = DEFAULT_KEEPALIVE,
) -> list[tuple[str, Any]]:
    # A float32 batch is 3136 bytes per image; gRPC's 4 MiB default receive limit stops at
    # ~1300 images. The retry buffer must hold a whole request or gRPC silently stops
    # retrying it.
    largest = max(64 * _MIB, max_images_per_request * PIXELS * 4 + _MIB)
    service_config = retry.service_config()
    if load_balancing:
        # e.g. "round_robin" over every address a dns:/// name resolves to.
        service_config["loadBalancingConfig"] = [{load_balancing: {}}]
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", largest),
        ("grpc.max_receive_message_length", largest),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", largest),
        ("grpc.service_config", json.dumps(service_config)),
    ]
    if keepalive is not None:
        options += keepalive.options()
    return options + list(extra)


def connection_options(
    options: list[tuple[str, Any]], connections: int
) -> list[list[tuple[str, Any]]]:
    """One option list per channel. Channels to one target with the same options share
    one TCP connection; a subchannel pool of its own gives each channel its own. Behind a
    server with several workers, each connection may land on another worker."""
    if connections == 1:
        return [options]
    return [[*options, ("grpc.use_local_subchannel_pool", 1)] for _ in range(connections)]


def predict_request(
    batch: npt.NDArray[np.uint8] | npt.NDArray[np.float32], model_name: str, version: int
) -> predict_pb2.PredictRequest:
    return predict_pb2.PredictRequest(
        model_spec=predict_pb2.ModelSpec(name=model_name, version=version),
        images=encode_images(batch),
    )


def answered_by(prediction: Prediction, trailing_metadata: object) -> Prediction:
    """`prediction` with the request ID its RPC's trailing metadata carried, if any."""
    request_id = request_id_in(trailing_metadata)
    if request_id is None:
        return prediction
    return dataclasses.replace(prediction, request_ids=(request_id,), part_sizes=(len(prediction),))


def tls_credentials(
    ca_cert: Path | bytes | None = None,
    client_cert: Path | bytes | None = None,
    client_key: Path | bytes | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: trust `ca_cert` (PEM; the system's roots when None) and, for a server
    that requires client certificates (mutual TLS), present `client_cert` with its key."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    def pem(value: Path | bytes | None) -> bytes | None:
        return value.read_bytes() if isinstance(value, Path) else value

    return grpc.ssl_channel_credentials(
        root_certificates=pem(ca_cert),
        private_key=pem(client_key),
        certificate_chain=pem(client_cert),
    )


def status_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def check_priority(priority: str | None) -> Priority | None:
    """`priority` if it names a class (or is None: declare none); ValueError otherwise."""
    if priority is None:
        return None
    for known in PRIORITIES:
        if priority == known:
            return known
    raise ValueError(
        f"priority must be one of {', '.join(map(repr, PRIORITIES))} or None, got {priority!r}"
    )


def check_settings(timeout: float | None, max_images_per_request: int, connections: int) -> None:
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be positive (or None for no deadline)")
    if max_images_per_request < 1:
        raise ValueError("max_images_per_request must be at least 1")
    if connections < 1:
        raise ValueError("connections must be at least 1")


def authorization(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries an API key's token (none without one). Per-call metadata,
    not grpc call credentials: those are only ever sent over TLS."""
    if token is None:
        return ()
    token = token.strip()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("token must be one word of printable ASCII (an mnist-serve API key)")
    return ((AUTHORIZATION_METADATA, f"Bearer {token}"),)


class ClientSettings:
    """What both clients take and keep; each opens its own kind of channels in _connect.

    `target` is one server ("host:port", or a name gRPC resolves: "dns:///name:port") or
    several ("a:8500,b:8500", or a sequence): then each call goes to one of them and is
    re-sent to another when its server fails it (see routing.py).
    `connections` > 1 opens that many channels (TCP connections) per target and sends the
    calls round-robin over them: the way to use every worker of a server run with --workers.
    `priority` ("online", "batch" or None: declare none, which the server takes as online)
    is sent with every predict and metadata call unless a predict call names its own.
    `token` (a server's API key, `mnist-serve keys add`) is sent as `authorization: Bearer
    <token>` metadata on every call, over TLS or plaintext alike.
    `keepalive` (None: gRPC's default, no pings) bounds how long a dead server goes unseen.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_images_per_request: int = DEFAULT_MAX_IMAGES_PER_REQUEST,
        retry: RetryPolicy = DEFAULT_RETRY,
        model_name: str = "",
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 1,
        load_balancing: str | None = None,
        priority: Priority | None = None,
        token: str | None = None,
        keepalive: Keepalive | None = DEFAULT_KEEPALIVE,
    ) -> None:
        check_settings(timeout, max_images_per_request, connections)
        self.priority = check_priority(priority)
        self._authorization = authorization(token)
        self.targets = split_targets(target)
        self.target = ",".join(self.targets)
        self.timeout = timeout
        self.max_images_per_request = max_images_per_request
        self.model_name = model_name
        self.wait_for_ready = wait_for_ready
        opts = channel_options(max_images_per_request, retry, options, load_balancing, keepalive)
        self._turn = itertools.count()
        self._router = Router(len(self.targets))
        self._connect(self.targets, credentials, connection_options(opts, connections))

    def _connect(
        self,
        targets: tuple[str, ...],
        credentials: grpc.ChannelCredentials | None,
        options: list[list[tuple[str, Any]]],
    ) -> None:
        raise NotImplementedError

    def _next(self, stubs: list[T]) -> T:
        """The stub of the next connection, round-robin (itertools.count is thread-safe)."""
        return stubs[next(self._turn) % len(stubs)]

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _metadata(
        self, priority: Priority | None = None, request_id: str | None = None
    ) -> tuple[tuple[str, str], ...] | None:
        """The call's metadata: its priority class (`priority`, else the client's), its
        request ID, and the current trace context (with OpenTelemetry), if any."""
        declared = check_priority(priority) or self.priority
        metadata: tuple[tuple[str, str], ...] = self._authorization + (
            () if declared is None else ((PRIORITY_METADATA, declared),)
        )
        if request_id is not None:
            metadata += ((REQUEST_ID_METADATA, request_id),)
        return metadata + trace_metadata() or None


class MnistClient(ClientSettings):
    """A blocking client of `mnist.v1.MnistService`; thread-safe, one channel (or
    `connections` channels).

    `timeout` is each RPC's deadline in seconds, retries included (a big `predict` makes one
    RPC per `max_images_per_request` images). `credentials` selects TLS: `tls_credentials(
    ca_cert, client_cert, client_key)` (the last two for a server that requires client
    certificates), or any grpc.ChannelCredentials. `priority` declares the calls' class:
    "batch" for bulk jobs, "online" (or None, the server's default) for callers waiting on
    the answer. Use as a context manager, or `close()`.
    """

    def _connect(
        self,
        targets: tuple[str, ...],
        credentials: grpc.ChannelCredentials | None,
        options: list[list[tuple[str, Any]]],
    ) -> None:
        def channel(target: str, option: list[tuple[str, Any]]) -> grpc.Channel:
            if credentials is None:
                return grpc.insecure_channel(target, options=option)
            return grpc.secure_channel(target, credentials, options=option)

        per_target = [[channel(t, o) for o in options] for t in targets]
        self._channels = [c for channels in per_target for c in channels]
        self._stubs = [[predict_pb2_grpc.MnistServiceStub(c) for c in cs] for cs in per_target]
        self._healths = [[health_pb2_grpc.HealthStub(c) for c in cs] for cs in per_target]

    def _call(self, attempt: Callable[[int, float | None], R], timeout: float | None) -> R:
        """`attempt(target index, its deadline)` on one target after another (routing.py)
        until one answers; raises the last error."""
        error: MnistError | None = None
        for planned in self._router.attempts(self._timeout(timeout)):
            started = self._router.started(planned.index)
            try:
                result = attempt(planned.index, planned.timeout)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if self._router.finished(planned.index, started, error) and not planned.last:
                    logger.debug(
                        "%s: %s; trying another target", self.targets[planned.index], error
                    )
                    continue
                raise error from rpc_error
            except BaseException:
                self._router.abandoned(planned.index)
                raise
            self._router.finished(planned.index, started, None)
            return result
        if error is None:
            raise AssertionError("a call makes at least one attempt")
        raise error

    def predict(
        self,
        images: npt.ArrayLike,
        *,
        model_version: int = 0,
        timeout: float | None = None,
        priority: Priority | None = None,
        request_id: str | None = None,
    ) -> Prediction:
        """Classify images (see `as_batch` for accepted shapes and dtypes), in input order.

        `model_version` 0 means the newest version; the parts of a split call are all pinned
        to the version that answered the first part, so one call never mixes versions.
        `priority` declares this call's class instead of the client's. `request_id` is sent
        as x-request-id (else the server makes one); the answer's `request_ids` say which.
        """
        batch = as_batch(images)
        metadata = self._metadata(priority, request_id)
        parts: list[Prediction] = []
        version = model_version
        for start in range(0, len(batch), self.max_images_per_request):
            chunk = batch[start : start + self.max_images_per_request]
            request = predict_request(chunk, self.model_name, version)

            def attempt(
                index: int,
                deadline: float | None,
                request: predict_pb2.PredictRequest = request,
            ) -> tuple[predict_pb2.PredictResponse, grpc.Call]:
                return self._next(self._stubs[index]).Predict.with_call(  # type: ignore[no-any-return]
                    request,
                    timeout=deadline,
                    metadata=metadata,
                    wait_for_ready=self.wait_for_ready,
                )

            response, call = self._call(attempt, timeout)
            parts.append(
                answered_by(decode_prediction(response, len(chunk)), call.trailing_metadata())
            )
            version = version or parts[-1].model_version
        return Prediction.concatenate(parts)

    def feedback(
        self,
        labels: Iterable[FeedbackLabel],
        *,
        timeout: float | None = None,
        chunk_size: int = MAX_FEEDBACK_LABELS,
    ) -> FeedbackResult:
        """Send the true label of earlier predictions: (request_id, index, label) each, where
        `request_id` is one of a Prediction's `request_ids` and `index` the image's position
        in that call. Sent in calls of at most `chunk_size` (the server's limit, 10,000);
        the answers are summed. A bad label raises InvalidInput before its chunk is sent; a
        failed call raises, saying what the chunks before it did."""
        total = FeedbackResult()
        try:
            for offset, request in feedback_requests(labels, chunk_size):
                response = self._unary(lambda stub: stub.Feedback, request, timeout)
                total += FeedbackResult.from_proto(response, offset)
        except grpc.RpcError as error:
            raise partial_failure(from_rpc_error(error), total) from error
        except MnistError as error:
            raise partial_failure(error, total) from None
        return total

    def metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        request = predict_pb2.GetModelMetadataRequest(name=self.model_name)
        response = self._unary(lambda stub: stub.GetModelMetadata, request, timeout)
        return ModelMetadata.from_proto(response)

    def _unary(
        self, method: Callable[[predict_pb2_grpc.MnistServiceStub], Any], request: Any,
        timeout: float | None,
    ) -> Any:  # fmt: skip
        """One unary MnistService call with the client's metadata (no per-call class or
        request ID), routed and retried like every call: `method` picks it from a stub."""
        return self._call(
            lambda index, deadline: method(self._next(self._stubs[index]))(
                request,
                timeout=deadline,
                metadata=self._metadata(),
                wait_for_ready=self.wait_for_ready,
            ),
            timeout,
        )

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        """The serving status of `service` ("" = the whole server): "SERVING",
        "NOT_SERVING", ... Raises Unavailable when the server cannot be reached. With
        several targets: the status of the first that answers."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(
            lambda index, deadline: self._next(self._healths[index]).Check(
                request, timeout=deadline
            ),
            timeout,
        )
        return status_name(response.status)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> MnistClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
