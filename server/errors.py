"""Domain errors and the two tables that map them to gRPC status codes and HTTP statuses.

Servicers and HTTP handlers raise these (or let unknown exceptions escape); api/rpc.py and
api/http.py turn them into a status for the caller. Unknown errors become INTERNAL (HTTP
500) with a generic message; their stack trace goes to the log, never to the client.
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


class NotReady(ServingError):
    """No model version is loaded yet (the first load is still running)."""


class NotImplementedHere(ServingError):
    """A method of a served API that this server does not implement."""


class RequestTooLarge(ServingError):
    """An HTTP request body beyond the size limit (gRPC refuses such messages itself)."""


class BodyTimeout(ServingError):
    """An HTTP request body that did not arrive within --http-body-timeout."""


class ClientGone(ServingError):
    """The client closed the connection before its answer (over HTTP: even before the
    whole body arrived). Nobody reads the answer; it is counted as gRPC counts a call its
    client cancelled."""


class Unauthenticated(ServingError):
    """No token, or one that is not a key's (with --auth-keys)."""


class PermissionDenied(ServingError):
    """A key whose role does not cover the method."""


class RateLimited(Overloaded):
    """A key beyond its own requests/s or images/s limit: `retry_after` seconds until the
    call would pass. Counted apart from the queue's shedding (mnist_rate_limited_total)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


STATUS_OF: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    NotImplementedHere: grpc.StatusCode.UNIMPLEMENTED,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BodyTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    ClientGone: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# The statuses TensorFlow Serving's REST API gives the same gRPC codes (KServe's agree):
# a full queue is 429 (retry later, here), a draining server 503 (retry elsewhere). A client
# that went away gets nothing; 499 is nginx's status for it, for the record.
HTTP_STATUS_OF: dict[type[ServingError], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    Overloaded: 429,
    DeadlineExpired: 504,
    ShuttingDown: 503,
    NotReady: 503,
    NotImplementedHere: 501,
    RequestTooLarge: 413,
    BodyTimeout: 408,
    ClientGone: 499,
    Unauthenticated: 401,
    PermissionDenied: 403,
    RateLimited: 429,
}
INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message the caller gets for `error`."""
    for kind, code in STATUS_OF.items():
        if isinstance(error, kind):
            return code, str(error)
    logger.error("unexpected error while serving a call", exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def http_status(error: BaseException) -> int:
    """The HTTP status that stands for `error`'s gRPC status (500 for unknown errors)."""
    for kind, status in HTTP_STATUS_OF.items():
        if isinstance(error, kind):
            return status
    return 500


class StartupError(RuntimeError):
    """The server cannot start (no loadable model, port taken); the message says why."""
