"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these (or let unknown exceptions escape); `rpc_method` turns them into a
status for the caller. Unknown errors become INTERNAL with a generic message; their stack
trace goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from . import metrics

logger = logging.getLogger(__name__)


class ServingError(Exception):
    """An error whose message is meant for the caller."""


class InvalidInput(ServingError):
    pass


class ModelNotFound(ServingError):
    pass


class Overloaded(ServingError):
    pass


class DeadlineExpired(ServingError):
    pass


class ShuttingDown(ServingError):
    pass


STATUS_OF: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message the caller gets for `error`."""
    for kind, code in STATUS_OF.items():
        if isinstance(error, kind):
            return code, str(error)
    logger.error("unexpected error while serving a call", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


# The decorator every RPC method wears: error mapping and request metrics in one place.
Req = TypeVar("Req")
Resp = TypeVar("Resp")


Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def rpc_method(api: str, method: str) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """Count, time and map the errors of one RPC method; `api` labels native vs tfserving."""

    def decorate(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
        seconds = metrics.REQUEST_SECONDS.labels(api, method)

        @functools.wraps(handler)
        async def wrapper(self: Any, request: Req, context: Context) -> Resp:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            metrics.IN_FLIGHT.inc()
            try:
                return await handler(self, request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, message = status_of(error)
            finally:
                # Recorded before the status is sent, so a caller that has its answer
                # also finds it counted.
                metrics.IN_FLIGHT.dec()
                seconds.observe(time.perf_counter() - started)
                metrics.REQUESTS.labels(api, method, code.name).inc()
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises")

        return wrapper

    return decorate


class StartupError(RuntimeError):
    """The server cannot start (no loadable model, port taken); the message says why."""
