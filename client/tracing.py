"""Trace context for outgoing calls: when OpenTelemetry is installed (the `otel` extra),
every call carries the caller's current span as W3C `traceparent`/`tracestate` metadata,
so that the server's span of the call is its child. Without it, nothing is added."""

from __future__ import annotations

from collections.abc import Callable

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
