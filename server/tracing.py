"""OpenTelemetry tracing (--tracing, with the `otel` extra installed): a server span per
call, child spans for the queue wait and the model call, exported over OTLP/gRPC.

Off and free by default: `tracer` stays None and every caller checks it first, so nothing
of OpenTelemetry is imported or called. `start()` sets it up; the standard variables
configure the rest: OTEL_EXPORTER_OTLP_ENDPOINT (and the other OTEL_EXPORTER_OTLP_*),
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, OTEL_BSP_*, OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES; OTEL_SDK_DISABLED=true keeps tracing off.

The caller's W3C `traceparent`/`tracestate` (gRPC metadata, HTTP headers) is the parent of
the server span. A model call that merges several requests is a child of the first one's
span and links to every one of them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import grpc

from .errors import StartupError

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

# Set by start(); None means tracing is off (the check every caller makes first).
tracer: Tracer | None = None
_provider: TracerProvider | None = None
SERVICE_NAME = "mnist-serving"
# gRPC codes a server span reports as an error (OpenTelemetry's RPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def disabled_by_environment() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def start(enabled: bool) -> bool:
    """Turn tracing on when asked for and not disabled by OTEL_SDK_DISABLED; a StartupError
    when asked for without the `otel` extra installed."""
    global tracer, _provider
    if not enabled or disabled_by_environment():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise StartupError(
            f"--tracing needs OpenTelemetry ({error.name} is missing): "
            'pip install "mnist-serving[otel]"'
        ) from None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); the default is parentbased_always_on.
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("mnist_serving.server")
    return True


def stop() -> None:
    """Export the spans still queued and stop (blocking: run it off the event loop)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer = _provider = None


def start_call_span(
    name: str, attributes: Mapping[str, str | int], carrier: object
) -> tuple[Span, Token[Context]]:
    """The server span of a call whose caller's context is in `carrier` (a mapping of
    metadata keys or headers), made current; end it with end_call_span."""
    from opentelemetry import context, propagate, trace

    assert tracer is not None
    parent: Context = propagate.extract(carrier)
    span = tracer.start_span(name, parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_call_span(
    span: Span, token: Token[Context], code: grpc.StatusCode, http_status: int
) -> None:
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    if http_status:
        span.set_attribute("http.response.status_code", http_status)
        failed = http_status >= 500
    else:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        failed = code in _SERVER_ERRORS
    if failed:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()
    context.detach(token)


def trace_id_of(span: Span | None) -> str:
    """The span's trace ID as 32 hex digits, or ""."""
    if span is None:
        return ""
    trace_id = span.get_span_context().trace_id
    return format(trace_id, "032x") if trace_id else ""


def traceparent_trace_id(value: str | None) -> str:
    """The trace ID of a W3C traceparent value (version-traceid-parentid-flags), or ""."""
    if not value:
        return ""
    parts = value.strip().split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1].lower()
    return ""


def _wall_ns(monotonic: float) -> int:
    """A time.monotonic() value as nanoseconds since the epoch (what spans take)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def record_queue_wait(parent: Span, enqueued: float, taken: float) -> None:
    """A finished span for the time a request waited in the batch queue (monotonic times)."""
    from opentelemetry import trace

    assert tracer is not None
    tracer.start_span(
        "batch queue", trace.set_span_in_context(parent), start_time=_wall_ns(enqueued)
    ).end(end_time=_wall_ns(taken))


def start_model_span(parents: Iterable[Span | None], images: int) -> Span:
    """The span of one model call, a child of the first traced request it answers and
    linked to every one of them."""
    from opentelemetry import trace

    assert tracer is not None
    traced: list[Span] = []
    for parent in parents:
        if parent is not None and all(parent is not seen for seen in traced):
            traced.append(parent)
    context = trace.set_span_in_context(traced[0]) if traced else None
    links = [trace.Link(span.get_span_context()) for span in traced]
    return tracer.start_span(
        "model call",
        context,
        links=links,
        attributes={"mnist.images": images, "mnist.requests": len(traced)},
    )
