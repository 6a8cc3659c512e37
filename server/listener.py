"""An aiohttp application on a port of its own, and the /metrics page.

The HTTP port's app (api/http.py) and the supervisor's --metrics-port both run through
HttpListener; the supervisor imports only this module, never the request path.

With ConnectionLimits (the HTTP port), every connection passes a door that aiohttp lacks:
a cap on open connections (beyond it, a new connection gets a 503 and is closed), and a
timeout for each request's headers (counted from the connection's opening, or from the
first byte of a request on a kept-alive connection). The body's own timeout, and refusing
a declared body over the size limit, are the HTTP binding's (api/rest.py).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import metrics
from .auth import Authenticator
from .errors import Unauthenticated


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    # content_type carries its own charset parameter, so it goes in as a raw header.
    return web.Response(body=body, headers={"Content-Type": content_type})


def guarded_metrics_page(auth: Authenticator | None) -> Handler:
    """/metrics, open; or, with --metrics-auth, for any valid key (Prometheus sends one with
    `authorization: {credentials_file: ...}`): 401 and a Bearer challenge without."""
    if auth is None or not auth.metrics_auth:
        return metrics_page

    async def page(request: web.Request) -> web.Response:
        try:
            auth.identify(request.headers)
        except Unauthenticated as error:
            return web.Response(
                body=json.dumps({"error": str(error)}).encode(),
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="mnist-serving"'},
            )
        return await metrics_page(request)

    return page


def metrics_application(auth: Authenticator | None = None) -> web.Application:
    """Only /metrics: for the optional separate --metrics-port listener."""
    app = web.Application()
    app.add_routes([web.get("/metrics", guarded_metrics_page(auth))])
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int  # open at once; more are refused as they arrive
    header_timeout: float  # seconds for a request's headers (and the TLS handshake)


def _refusal(max_connections: int) -> bytes:
    body = json.dumps(
        {"error": f"the server has {max_connections} connections open, its limit; retry"}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Door:
    """One listener's connections: how many are open, and each one's guard."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self.guards: dict[RequestHandler, _Guard] = {}
        self.refusal = _refusal(limits.max_connections)
        guards = self.guards

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            """A request's headers have arrived in full: its connection's timer stops."""
            guard = guards.get(request.protocol)
            if guard is None:
                return await handler(request)
            guard.busy(True)
            try:
                return await handler(request)
            finally:
                guard.busy(False)

        self.middleware = middleware


class _Guard(asyncio.Protocol):
    """One connection in front of aiohttp's protocol: counted, refused beyond the cap, and
    closed when a request's headers take longer than the header timeout."""

    def __init__(self, door: _Door, make_protocol: Callable[[], RequestHandler]) -> None:
        self._door = door
        self._make_protocol = make_protocol
        self._inner: RequestHandler | None = None  # None: refused
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        door = self._door
        if door.open >= door.limits.max_connections:
            metrics.HTTP_CONNECTIONS_CLOSED.labels("limit").inc()
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(door.refusal)
            transport.close()
            return
        door.open += 1
        metrics.HTTP_CONNECTIONS.inc()
        self._transport = transport
        self._inner = self._make_protocol()
        door.guards[self._inner] = self
        self._start_timer()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is None and not self._busy:  # the first byte of the next request
            self._start_timer()
        self._inner.data_received(data)

    def eof_received(self) -> None:  # the transport closes itself, as aiohttp's does
        if self._inner is not None:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._stop_timer()
        self._door.open -= 1
        metrics.HTTP_CONNECTIONS.dec()
        self._door.guards.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def busy(self, busy: bool) -> None:
        """A request is being handled (its headers are in), or no longer."""
        self._busy = busy
        self._stop_timer()

    def _start_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._door.limits.header_timeout, self._too_slow)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if not self._busy and self._transport is not None:
            metrics.HTTP_CONNECTIONS_CLOSED.labels("header_timeout").inc()
            self._transport.close()


class _GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with every connection behind a _Guard."""

    def __init__(
        self,
        runner: web.AppRunner,
        door: _Door,
        host: str,
        port: int,
        *,
        reuse_port: bool,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._door = door
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up
        door = self._door
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guard(door, server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=door.limits.header_timeout if self._ssl_context else None,
        )


class HttpListener:
    """One aiohttp app on one port: `port = await start(host, port)`, then `await stop()`."""

    def __init__(
        self,
        app: web.Application,
        grace: float,
        *,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        limits: ConnectionLimits | None = None,
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
        self._door = None if limits is None else _Door(limits)
        if self._door is not None:
            app.middlewares.insert(0, self._door.middleware)
        self._started = False

    async def start(self, host: str, port: int) -> int:
        self._started = True
        await self._runner.setup()
        site: web.BaseSite
        if self._door is None:
            site = web.TCPSite(
                self._runner, host, port, reuse_port=self._reuse_port, ssl_context=self._ssl_context
            )
        else:
            site = _GuardedSite(
                self._runner,
                self._door,
                host,
                port,
                reuse_port=self._reuse_port,
                ssl_context=self._ssl_context,
            )
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening, let calls in flight finish within the grace period."""
        if self._started:
            await self._runner.cleanup()
