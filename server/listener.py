"""An aiohttp application on a port of its own, and the /metrics page.

The HTTP port's app (api/http.py) and the supervisor's --metrics-port both run through
HttpListener; the supervisor imports only this module, never the request path.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from . import metrics


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    # content_type carries its own charset parameter, so it goes in as a raw header.
    return web.Response(body=body, headers={"Content-Type": content_type})


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
        # handler_cancellation: a client that hangs up cancels its call's handler, as gRPC
        # does, so the call is counted CANCELLED and leaves the batch queue.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=grace,
            handler_cancellation=True,
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
