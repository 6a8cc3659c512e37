"""How every gRPC API is served: one generic handler per service, each method through the
server's per-call path (api/calls.py).

Requests arrive as bytes and are parsed inside the method, so that bytes that are not a
message get INVALID_ARGUMENT (and one rate-limited log line) instead of gRPC's UNKNOWN and
a stack trace per call. A method a service declares but this server does not implement
answers UNIMPLEMENTED, counted as such. What is gRPC's own stays here: decoding, the
status for a cancelled call, aborting with the status, the cap on its details.

Servicers are plain classes: an `async def Method(request, context)` per implemented RPC,
raising domain errors, never calling context.abort themselves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from .. import metrics
from ..call_context import PRIORITY_METADATA, REQUEST_ID_METADATA, Call, request_id_of
from ..errors import InvalidInput, NotImplementedHere
from ..logs import RateLimitedLog
from .calls import CallPath, Failure

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Method = Callable[[Any, Context], Awaitable[Message]]
# A string: grpc's classes are generic only in grpc-stubs, not at run time.
Handlers: TypeAlias = "list[grpc.GenericRpcHandler[Any, Any]]"
UNDECODABLE_LOG_INTERVAL = 10.0  # seconds between log lines about undecodable requests
# Status details travel in an HTTP/2 trailer; clients refuse trailers over 8-16 KiB, so a
# message that quotes a huge field of the request would turn into a client-side error.
MAX_DETAILS = 1000
CUT_SHORT = " ... (cut short)"
# A cancellation this close to the call's deadline is counted as the deadline: see
# cancelled_status.
DEADLINE_SLACK = 1.0
# With RESOURCE_EXHAUSTED from a key's rate limit: when to retry, in milliseconds; and
# gRPC's own pushback (gRFC A6), which clients with a retry policy obey: retry after that
# long when it is short, else (-1) do not retry and let the caller see the hint.
RETRY_AFTER_METADATA = "retry-after-ms"
PUSHBACK_METADATA = "grpc-retry-pushback-ms"
MAX_PUSHBACK_MS = 1000


class RpcBinding:
    """Serves gRPC services through one server's call path."""

    def __init__(self, path: CallPath) -> None:
        self.path = path
        self._undecodable_log = RateLimitedLog(logger, UNDECODABLE_LOG_INTERVAL)

    def service_handler(
        self, service: ServiceDescriptor, api: str, servicer: object, unimplemented: str = ""
    ) -> grpc.GenericRpcHandler[Any, Any]:
        """Serve every unary method of `service` from `servicer`'s method of the same name.

        `api` labels the metrics (native, tfserving, v2); `unimplemented` is told to callers
        of a method the servicer lacks. Streaming methods are left to gRPC (UNIMPLEMENTED).
        """
        handlers = {}
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._method(
                    api,
                    method.name,
                    message_factory.GetMessageClass(method.input_type),
                    getattr(servicer, method.name, None),
                    unimplemented or f"{method.name} is not served here",
                    service.full_name,
                ),
                request_deserializer=None,  # bytes: parsed in _method
                response_serializer=_serialize,
            )
        return grpc.method_handlers_generic_handler(service.full_name, handlers)

    def _method(
        self,
        api: str,
        name: str,
        request_type: type[Message],
        impl: Method | None,
        unimplemented: str,
        service: str = "",
    ) -> Callable[[bytes, Context], Awaitable[Message]]:
        path = self.path
        stats = path.method(
            api,
            name,
            span_name=f"{service}/{name}",
            span_attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        full_name = request_type.DESCRIPTOR.full_name

        async def handle(data: bytes, context: Context) -> Message:
            async def answer(call: Call) -> Message:
                if impl is None:
                    raise NotImplementedHere(unimplemented)
                try:
                    request = request_type.FromString(data)
                except DecodeError:
                    self._undecodable(api, name)
                    raise InvalidInput(f"the request is not a valid {full_name} message") from None
                return await impl(request, context)

            metadata = metadata_of(context)
            request_id = request_id_of(metadata.get(REQUEST_ID_METADATA))
            # Trailing metadata: sent with every status, OK or not (abort keeps it).
            context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
            outcome = await path.observe(
                stats,
                answer,
                lambda: cancelled_status(context),
                declared_priority(context),
                request_id=request_id,
                carrier=metadata,
                peer=context.peer,
            )
            if not isinstance(outcome, Failure):
                return outcome
            if outcome.retry_after is not None:  # a key over its own rate limit
                context.set_trailing_metadata(
                    ((REQUEST_ID_METADATA, request_id), *retry_hint(outcome.retry_after))
                )
            message = outcome.message
            if len(message) > MAX_DETAILS:
                message = message[: MAX_DETAILS - len(CUT_SHORT)] + CUT_SHORT
            await context.abort(outcome.code, message)
            raise AssertionError("unreachable: abort raises")

        return handle

    def _undecodable(self, api: str, method: str) -> None:
        """Count a request that is not a message; log it at most once per interval."""
        metrics.UNDECODABLE.labels(api, method).inc()
        self._undecodable_log.warning("undecodable request", api=api, method=method)


def retry_hint(seconds: float) -> tuple[tuple[str, str], ...]:
    milliseconds = math.ceil(seconds * 1000)
    pushback = milliseconds if milliseconds <= MAX_PUSHBACK_MS else -1
    return ((RETRY_AFTER_METADATA, str(milliseconds)), (PUSHBACK_METADATA, str(pushback)))


def _serialize(response: Message) -> bytes:
    return response.SerializeToString()


def metadata_of(context: Context) -> dict[str, str]:
    """The caller's text metadata (binary `-bin` values left out)."""
    return {
        key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)
    }


def declared_priority(context: Context) -> str | None:
    """The priority class the caller declared in its metadata, if it did."""
    for key, value in context.invocation_metadata() or ():
        if key == PRIORITY_METADATA:
            return value if isinstance(value, str) else repr(value)
    return None


def cancelled_status(context: Context) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the caller's deadline is (about) up, else CANCELLED.

    A client whose deadline passes resets the stream; that reset can reach the server a
    little before the server's copy of the deadline, which started when the call arrived.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining < DEADLINE_SLACK:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
