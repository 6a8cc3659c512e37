"""Build and run the grpc.aio server: services, health, reflection, metrics port, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from . import tls
from .api import native
from .api.rpc import ADMISSION
from .core import InferenceCore
from .errors import StartupError
from .settings import Settings
from .versions import ModelRegistry

logger = logging.getLogger(__name__)

# A 4096-image float32 batch is 12.8 MB; leave room for the largest allowed request.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
NATIVE_SERVICE = native.SERVICE.full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# On shutdown, once the last admitted call is done: how long no call may arrive before the
# transport is shut down (see rpc.Admission.drain), and how long streams (health Watch)
# then get before gRPC cancels them.
QUIET_SECONDS = 0.1
STREAM_GRACE_SECONDS = 1.0


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    """Message limits, and the connection hygiene that keeps one client from starving the
    rest (README, "Connection limits")."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_ping_interval)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if settings.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", ms(settings.max_connection_idle)))
    if settings.max_connection_age:
        options.append(("grpc.max_connection_age_ms", ms(settings.max_connection_age)))
        options.append(("grpc.max_connection_age_grace_ms", ms(settings.grace_period)))
    return options


class ModelServer:
    """One server process: `await start()`, then `await stop()` (or SIGTERM via __main__)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # One inference thread: TensorFlow already spreads one call over the cores, and
        # serialising calls is what lets the batcher merge the requests that queue meanwhile.
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.registry = ModelRegistry(settings, self._inference)
        self.core = InferenceCore(self.registry, settings)
        self.health = health_aio.HealthServicer()
        self._grpc = grpc.aio.server(options=grpc_options(settings))
        self._health_grpc: grpc.aio.Server | None = None
        self._metrics_http: WSGIServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._serving = False
        self._stopping = False
        self._drain_over = asyncio.Event()
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Load the model, then open the ports; health says SERVING only once ready."""
        ADMISSION.open()
        for service in ("", NATIVE_SERVICE):
            await self.health.set(service, NOT_SERVING)
        await self.registry.refresh()
        if not self.registry.served:
            raise StartupError(
                f"no loadable model version under {self.settings.model_dir} "
                "(expected <model-dir>/<version>/saved_model.pb; run mnist-train first)"
            )
        # Imported once a version has loaded: TF Serving's protos import the tensorflow
        # package, which load_model has imported by now (quietly unless --verbose-tensorflow).
        from .api import tfserving

        services = (NATIVE_SERVICE, *tfserving.SERVICE_NAMES)
        self._grpc.add_generic_rpc_handlers(
            (*native.handlers(self.core), *tfserving.handlers(self.core))
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        address = f"{self.settings.host}:{self.settings.port}"
        settings = self.settings
        if settings.tls_cert is not None and settings.tls_key is not None:
            files = tls.CertificateFiles(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
            self.port = self._grpc.add_secure_port(address, tls.server_credentials(files))
        else:
            self.port = self._grpc.add_insecure_port(address)
        if self.port == 0:
            raise StartupError(f"cannot listen on {address}")
        if settings.health_port is not None:
            await self._start_health_port(f"{settings.host}:{settings.health_port}")
        self._metrics_http, _ = start_http_server(self.settings.metrics_port, self.settings.host)
        self.metrics_port = self._metrics_http.server_port
        await self._grpc.start()
        for service in ("", *services):
            await self.health.set(service, SERVING)
        self._serving = True
        if self.settings.poll_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self.registry.poll())
        logger.info(
            "serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "tls": "mutual" if self.settings.tls_client_ca else self.settings.tls,
                **({"health_port": self.health_port} if self._health_grpc else {}),
                "model": self.settings.model_name,
                "versions": [s.version for s in self.registry.served],
                "batching": self.settings.batching,
            },
        )

    async def _start_health_port(self, address: str) -> None:
        """A plaintext listener with only grpc.health.v1, for probes that cannot do TLS."""
        self._health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(address)
        if self.health_port == 0:
            raise StartupError(f"cannot listen on {address}")
        await self._health_grpc.start()

    def end_drain(self) -> None:
        """Skip what is left of the drain delay (a second SIGTERM or Ctrl-C)."""
        self._drain_over.set()

    async def stop(self, grace: float | None = None) -> None:
        """Say NOT_SERVING; keep answering for the drain delay; then refuse new calls
        (UNAVAILABLE) and let admitted ones finish within `grace`."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.grace_period if grace is None else grace
        drain = self.settings.drain_delay
        logger.info("shutting down", extra={"drain_seconds": drain, "grace_seconds": grace})
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()  # also abandons a load in progress: see registry.loading
            await asyncio.gather(self._poller, return_exceptions=True)
        if drain > 0 and self._serving:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_over.wait(), drain)
        logger.info("refusing new calls", extra={"in_flight": ADMISSION.in_flight})
        cut = await ADMISSION.drain(grace, QUIET_SECONDS)
        if cut:
            logger.warning(
                "grace period over; calls still running answered UNAVAILABLE", extra={"calls": cut}
            )
        await self._grpc.stop(STREAM_GRACE_SECONDS)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        await self.registry.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._inference.shutdown(wait=False)
        self._stopped.set()
        logger.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
