"""Build and run the server: the grpc.aio server (services, health, reflection), the HTTP
port on the same event loop (REST APIs, /metrics), shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from . import tls
from .admission import ADMISSION
from .api import http, native, tfserving, v2
from .api.reflection import reflection_pool
from .core import InferenceCore
from .errors import StartupError
from .settings import Settings
from .versions import ModelRegistry

if TYPE_CHECKING:
    from .workers import WorkerLink

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


def grpc_options(settings: Settings, *, shared_port: bool = False) -> list[tuple[str, Any]]:
    """Message limits, and the connection hygiene that keeps one client from starving the
    rest (README, "Connection limits")."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Workers share the port (the kernel spreads connections over them); a lone
        # server must fail on a port that another server holds.
        ("grpc.so_reuseport", int(shared_port)),
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
        # GOAWAY after this long (gRPC adds +-10% jitter): the client reconnects, and the
        # kernel may hand the new connection to another worker. Calls in flight finish first.
        options.append(("grpc.max_connection_age_ms", ms(settings.max_connection_age)))
        options.append(("grpc.max_connection_age_grace_ms", ms(settings.grace_period)))
    return options


class ModelServer:
    """One server process: `await start()`, then `await stop()` (or SIGTERM via __main__).

    As one of several workers (`worker` set), it shares the ports with the others and says
    SERVING only once its supervisor says that every worker is ready; the supervisor serves
    --metrics-port (/metrics on the HTTP port shows the whole server from any worker).
    """

    def __init__(self, settings: Settings, worker: WorkerLink | None = None) -> None:
        self.settings = settings
        self.worker = worker
        # One inference thread: TensorFlow already spreads one call over the cores, and
        # serialising calls is what lets the batcher merge the requests that queue meanwhile.
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.registry = ModelRegistry(settings, self._inference)
        self.core = InferenceCore(self.registry, settings)
        self.health = health_aio.HealthServicer()
        self._grpc = grpc.aio.server(options=grpc_options(settings, shared_port=worker is not None))
        self._health_grpc: grpc.aio.Server | None = None
        self._http = http.HttpListener(
            http.application(self.core, MAX_MESSAGE_BYTES, settings),
            settings.grace_period,
            reuse_port=worker is not None,
            ssl_context=(
                tls.ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                if settings.tls_cert is not None and settings.tls_key is not None
                else None
            ),
        )
        self._metrics_http: http.HttpListener | None = None
        self._poller: asyncio.Task[None] | None = None
        self.port = self.http_port = self.health_port = 0
        self.metrics_port: int | None = None
        self._serving = False
        self._stopping = False
        self._drain_over = asyncio.Event()
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Load the model, then open the ports; health says SERVING only once ready.

        The HTTP port opens first: during a long first load /v2/health/live answers and
        /v2/health/ready says 503.
        """
        ADMISSION.open()
        for service in ("", NATIVE_SERVICE):
            await self.health.set(service, NOT_SERVING)
        self.http_port = await self._http.start(self.settings.host, self.settings.http_port)
        logger.info("http listening", extra={"http_port": self.http_port})
        await self.registry.refresh()
        if not self.registry.served:
            raise StartupError(
                f"no loadable model version under {self.settings.model_dir} "
                "(expected <model-dir>/<version>/saved_model.pb; run mnist-train first)"
            )
        descriptors = (native.SERVICE, *tfserving.SERVICES, v2.SERVICE)
        services = tuple(service.full_name for service in descriptors)
        self._grpc.add_generic_rpc_handlers(
            (*native.handlers(self.core), *tfserving.handlers(self.core), *v2.handlers(self.core))
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        # Reflection reads one pool; the services come from two (see api/reflection.py).
        described = (
            *descriptors,
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        )
        reflection.enable_server_reflection(
            tuple(service.full_name for service in described),
            self._grpc,
            pool=reflection_pool(described),
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
        if self.settings.metrics_port is not None and self.worker is None:
            self._metrics_http = http.HttpListener(http.metrics_application(), 0)
            self.metrics_port = await self._metrics_http.start(
                self.settings.host, self.settings.metrics_port
            )
        await self._grpc.start()
        if self.worker is not None:  # waits until every worker is ready
            await self.worker.serve(self.health, services)
        for service in ("", *services):
            await self.health.set(service, SERVING)
        self.core.ready = self._serving = True
        if self.settings.poll_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self.registry.poll())
        logger.info(
            "serving" if self.worker is None else "worker serving",
            extra={
                "port": self.port,
                "http_port": self.http_port,
                **({} if self.metrics_port is None else {"metrics_port": self.metrics_port}),
                "tls": "mutual" if self.settings.tls_client_ca else self.settings.tls,
                **({"health_port": self.health_port} if self._health_grpc else {}),
                "model": self.settings.model_name,
                "versions": [s.version for s in self.registry.served],
                "runtimes": ",".join(
                    f"{s.version}:{s.model.runtime}" for s in self.registry.served
                ),
                "batching": self.settings.batching,
            },
        )

    async def _start_health_port(self, address: str) -> None:
        """A plaintext listener with only grpc.health.v1, for probes that cannot do TLS."""
        self._health_grpc = grpc.aio.server(
            options=[("grpc.so_reuseport", int(self.worker is not None))]
        )
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
        (UNAVAILABLE, HTTP 503) and let admitted ones finish within `grace`."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.settings.grace_period if grace is None else grace
        drain = self.settings.drain_delay
        logger.info("shutting down", extra={"drain_seconds": drain, "grace_seconds": grace})
        self.core.ready = False  # /v2/health/ready says 503 from now on
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
        await asyncio.gather(self._grpc.stop(STREAM_GRACE_SECONDS), self._http.stop())
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        await self.registry.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        self._inference.shutdown(wait=False)
        self._stopped.set()
        logger.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
