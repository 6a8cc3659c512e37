"""What every HTTP API shares: each route through the per-call path, errors as JSON,
reading the body within the size limit, the deadline header, JSON numbers to arrays.

The HTTP twin of api/rpc.py: handlers raise domain errors, and the call path (api/calls.py)
turns them into the status of errors.HTTP_STATUS_OF, answered here with a body
{"error": "..."}, the shape TF Serving's and KServe's REST APIs both use. Calls are counted
in the same metrics as RPCs, labelled with the equivalent RPC's name and the gRPC code name
of the outcome.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from .. import tracing
from ..call_context import PRIORITY_HEADER, REQUEST_ID_HEADER, Call, request_id_of
from ..errors import (
    HTTP_STATUS_OF,
    BodyTimeout,
    ClientGone,
    InvalidInput,
    RequestTooLarge,
    Unauthenticated,
)
from ..logs import RateLimitedLog
from .calls import CallPath, Failure

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A caller's time budget for one call, in milliseconds: TF Serving's REST API has no
# deadline of its own, and this one header serves both REST APIs alike.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
JSON = "application/json"
# The largest body the app accepts (its client_max_size), for error messages.
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
BODY_TIMEOUT = web.AppKey("body_timeout", float)  # seconds, from the headers to the body's end
# Failures answered before the body was read in full (too large, too slow): the connection
# is closed after the answer, the rest of the body never read.
UNREAD_BODY_STATUSES = (HTTP_STATUS_OF[RequestTooLarge], HTTP_STATUS_OF[BodyTimeout])
HANGUP_LOG_INTERVAL = 10.0  # seconds between log lines about clients that hung up mid-body


class RestBinding:
    """Serves HTTP routes through one server's call path (api/calls.py)."""

    def __init__(self, path: CallPath) -> None:
        self.path = path
        self._hangup_log = RateLimitedLog(logger, HANGUP_LOG_INTERVAL)

    def counted(self, api: str, method: str, impl: Handler) -> Handler:
        """`impl` through the call path as (api, method), its failures answered as JSON."""
        path = self.path
        stats = path.method(api, method, http=True)

        async def handle(request: web.Request) -> web.StreamResponse:
            async def answer(call: Call) -> web.StreamResponse:
                try:
                    return await impl(request)
                except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
                    self._hangup_log.warning("client hung up mid-request", api=api, method=method)
                    raise ClientGone("the client closed the connection") from None

            headers = request.headers
            request_id = request_id_of(headers.get(REQUEST_ID_HEADER))
            traced = tracing.tracer is not None
            outcome = await path.observe(
                stats,
                answer,
                _cancelled,
                headers.get(PRIORITY_HEADER),
                request_id=request_id,
                carrier=headers,
                peer=lambda: request.remote or "",
                attributes=_attributes(request) if traced else None,
                span_name=f"{request.method} {_route(request)}" if traced else "",
            )
            if isinstance(outcome, Failure):
                response = error_response(outcome.http_status, outcome.message)
                response.headers[REQUEST_ID_HEADER] = request_id
                add_auth_headers(response, outcome)
                if outcome.http_status in UNREAD_BODY_STATUSES:
                    return await answer_and_close(request, response)
                return response
            if not outcome.prepared:
                outcome.headers[REQUEST_ID_HEADER] = request_id
            return outcome

        return handle


def add_auth_headers(response: web.StreamResponse, failure: Failure) -> None:
    """RFC 6750's challenge on a 401, and when to retry on a key's rate limit."""
    if failure.http_status == HTTP_STATUS_OF[Unauthenticated]:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mnist-serving"'
    if failure.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(failure.retry_after)))


def _attributes(request: web.Request) -> dict[str, str | int]:
    """The span attributes of one HTTP call (OpenTelemetry's HTTP server conventions)."""
    return {
        "http.request.method": request.method,
        "http.route": _route(request),
        "url.path": request.path,
        "url.scheme": request.scheme,
    }


def _route(request: web.Request) -> str:
    """The path template the request matched, e.g. /v2/models/{name}/infer."""
    resource = request.match_info.route.resource
    return request.path if resource is None else resource.canonical


def _cancelled() -> grpc.StatusCode:
    return grpc.StatusCode.CANCELLED  # the client went away


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection without reading the rest of the body
    (aiohttp would otherwise read and drop it for up to 10 s before closing)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # the answer is written out before the socket closes
    return response


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json_bytes(body), status=status, content_type=JSON)


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the size limit and the body timeout. A body declared larger
    than the limit is refused before any of it is read."""
    limit = request.app[MAX_BODY_BYTES]
    too_large = f"the request body exceeds {limit} bytes; split the batch"
    if (request.content_length or 0) > limit:
        raise RequestTooLarge(too_large)
    timeout = request.app[BODY_TIMEOUT]
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:  # a body without Content-Length, sent in chunks
        raise RequestTooLarge(too_large) from None
    except asyncio.TimeoutError:  # TimeoutError on 3.11+
        raise BodyTimeout(f"the request body did not arrive within {timeout:g} s") from None


def parse_json(text: bytes | str, what: str = "the request body") -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError as error:  # UnicodeDecodeError included
        raise InvalidInput(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidInput(f"{what} nests too deeply to be an image batch") from None
    if not isinstance(body, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(body).__name__}")
    return body


def time_remaining(request: web.Request) -> float | None:
    """Seconds left of the budget the caller gave in the timeout header; None if none."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = math.nan
    if not milliseconds > 0 or math.isinf(milliseconds):
        raise InvalidInput(f"{TIMEOUT_HEADER} is {value!r}; give a positive number of ms")
    return milliseconds / 1000
