"""CORS for browser pages on other origins that call the HTTP port (--cors-origins).

Off unless origins are given. A request from an allowed origin gets its answer with
Access-Control-Allow-Origin (errors included); a preflight (OPTIONS with
Access-Control-Request-Method) from one is answered 204 here, before the router, which
has no OPTIONS routes. Other requests are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import rest
from .v2_rest import HEADER_LENGTH

ANY = "*"
METHODS = "GET, POST"
# What the REST APIs read beyond the CORS-safelisted headers.
ALLOWED_HEADERS = ", ".join(["Content-Type", HEADER_LENGTH, rest.TIMEOUT_HEADER])
MAX_AGE_SECONDS = 600


def middleware(origins: Sequence[str]) -> Middleware:
    allowed = frozenset(origins)

    def allows(origin: str | None) -> bool:
        return origin is not None and (ANY in allowed or origin in allowed)

    @web.middleware
    async def cors(request: web.Request, handler: rest.Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if not allows(origin):
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
        else:
            response = await handler(request)
            response.headers["Access-Control-Expose-Headers"] = HEADER_LENGTH
        if ANY in allowed:
            response.headers["Access-Control-Allow-Origin"] = ANY
        else:
            response.headers["Access-Control-Allow-Origin"] = str(origin)
            response.headers.add("Vary", "Origin")
        return response

    return cors
