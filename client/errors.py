"""Typed client errors: each carries the gRPC status code and the server's message.

`from_rpc_error` is the one table that maps a gRPC status to an exception class.
"""

from __future__ import annotations

import contextlib

import grpc

REQUEST_ID_METADATA = "x-request-id"


class MnistError(Exception):
    """Any failed call: `.code` is the gRPC status (None for client-side faults), `.details`
    the server's (or the client's) message, `.request_id` the server's ID of the call (None
    when the server sent none: it never answered, or the fault is the client's)."""

    request_id: str | None = None

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        if self.code is None:
            return self.details
        return f"{self.code.name}: {self.details}"


class InvalidInput(MnistError):
    """The images (or a parameter) were rejected, by the server or before sending."""

    def __init__(
        self, details: str, code: grpc.StatusCode | None = grpc.StatusCode.INVALID_ARGUMENT
    ) -> None:
        super().__init__(details, code)


class NotFound(MnistError):
    """Unknown model name or version (or health service name)."""


class Overloaded(MnistError):
    """RESOURCE_EXHAUSTED: the server shed the request (queue full), even after retries."""


class RateLimited(Overloaded):
    """RESOURCE_EXHAUSTED from the caller's own API key limit: `.retry_after` seconds until
    a call would pass (the server's `retry-after-ms` trailing metadata)."""

    retry_after: float = 0.0


class Unauthenticated(MnistError):
    """UNAUTHENTICATED: the server wants an API key (token=, --token, --token-file or
    MNIST_TOKEN), or the one sent is not valid (any more)."""


class PermissionDenied(MnistError):
    """PERMISSION_DENIED: the API key's role does not cover the call (a read key calling
    predict)."""


class Unavailable(MnistError):
    """UNAVAILABLE: server unreachable or shutting down, even after retries."""


class DeadlineExceeded(MnistError):
    """The call's deadline passed (across all its attempts)."""


class InputFileError(ValueError):
    """An input file that cannot be read as images; the message names the file."""


class ProtocolError(MnistError):
    """The server answered with something that breaks the API contract."""


_BY_CODE: dict[grpc.StatusCode, type[MnistError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}
RETRY_AFTER_METADATA = "retry-after-ms"


def from_rpc_error(error: grpc.RpcError) -> MnistError:
    """The typed exception for a failed call (works for sync and grpc.aio errors)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    trailing = getattr(error, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    retry_after = _metadata_value(metadata, RETRY_AFTER_METADATA)
    kind = _BY_CODE.get(code, MnistError)
    if kind is Overloaded and retry_after is not None:
        kind = RateLimited
    typed = kind(details, code)
    if isinstance(typed, RateLimited) and retry_after is not None:
        with contextlib.suppress(ValueError):
            typed.retry_after = float(retry_after) / 1000
    typed.request_id = request_id_in(metadata)
    return typed


def request_id_in(metadata: object) -> str | None:
    """The x-request-id a server sent in `metadata` (key-value pairs), if any."""
    return _metadata_value(metadata, REQUEST_ID_METADATA)


def _metadata_value(metadata: object, wanted: str) -> str | None:
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == wanted:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None
