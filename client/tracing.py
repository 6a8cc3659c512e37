"""Trace context for outgoing calls: when OpenTelemetry is installed (the `otel` extra),
every call carries the caller's current span as W3C `traceparent`/`tracestate` metadata,
so that the server's span of the call is its child. Without it, nothing is added. The Ray
engine's actors call from other processes: they attach the driver's context, carried in
their settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

_inject: Callable[[dict[str, str]], None] | None
try:
    from opentelemetry.propagate import inject as _inject
except ImportError:  # the otel extra is not installed
    _inject = None


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (empty outside any span)."""
    if _inject is None:
        return ()
    carrier: dict[str, str] = {}
    _inject(carrier)
    return tuple(carrier.items())


@contextmanager
def attached(metadata: Sequence[tuple[str, str]]) -> Iterator[None]:
    """Make the trace context in `metadata` (trace_metadata() of another process: the Ray
    driver's, in an actor) current for the block; a no-op without OpenTelemetry."""
    if _inject is None or not metadata:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(dict(metadata)))
    try:
        yield
    finally:
        context.detach(token)
