"""How every gRPC API is served: one generic handler per service, one wrapper per method.

Requests arrive as bytes and are parsed inside the method, so that bytes that are not a
message get INVALID_ARGUMENT (and one rate-limited log line) instead of gRPC's UNKNOWN and
a stack trace per call. Every call is timed and counted with the status the caller gets,
and domain errors become statuses through the one table in errors.py. A method a service
declares but this server does not implement answers UNIMPLEMENTED, counted as such.

Servicers are plain classes: an `async def Method(request, context)` per implemented RPC,
raising domain errors, never calling context.abort themselves.

Every call passes `ADMISSION` (server/admission.py), which refuses calls once the server
stops admitting and lets shutdown wait for the admitted ones.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from .. import metrics
from ..admission import ADMISSION, CUT
from ..errors import InvalidInput, NotImplementedHere, status_of

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Method = Callable[[Any, Context], Awaitable[Message]]
UNDECODABLE_LOG_INTERVAL = 10.0  # seconds between log lines about undecodable requests
# Status details travel in an HTTP/2 trailer; clients refuse trailers over 8-16 KiB, so a
# message that quotes a huge field of the request would turn into a client-side error.
MAX_DETAILS = 1000
CUT_SHORT = " ... (cut short)"
# A cancellation this close to the call's deadline is counted as the deadline: see
# _cancelled_status.
DEADLINE_SLACK = 1.0


def service_handler(
    service: ServiceDescriptor, api: str, servicer: object, unimplemented: str = ""
) -> grpc.GenericRpcHandler[Any, Any]:
    """Serve every unary method of `service` from `servicer`'s method of the same name.

    `api` labels the metrics (native, tfserving, v2); `unimplemented` is told to callers of
    a method the servicer lacks. Streaming methods are left to gRPC (UNIMPLEMENTED).
    """
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            continue
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _method(
                api,
                method.name,
                message_factory.GetMessageClass(method.input_type),
                getattr(servicer, method.name, None),
                unimplemented or f"{method.name} is not served here",
            ),
            request_deserializer=None,  # bytes: parsed in _method
            response_serializer=_serialize,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _serialize(response: Message) -> bytes:
    return response.SerializeToString()


def _method(
    api: str, name: str, request_type: type[Message], impl: Method | None, unimplemented: str
) -> Callable[[bytes, Context], Awaitable[Message]]:
    seconds = metrics.REQUEST_SECONDS.labels(api, name)
    answered = metrics.REQUESTS.labels(api, name, grpc.StatusCode.OK.name)  # the common case
    full_name = request_type.DESCRIPTOR.full_name

    async def handle(data: bytes, context: Context) -> Message:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        task = None
        metrics.IN_FLIGHT.inc()
        try:
            task = ADMISSION.enter()
            if impl is None:
                raise NotImplementedHere(unimplemented)
            try:
                request = request_type.FromString(data)
            except DecodeError:
                _undecodable(api, name)
                raise InvalidInput(f"the request is not a valid {full_name} message") from None
            return await impl(request, context)
        except asyncio.CancelledError:
            if not ADMISSION.was_cut(task):
                # gRPC cancels the handler when the caller cancels or its deadline passes:
                # count what the caller sees.
                code = _cancelled_status(context)
                raise
            if task is not None and sys.version_info >= (3, 11):
                task.uncancel()  # our own cancellation, answered below
            code, message = grpc.StatusCode.UNAVAILABLE, CUT
        except Exception as error:
            code, message = status_of(error)
        finally:
            ADMISSION.leave(task)
            # Recorded before the status is sent, so a caller that has its answer also
            # finds it counted.
            metrics.IN_FLIGHT.dec()
            seconds.observe(time.perf_counter() - started)
            (
                answered
                if code is grpc.StatusCode.OK
                else metrics.REQUESTS.labels(api, name, code.name)
            ).inc()
        if len(message) > MAX_DETAILS:
            message = message[: MAX_DETAILS - len(CUT_SHORT)] + CUT_SHORT
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return handle


def _cancelled_status(context: Context) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the caller's deadline is (about) up, else CANCELLED.

    A client whose deadline passes resets the stream; that reset can reach the server a
    little before the server's copy of the deadline, which started when the call arrived.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining < DEADLINE_SLACK:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


_last_logged = -UNDECODABLE_LOG_INTERVAL
_unlogged = 0


def _undecodable(api: str, method: str) -> None:
    """Count a request that is not a message; log it at most once per interval."""
    global _last_logged, _unlogged
    metrics.UNDECODABLE.labels(api, method).inc()
    now = time.monotonic()
    if now - _last_logged < UNDECODABLE_LOG_INTERVAL:
        _unlogged += 1
        return
    logger.warning(
        "undecodable request",
        extra={"api": api, "method": method, "since_last_line": _unlogged},
    )
    _last_logged, _unlogged = now, 0
