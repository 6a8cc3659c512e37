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
  current for the layers below, which schedule by it; the metrics carry it as a label.

It returns the work's result, or a `Failure` that the binding answers in its own way (gRPC:
abort with the code; HTTP: a JSON error body with the status). A binding keeps only what is
its own: decoding bytes, aborting, writing the error body. Concerns that apply to every
call (priority, caller identity, request IDs, traces, the access log) are added here.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from .. import call_context, metrics
from ..admission import CUT, Admission
from ..call_context import PRIORITIES, Call
from ..errors import ShuttingDown, http_status, status_of

T = TypeVar("T")
OK = grpc.StatusCode.OK


@dataclass(frozen=True, slots=True)
class Failure:
    """How a call that did not succeed is answered: the gRPC code (also what the metrics
    count), its HTTP status, and the message for the caller."""

    code: grpc.StatusCode
    http_status: int
    message: str

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        code, message = status_of(error)  # logs an unexpected error with its trace
        return cls(code, http_status(error), message)


class MethodStats:
    """The metric series of one (api, method), bound once instead of on every call."""

    __slots__ = ("_answered", "_seconds", "api", "method")

    def __init__(self, api: str, method: str) -> None:
        self.api = api
        self.method = method
        self._seconds = {p: metrics.REQUEST_SECONDS.labels(api, method, p) for p in PRIORITIES}
        # The common case, for each class: answered OK.
        self._answered = {p: metrics.REQUESTS.labels(api, method, OK.name, p) for p in PRIORITIES}

    def record(self, call: Call, seconds: float) -> None:
        self._seconds[call.priority].observe(seconds)
        code = call.code
        (
            self._answered[call.priority]
            if code is OK
            else metrics.REQUESTS.labels(self.api, self.method, code.name, call.priority)
        ).inc()


class CallPath:
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def method(self, api: str, method: str) -> MethodStats:
        return MethodStats(api, method)

    async def observe(
        self,
        stats: MethodStats,
        work: Callable[[Call], Awaitable[T]],
        cancelled: Callable[[], grpc.StatusCode],
        priority: str | None = None,
    ) -> T | Failure:
        """Run `work` as one call of `stats`' method. `cancelled` tells the status a call
        that its caller cancelled ended with (CANCELLED, or DEADLINE_EXCEEDED); `priority`
        is the class the caller declared in its transport's way (metadata, header)."""
        started = time.perf_counter()
        call = Call(stats.api, stats.method)
        token = call_context.enter(call)
        admission = self.admission
        task = None
        metrics.IN_FLIGHT.inc()
        try:
            task = admission.enter()  # ShuttingDown once the server stops admitting
            if priority is not None:
                call.priority = call_context.priority_named(priority)
            return await work(call)
        except asyncio.CancelledError:
            if not admission.was_cut(task):
                call.code = cancelled()  # the caller went away: count what it sees
                raise
            if task is not None and sys.version_info >= (3, 11):
                task.uncancel()  # our own cancellation at the end of the grace period
            failure = Failure.of(ShuttingDown(CUT))
            call.code = failure.code
            return failure
        except Exception as error:
            failure = Failure.of(error)
            call.code = failure.code
            return failure
        finally:
            admission.leave(task)
            metrics.IN_FLIGHT.dec()
            stats.record(call, time.perf_counter() - started)
            call_context.leave(token)
