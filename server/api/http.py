"""The HTTP port's application: TF Serving's REST API (/v1), KServe v2 REST (/v2) and
/metrics, served by aiohttp (server/listener.py) on the gRPC server's own event loop.

Unknown paths and methods get a JSON error too; bodies beyond the size limit get 413 (at
once when their Content-Length says so), bodies slower than --http-body-timeout 408.
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from .. import metrics
from ..auth import ANONYMOUS
from ..call_context import ONLINE
from ..core import InferenceCore
from ..listener import guarded_metrics_page
from ..settings import Settings
from . import cors, feedback_rest, openapi, rest, tfserving_rest, ui, v2_rest
from .calls import CallPath

logger = logging.getLogger(__name__)

ROUTER_CODES = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}


@web.middleware
async def json_router_errors(request: web.Request, handler: rest.Handler) -> web.StreamResponse:
    """The router's own 404/405 as JSON, counted under api "http" (no per-path labels)."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = ROUTER_CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT)
        metrics.REQUESTS.labels("http", "unrouted", code.name, ONLINE, ANONYMOUS).inc()
        message = f"{request.method} {request.path}: {error.reason}"
        if error.status == 404:
            message += "; the APIs are under /v1/models/ (TF Serving) and /v2/ (KServe v2)"
        response = rest.error_response(error.status, message)
        if error.status == 405:
            response.headers["Allow"] = error.headers.get("Allow", "")
        return response


def application(
    core: InferenceCore,
    path: CallPath,
    max_body_bytes: int,
    body_timeout: float,
    settings: Settings | None = None,
) -> web.Application:
    """The HTTP port's app: both REST APIs through the server's call path, and /metrics;
    `settings` adds the pages (--ui) and CORS (--cors-origins)."""
    binding = rest.RestBinding(path)
    middlewares: list[Middleware] = [json_router_errors]
    if settings is not None and settings.cors_origins:
        middlewares.insert(0, cors.middleware(settings.cors_origins))  # errors get CORS too
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[rest.MAX_BODY_BYTES] = max_body_bytes
    app[rest.BODY_TIMEOUT] = body_timeout
    app.add_routes(
        [
            *tfserving_rest.routes(core, binding),
            *v2_rest.routes(core, binding),
            *feedback_rest.routes(core, binding),
            web.get("/metrics", guarded_metrics_page(path.auth)),
            *openapi.routes(),
        ]
    )
    if settings is not None and settings.ui:
        app.add_routes(ui.routes(settings.model_name, settings.ui_samples))
    return app
