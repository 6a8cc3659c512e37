"""What every HTTP API shares: counting and timing each call, errors as JSON, reading the
body within the size limit, the deadline header, JSON numbers to arrays.

The HTTP twin of api/rpc.py: handlers raise domain errors, and one wrapper turns them into
the status of errors.HTTP_STATUS_OF with a body {"error": "..."}, the shape TF Serving's
and KServe's REST APIs both use. Calls are counted in the same metrics as RPCs, labelled
with the equivalent RPC's name and the gRPC code name of the outcome.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from .. import metrics
from ..admission import ADMISSION, CUT
from ..errors import InvalidInput, RequestTooLarge, ShuttingDown, http_status_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A caller's time budget for one call, in milliseconds: TF Serving's REST API has no
# deadline of its own, and this one header serves both REST APIs alike.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
JSON = "application/json"
# The largest body the app accepts (its client_max_size), for error messages.
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


def counted(api: str, method: str, impl: Handler) -> Handler:
    """`impl` timed and counted as (api, method), its domain errors answered as JSON."""
    seconds = metrics.REQUEST_SECONDS.labels(api, method)

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        task = None
        metrics.IN_FLIGHT.inc()
        try:
            task = ADMISSION.enter()  # ShuttingDown (503) once the server stops admitting
            return await impl(request)
        except asyncio.CancelledError:
            if not ADMISSION.was_cut(task):
                code = grpc.StatusCode.CANCELLED  # the client went away
                raise
            if task is not None and sys.version_info >= (3, 11):
                task.uncancel()  # our own cancellation at the end of the grace period
            status, code, message = http_status_of(ShuttingDown(CUT))
            return error_response(status, message)
        except Exception as error:
            status, code, message = http_status_of(error)
            return error_response(status, message)
        finally:
            ADMISSION.leave(task)
            metrics.IN_FLIGHT.dec()
            seconds.observe(time.perf_counter() - started)
            metrics.REQUESTS.labels(api, method, code.name).inc()

    return handle


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json_bytes(body), status=status, content_type=JSON)


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(
            f"the request body exceeds {request.app[MAX_BODY_BYTES]} bytes; split the batch"
        ) from None


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


def number_array(values: Any, what: str) -> np.ndarray:
    """JSON numbers (nested lists, rectangular) as an array; clear errors otherwise."""
    try:
        array = np.array(values)
    except ValueError:
        raise InvalidInput(f"{what} is not a rectangular array of numbers") from None
    if array.dtype.kind not in "iuf":
        if array.dtype.kind == "O":
            raise InvalidInput(f"{what} is not a rectangular array of numbers")
        raise InvalidInput(f"{what} must hold numbers, got {array.dtype.kind!r}-kind values")
    return array


def pixel_bytes(array: np.ndarray, dtype: str, what: str) -> bytes:
    """Numbers as the little-endian bytes of the core's dtype: uint8 must be whole 0..255."""
    if dtype == "uint8":
        whole = array.dtype.kind != "f" or bool(np.array_equal(array, np.round(array)))
        if not whole or (array.size and (array.min() < 0 or array.max() > 255)):
            raise InvalidInput(f"{what}: uint8 pixels must be whole numbers 0..255")
        return array.astype(np.uint8).tobytes()
    return array.astype("<f4").tobytes()
