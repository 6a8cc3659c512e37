"""OpenTelemetry tracing against a real server process and a real OTLP/gRPC receiver that
the test runs (the opentelemetry-proto service definitions).

The server (--tracing, OTEL_EXPORTER_OTLP_ENDPOINT pointing at the receiver) makes a server
span per call whose parent is the caller's traceparent, a child span for the queue wait and
one for the model call; a model call that merges several requests links to each of their
server spans. The client library injects the caller's current span.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanContext

from mnist_serving.client import AsyncMnistClient
from mnist_serving.client.scoring.pipeline import score_async
from mnist_serving.client.tracing import attached, trace_metadata

from .support import ServerProcess

WAIT_SECONDS = 30.0
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CONCURRENT = 4


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on a free loopback port: keeps every span it gets."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict[str, str]] = []
        self._arrived = threading.Condition()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._arrived:
            for resource_spans in request.resource_spans:
                self.resources.append(
                    {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(
        self, check: Callable[[list[trace_pb2.Span]], bool], what: str
    ) -> list[trace_pb2.Span]:
        """The spans received, once `check` holds for them (woken by each export)."""
        deadline = time.monotonic() + WAIT_SECONDS
        with self._arrived:
            while not check(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.spans}")
                self._arrived.wait(left)
            return list(self.spans)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.stop(0)


@pytest.fixture(scope="module")
def traced(tiny_model_dir: Path, receiver: Receiver) -> Iterator[ServerProcess]:
    """A traced server whose model calls merge up to CONCURRENT single images, waiting up
    to a second for them."""
    server = ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0", "--tracing",
        "--max-batch-size", str(CONCURRENT), "--batch-timeout-ms", "1000",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "mnist-under-test",
        },
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log


def attributes(span: trace_pb2.Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value") or "string_value")
    return values


def server_span_of(spans: list[trace_pb2.Span], request_id: str) -> trace_pb2.Span | None:
    for span in spans:
        if span.kind == SERVER and attributes(span).get("mnist.request_id") == request_id:
            return span
    return None


def children(spans: list[trace_pb2.Span], parent: trace_pb2.Span) -> list[trace_pb2.Span]:
    return [
        s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
    ]


def ids(context: SpanContext) -> tuple[bytes, bytes]:
    return context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big")


async def test_the_client_span_is_the_parent_and_a_merged_model_call_links_every_request(
    traced: ServerProcess, receiver: Receiver
) -> None:
    tracer = TracerProvider().get_tracer("test")  # the caller's own tracing, not exported
    async with AsyncMnistClient(traced.target) as client:

        async def one(index: int) -> SpanContext:
            with tracer.start_as_current_span(f"caller {index}") as span:
                await client.predict(np.zeros((1, 784), np.uint8), request_id=f"merge-{index}")
                return span.get_span_context()

        callers = await asyncio.gather(*(one(i) for i in range(CONCURRENT)))

    names = [f"merge-{i}" for i in range(CONCURRENT)]

    def complete(spans: list[trace_pb2.Span]) -> bool:
        """Every call's server span, and as many model spans as calls between them."""
        found = [server_span_of(spans, name) for name in names]
        if any(span is None for span in found):
            return False
        server_ids = {span.span_id for span in found if span is not None}
        linked = [
            link.span_id
            for span in spans
            if span.name == "model call"
            for link in span.links
            if link.span_id in server_ids
        ]
        return len(set(linked)) == CONCURRENT

    spans = receiver.wait_for(complete, "the spans of the concurrent calls")
    servers = []
    for name, caller in zip(names, callers, strict=True):
        span = server_span_of(spans, name)
        assert span is not None
        servers.append(span)
        trace_id, parent_id = ids(caller)
        assert (span.trace_id, span.parent_span_id) == (trace_id, parent_id)
        assert span.name == "mnist.v1.MnistService/Predict"
        assert attributes(span) | {"mnist.request_id": ""} == {
            "rpc.system": "grpc",
            "rpc.service": "mnist.v1.MnistService",
            "rpc.method": "Predict",
            "rpc.grpc.status_code": 0,
            "mnist.request_id": "",
        }
        queue = [s for s in children(spans, span) if s.name == "batch queue"]
        assert len(queue) == 1
        assert span.start_time_unix_nano <= queue[0].start_time_unix_nano
        assert queue[0].end_time_unix_nano <= span.end_time_unix_nano
    server_ids = {span.span_id for span in servers}
    models = [
        span
        for span in spans
        if span.name == "model call" and any(link.span_id in server_ids for link in span.links)
    ]
    # Each request is answered by one model call, which links to it.
    linked = [link.span_id for span in models for link in span.links]
    assert sorted(linked) == sorted(server_ids)
    for model in models:
        # A child of the first request it answers, linked to every one of them.
        assert model.parent_span_id in {link.span_id for link in model.links}
        parent = next(s for s in servers if s.span_id == model.parent_span_id)
        assert model.trace_id == parent.trace_id
        assert attributes(model)["mnist.requests"] == len(model.links)
        assert attributes(model)["mnist.images"] == len(model.links)
    # Sent together, and the batch waits up to a second for CONCURRENT images: merged.
    assert max(len(model.links) for model in models) >= 2
    assert {"service.name": "mnist-under-test"}.items() <= receiver.resources[-1].items()


def post(url: str, body: Any, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize(
    ("path", "status", "route"),
    [
        ("/v2/models/mnist/infer", 200, "/v2/models/{name}/infer"),
        ("/v2/models/nope/infer", 404, "/v2/models/{name}/infer"),
    ],
)
def test_http_calls_get_a_server_span_under_the_callers_traceparent(
    traced: ServerProcess, receiver: Receiver, path: str, status: int, route: str
) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    request_id = f"http-trace-{status}"
    body = {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8",
                        "data": [0] * 784}]}  # fmt: skip
    headers = {
        "traceparent": f"00-{trace_id}-{parent_id}-01",
        "tracestate": "vendor=opaque",
        "X-Request-Id": request_id,
    }
    assert post(traced.http_url + path, body, headers) == status
    spans = receiver.wait_for(
        lambda spans: server_span_of(spans, request_id) is not None, "the HTTP call's span"
    )
    span = server_span_of(spans, request_id)
    assert span is not None
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (trace_id, parent_id)
    assert span.trace_state == "vendor=opaque"
    assert span.name == f"POST {route}"
    values = attributes(span)
    assert values["http.request.method"] == "POST"
    assert values["http.route"] == route
    assert values["url.path"] == path
    assert values["http.response.status_code"] == status
    if status == 200:
        names = [s.name for s in children(spans, span)]
        assert sorted(names) == ["batch queue", "model call"]  # one request: the model's child


async def test_the_scoring_engine_calls_join_the_callers_trace(
    traced: ServerProcess, receiver: Receiver
) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("scoring job") as job:
        stats = await score_async(
            traced.target, np.zeros((6, 784), np.uint8), batch_size=2, concurrency=2
        )
    assert stats.failed_ranges == []
    trace_id, parent_id = ids(job.get_span_context())

    def ours(spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
        return [s for s in spans if s.kind == SERVER and s.trace_id == trace_id]

    spans = receiver.wait_for(lambda spans: len(ours(spans)) >= 3, "the scoring job's calls")
    assert [s.parent_span_id for s in ours(spans)] == [parent_id] * 3


def test_the_ray_actors_attach_the_drivers_trace_context() -> None:
    """What the Ray engine carries to its actors (WorkerSettings.trace_context) makes the
    driver's span current again there, so the actors' calls carry its traceparent."""
    tracer = TracerProvider().get_tracer("test")
    assert trace_metadata() == ()  # outside any span: nothing to send
    with tracer.start_as_current_span("driver") as driver:
        carried = trace_metadata()
    context = driver.get_span_context()
    assert dict(carried)["traceparent"].startswith(
        f"00-{context.trace_id:032x}-{context.span_id:016x}-"
    )
    assert trace_metadata() == ()
    with attached(carried):
        assert trace_metadata() == carried
    assert trace_metadata() == ()


def test_the_sampler_is_set_by_the_standard_variables(
    tiny_model_dir: Path, receiver: Receiver
) -> None:
    """parentbased_traceidratio at 0: a call without a parent is never sampled, a call
    whose caller sampled its trace always is."""
    server = ServerProcess(
        tiny_model_dir,
        "--poll-interval", "0", "--tracing",
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
        },
    )  # fmt: skip
    with server, grpc.insecure_channel(server.target) as channel:
        metadata = channel.unary_unary(
            "/mnist.v1.MnistService/GetModelMetadata",
            request_serializer=None,
            response_deserializer=None,
        )
        metadata(b"", metadata=(("x-request-id", "unsampled"),), timeout=30)
        sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        metadata(b"", metadata=(("x-request-id", "sampled"), ("traceparent", sampled)), timeout=30)
        # Spans are exported in the order they end: once the second call's span is in,
        # the first one's would be too.
        spans = receiver.wait_for(
            lambda spans: server_span_of(spans, "sampled") is not None, "the sampled call"
        )
    assert server.process.returncode == 0, server.log
    assert server_span_of(spans, "unsampled") is None
