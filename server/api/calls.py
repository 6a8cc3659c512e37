"""The per-call path: what happens to every call, whatever its API and transport.

One `CallPath` per server, shared by the gRPC (api/rpc.py) and HTTP (api/rest.py) bindings.
`await path.observe(method, work, cancelled)` runs one call's `work` and owns everything
around it:
- admission (server/admission.py): refused with ShuttingDown once the server stops
  admitting, waited for at shutdown, cut (UNAVAILABLE) when the grace period ends;
- the in-flight gauge, the call's duration and the request counter, recorded before the
  answer is sent, so that a caller that has its answer also finds it counted;
- status truth: the status the caller really gets, whether the call succeeded, failed with
  a domain error (errors.py's tables), was cut, or was cancelled by its caller;
- the call's priority class (call_context.py), declared in the transport's way and made
  current for the layers below, which schedule by it; the metrics carry it as a label;
- the caller (server/auth.py, with --auth-keys): its key checked against the method's role
  and its own rate limits before the work; its name labels the metrics and the access log;
- the request ID (the caller's, or a new one), made current so that every log line about
  the call carries it; the binding returns it in its transport's way;
- the server span (server/tracing.py, when tracing is on), its parent the caller's trace
  context, and the access log line (server/access_log.py, when it is on), queued for its
  writer thread after the call.

It returns the work's result, or a `Failure` that the binding answers in its own way (gRPC:
abort with the code; HTTP: a JSON error body with the status). A binding keeps only what is
its own: decoding bytes, aborting, writing the error body. Concerns that apply to every
call (priority, caller identity, request IDs, traces, the access log) live here.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from .. import call_context, metrics, tracing
from ..access_log import AccessLog, Record
from ..admission import CUT, Admission
from ..auth import ANONYMOUS, Authenticator, Role, needed_role
from ..call_context import PRIORITIES, Call
from ..errors import RateLimited, ShuttingDown, http_status, status_of

T = TypeVar("T")
OK = grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class Failure:
    """How a call that did not succeed is answered: the gRPC code (also what the metrics
    count), its HTTP status, and the message for the caller."""

    code: grpc.StatusCode
    http_status: int
    message: str
    retry_after: float | None = None  # seconds: a key over its rate limit (auth.py)

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        code, message = status_of(error)  # logs an unexpected error with its trace
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        return cls(code, http_status(error), message, retry_after)


class MethodStats:
    """The metric series of one (api, method), bound once instead of on every call: per
    priority class for anonymous callers, and per (class, caller) as callers appear (their
    number bounded by the keys file's names)."""

    __slots__ = (
        "_answered",
        "_seconds",
        "api",
        "http",
        "method",
        "needs",
        "span_attributes",
        "span_name",
    )

    def __init__(
        self,
        api: str,
        method: str,
        *,
        http: bool = False,
        span_name: str = "",
        span_attributes: Mapping[str, str | int] | None = None,
    ) -> None:
        self.api = api
        self.method = method
        self.http = http  # an HTTP route: the access log and the span give its status
        # The server span's name and the attributes every call of the method shares.
        self.span_name = span_name or f"{api}/{method}"
        self.span_attributes = dict(span_attributes or {})
        self.needs: Role | None = needed_role(method)  # with --auth-keys; None: open
        self._seconds: dict[tuple[str, str], Any] = {}
        self._answered: dict[tuple[str, str], Any] = {}  # the common case: answered OK
        for priority in PRIORITIES:
            self._bind(priority, ANONYMOUS)

    def _bind(self, priority: str, caller: str) -> tuple[Any, Any]:
        key = (priority, caller)
        seconds = self._seconds[key] = metrics.REQUEST_SECONDS.labels(
            self.api, self.method, priority, caller
        )
        answered = self._answered[key] = metrics.REQUESTS.labels(
            self.api, self.method, OK.name, priority, caller
        )
        return seconds, answered

    def record(self, call: Call, seconds: float) -> None:
        key = (call.priority, call.caller)
        timer = self._seconds.get(key)
        answered = self._answered.get(key)
        if timer is None or answered is None:
            timer, answered = self._bind(*key)
        timer.observe(seconds)
        code = call.code
        (
            answered
            if code is OK
            else metrics.REQUESTS.labels(self.api, self.method, code.name, *key)
        ).inc()


class CallPath:
    def __init__(
        self,
        admission: Admission,
        access_log: AccessLog | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.admission = admission
        self.access_log = access_log
        self.auth = auth  # --auth-keys: every method but health needs a key

    def method(self, api: str, method: str, **options: Any) -> MethodStats:
        """`options`: MethodStats' http, span_name and span_attributes."""
        return MethodStats(api, method, **options)

    async def observe(
        self,
        stats: MethodStats,
        work: Callable[[Call], Awaitable[T]],
        cancelled: Callable[[], grpc.StatusCode],
        priority: str | None = None,
        *,
        request_id: str = "",
        carrier: Mapping[str, str] | None = None,
        peer: Callable[[], str] | None = None,
        attributes: Mapping[str, str | int] | None = None,
        span_name: str = "",
    ) -> T | Failure:
        """Run `work` as one call of `stats`' method. `cancelled` tells the status a call
        that its caller cancelled ended with (CANCELLED, or DEADLINE_EXCEEDED); `priority`
        is the class the caller declared in its transport's way (metadata, header);
        `request_id` the call's (call_context.request_id_of); `carrier` the metadata or
        headers that carry the caller's trace context; `peer` tells who called (for the
        access log); `attributes` and `span_name` are the span's, for this call alone."""
        started = time.perf_counter()
        call = Call(stats.api, stats.method, request_id=request_id)
        token = call_context.enter(call)
        admission = self.admission
        task = None
        outcome: object = None
        span = span_token = None
        if tracing.tracer is not None:
            span, span_token = tracing.start_call_span(
                span_name or stats.span_name,
                {**stats.span_attributes, **(attributes or {}), "mnist.request_id": request_id},
                carrier or {},
            )
            call.span = span
        metrics.IN_FLIGHT.inc()
        try:
            task = admission.enter()  # ShuttingDown once the server stops admitting
            if self.auth is not None and stats.needs is not None:
                self.auth.check(stats.needs, carrier, call)
            if priority is not None:
                call.priority = call_context.priority_named(priority)
            outcome = await work(call)
            return outcome
        except asyncio.CancelledError:
            if not admission.was_cut(task):
                call.code = cancelled()  # the caller went away: count what it sees
                raise
            if task is not None and sys.version_info >= (3, 11):
                task.uncancel()  # our own cancellation at the end of the grace period
            outcome = failure = Failure.of(ShuttingDown(CUT))
            call.code = failure.code
            return failure
        except Exception as error:
            outcome = failure = Failure.of(error)
            call.code = failure.code
            return failure
        finally:
            admission.leave(task)
            metrics.IN_FLIGHT.dec()
            seconds = time.perf_counter() - started
            stats.record(call, seconds)
            if span is not None or self.access_log is not None:
                http_status = _http_status(stats, call, outcome)
                if span is not None and span_token is not None:
                    tracing.end_call_span(span, span_token, call.code, http_status)
                self._log(stats, call, seconds, http_status, carrier, peer)
            call_context.leave(token)

    def _log(
        self,
        stats: MethodStats,
        call: Call,
        seconds: float,
        http_status: int,
        carrier: Mapping[str, str] | None,
        peer: Callable[[], str] | None,
    ) -> None:
        """Queue the call's access log line, if the log is on and samples this call."""
        log = self.access_log
        if log is None or not log.sampled():
            return
        trace_id = tracing.trace_id_of(call.span) or tracing.traceparent_trace_id(
            None if carrier is None else carrier.get("traceparent")
        )
        log.put(
            Record(
                time=time.time() - seconds,
                request_id=call.request_id,
                caller=call.caller,
                api=stats.api,
                method=stats.method,
                status=call.code.name,
                http_status=http_status,
                duration=seconds,
                images=call.images,
                model_version=call.model_version,
                priority=call.priority,
                trace_id=trace_id,
                peer="" if peer is None else peer(),
            )
        )


def _http_status(stats: MethodStats, call: Call, outcome: object) -> int:
    """The HTTP status an HTTP call was answered with (0 for RPCs)."""
    if not stats.http:
        return 0
    if isinstance(outcome, Failure):
        return outcome.http_status
    status = getattr(outcome, "status", None)
    if isinstance(status, int):
        return status
    return 200 if call.code is OK else 499  # cancelled by its caller: nginx's 499
