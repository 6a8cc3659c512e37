"""The HTTP port: TF Serving's REST API (/v1), KServe v2 REST (/v2) and /metrics, served by
aiohttp on the gRPC server's own event loop.

Workers open the socket with SO_REUSEPORT so that they share the port (a lone server does
not, so that it fails on a port another server holds). Unknown paths and methods get a
JSON error too; bodies beyond the size limit get 413.
"""

from __future__ import annotations

import logging
import ssl

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from .. import metrics
from ..core import InferenceCore
from ..settings import Settings
from . import cors, openapi, rest, tfserving_rest, ui, v2_rest

logger = logging.getLogger(__name__)

ROUTER_CODES = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    # content_type carries its own charset parameter, so it goes in as a raw header.
    return web.Response(body=body, headers={"Content-Type": content_type})


@web.middleware
async def json_router_errors(request: web.Request, handler: rest.Handler) -> web.StreamResponse:
    """The router's own 404/405 as JSON, counted under api "http" (no per-path labels)."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = ROUTER_CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT)
        metrics.REQUESTS.labels("http", "unrouted", code.name).inc()
        message = f"{request.method} {request.path}: {error.reason}"
        if error.status == 404:
            message += "; the APIs are under /v1/models/ (TF Serving) and /v2/ (KServe v2)"
        response = rest.error_response(error.status, message)
        if error.status == 405:
            response.headers["Allow"] = error.headers.get("Allow", "")
        return response


def application(
    core: InferenceCore, max_body_bytes: int, settings: Settings | None = None
) -> web.Application:
    """The HTTP port's app; `settings` adds the pages (--ui) and CORS (--cors-origins)."""
    middlewares: list[Middleware] = [json_router_errors]
    if settings is not None and settings.cors_origins:
        middlewares.insert(0, cors.middleware(settings.cors_origins))  # errors get CORS too
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[rest.MAX_BODY_BYTES] = max_body_bytes
    app.add_routes(
        [
            *tfserving_rest.routes(core),
            *v2_rest.routes(core),
            web.get("/metrics", metrics_page),
            *openapi.routes(),
        ]
    )
    if settings is not None and settings.ui:
        app.add_routes(ui.routes(settings.model_name, settings.ui_samples))
    return app


def metrics_application() -> web.Application:
    """Only /metrics: for the optional separate --metrics-port listener."""
    app = web.Application()
    app.add_routes([web.get("/metrics", metrics_page)])
    return app


class HttpListener:
    """One aiohttp app on one port: `port = await start(host, port)`, then `await stop()`."""

    def __init__(
        self,
        app: web.Application,
        grace: float,
        *,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=grace
        )
        # Only workers share a port (the kernel spreads connections over them); a lone
        # server must fail on a port that another server holds.
        self._reuse_port = reuse_port
        self._ssl_context = ssl_context  # TLS on the HTTP port, as on the gRPC one
        self._started = False

    async def start(self, host: str, port: int) -> int:
        self._started = True
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host, port, reuse_port=self._reuse_port, ssl_context=self._ssl_context
        )
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening, let calls in flight finish within the grace period."""
        if self._started:
            await self._runner.cleanup()
