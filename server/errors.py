"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these (or let unknown exceptions escape); api/rpc.py turns them into a
status for the caller. Unknown errors become INTERNAL with a generic message; their stack
trace goes to the log, never to the client.
"""

from __future__ import annotations

import logging

import grpc

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


class NotImplementedHere(ServingError):
    """A method of a served API that this server does not implement."""


STATUS_OF: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    NotImplementedHere: grpc.StatusCode.UNIMPLEMENTED,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message the caller gets for `error`."""
    for kind, code in STATUS_OF.items():
        if isinstance(error, kind):
            return code, str(error)
    logger.error("unexpected error while serving a call", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


class StartupError(RuntimeError):
    """The server cannot start (no loadable model, port taken); the message says why."""
