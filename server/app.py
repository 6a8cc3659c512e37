"""Build and run the server: the grpc.aio server (services, health, reflection), the HTTP
port on the same event loop (REST APIs, /metrics), shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mnist_serving.contract.reference import REFERENCE_KEY

from . import cpus, fds, tls, tracing
from .access_log import AccessLog
from .admission import Admission
from .api import http, native, tfserving, v2
from .api.calls import CallPath
from .api.reflection import reflection_pool
from .api.rpc import RpcBinding
from .auth import Authenticator, KeysFileError
from .core import InferenceCore
from .errors import StartupError
from .listener import ConnectionLimits, HttpListener, metrics_application
from .observers import Observer
from .prediction_log import PredictionLog
from .quality import Quality
from .settings import Settings
from .versions import ModelRegistry

if TYPE_CHECKING:
    from .worker_link import WorkerLink

logger = logging.getLogger(__name__)

# A 4096-image float32 batch is 12.8 MB; leave room for the largest allowed request.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
NATIVE_SERVICE = native.SERVICE.full_name
SERVED = (native.SERVICE, *tfserving.SERVICES, v2.SERVICE)  # the APIs, on the gRPC port
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# On shutdown, once the last admitted call is done: how long no call may arrive before the
# transport is shut down (see rpc.Admission.drain), and how long streams (health Watch)
# then get before gRPC cancels them.
QUIET_SECONDS = 0.1
STREAM_GRACE_SECONDS = 1.0
# After SIGTERM the server admits calls until none has arrived for QUIET_SECONDS, at most
# this long after the signal (or the drain delay, if longer): calls a client sent before
# the signal are answered, not refused (see Admission.settle; README, "Shutdown").
SETTLE_SECONDS = 1.0


def grpc_options(
    settings: Settings, *, shared_port: bool = False, max_connections: int = 0
) -> list[tuple[str, Any]]:
    """Message limits, and the connection hygiene that keeps one client from starving the
    rest (docs/operations/connection-limits.md). `max_connections`: the port's cap (0: none)."""

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
    if max_connections:
        # Beyond it gRPC closes each new connection as it arrives (see server/fds.py).
        options.append(("grpc.max_allowed_incoming_connections", max_connections))
    if settings.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", ms(settings.max_connection_idle)))
    if settings.max_connection_age:
        # GOAWAY after this long (gRPC adds +-10% jitter): the client reconnects, and the
        # kernel may hand the new connection to another worker. Calls in flight finish first.
        options.append(("grpc.max_connection_age_ms", ms(settings.max_connection_age)))
        options.append(("grpc.max_connection_age_grace_ms", ms(settings.grace_period)))
    return options


def build_grpc_server(
    settings: Settings,
    core: InferenceCore,
    path: CallPath,
    health: HealthServicer,
    *,
    shared_port: bool,
    max_connections: int = 0,
) -> tuple[grpc.aio.Server, tuple[str, ...]]:
    """The gRPC server with every API, health and reflection (no port yet), and the names of
    the services health reports on."""
    server = grpc.aio.server(
        options=grpc_options(settings, shared_port=shared_port, max_connections=max_connections)
    )
    rpc = RpcBinding(path)
    server.add_generic_rpc_handlers(
        (*native.handlers(core, rpc), *tfserving.handlers(core, rpc), *v2.handlers(core, rpc))
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Reflection reads one pool; the services come from two (see api/reflection.py).
    described = (
        *SERVED,
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
    reflection.enable_server_reflection(
        tuple(service.full_name for service in described), server, pool=reflection_pool(described)
    )
    return server, tuple(service.full_name for service in SERVED)


def tls_files(settings: Settings) -> tuple[Path, Path, Path | None] | None:
    """The TLS files both ports serve with (certificate, key, client CA), or None."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return settings.tls_cert, settings.tls_key, settings.tls_client_ca


def authenticator(settings: Settings) -> Authenticator | None:
    """The keys of --auth-keys (None when off); StartupError when the file is unusable."""
    if settings.auth_keys is None:
        return None
    try:
        return Authenticator(settings.auth_keys, settings.metrics_auth)
    except KeysFileError as error:
        raise StartupError(str(error)) from None


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
        # Batch-class chunks run on a thread of their own at a lower OS priority (--batch-nice):
        # when a chunk and the threads that answer online calls compete for a core, the OS
        # runs the online side first. The batcher still makes one model call at a time.
        self._batch_inference = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="inference-batch",
            initializer=cpus.lower_thread_priority,
            initargs=(settings.batch_nice,),
        )
        self.registry = ModelRegistry(settings, self._inference, self._batch_inference)
        # What watches every answer (server/observers.py): drift signals against each
        # version's training reference (server/quality.py) and the prediction log.
        self.quality = Quality(settings, self.registry)
        self.prediction_log = PredictionLog.from_settings(settings, self._reference_of)
        observers: list[Observer] = [self.quality] if settings.drift else []
        if self.prediction_log is not None:
            observers.append(self.prediction_log)
        self.core = InferenceCore(self.registry, settings, observers)
        # The door every call passes, and the per-call path around every call of every API.
        self.admission = Admission()
        self.access_log = (
            None
            if settings.access_log is None
            else AccessLog(
                settings.access_log,
                settings.access_log_sample_rate,
                settings.access_log_queue_size,
            )
        )
        self.auth = authenticator(settings)
        self.calls = CallPath(self.admission, self.access_log, self.auth)
        self.health = health_aio.HealthServicer()
        shared_port = worker is not None
        try:  # each port's share of the open-file limit (see server/fds.py)
            self.max_connections = fds.connection_cap(
                settings.max_connections, fds.open_files_limit()
            )
        except ValueError as error:
            raise StartupError(str(error)) from None
        self._grpc, self._services = build_grpc_server(
            settings,
            self.core,
            self.calls,
            self.health,
            shared_port=shared_port,
            max_connections=self.max_connections,
        )
        self._tls = tls_files(settings)
        self._health_grpc: grpc.aio.Server | None = None
        self._http = HttpListener(
            http.application(
                self.core, self.calls, MAX_MESSAGE_BYTES, settings.http_body_timeout, settings
            ),
            settings.grace_period,
            reuse_port=shared_port,
            ssl_context=None if self._tls is None else tls.ssl_context(*self._tls),
            limits=ConnectionLimits(self.max_connections, settings.http_header_timeout),
        )
        self._metrics_http: HttpListener | None = None
        self._poller: asyncio.Task[None] | None = None
        self._drift: asyncio.Task[None] | None = None
        self.port = self.http_port = self.health_port = 0
        self.metrics_port: int | None = None
        self._serving = False
        self._stopping = False
        self._drain_over = asyncio.Event()
        self._stopped = asyncio.Event()

    def _reference_of(self, version: int) -> dict[str, Any] | None:
        """The training reference in a loaded version's metrics.json (None without one)."""
        reference = self.registry.report_of(version).get(REFERENCE_KEY)
        return reference if isinstance(reference, dict) else None

    async def start(self) -> None:
        """Load the model, then open the ports; health says SERVING only once ready.

        The HTTP port opens first: during a long first load /v2/health/live answers and
        /v2/health/ready says 503.
        """
        self.admission.open()
        self._log_auth()
        if tracing.start(self.settings.tracing):
            logger.info("tracing on: spans exported over OTLP as the OTEL_* variables say")
        await self._say(NOT_SERVING, "", NATIVE_SERVICE)
        await self._open_http_port()
        await self._load_model()
        await self._open_grpc_ports()
        if self.worker is not None:  # waits until every worker is ready
            await self.worker.serve(self.health, self._services)
        await self._say(SERVING, "", *self._services)
        self.core.ready = self._serving = True
        if self.settings.poll_interval > 0:
            self._poller = asyncio.get_running_loop().create_task(self.registry.poll())
        if self.settings.drift:
            self._drift = asyncio.get_running_loop().create_task(self.quality.run())
        self._log_serving()

    async def _say(self, status: Any, *services: str) -> None:
        for service in services:
            await self.health.set(service, status)

    async def _open_http_port(self) -> None:
        self.http_port = await self._http.start(self.settings.host, self.settings.http_port)
        logger.info("http listening", extra={"http_port": self.http_port})

    async def _load_model(self) -> None:
        await self.registry.refresh()
        if not self.registry.served:
            raise StartupError(
                f"no loadable model version under {self.settings.model_dir} "
                "(expected <model-dir>/<version>/saved_model.pb; run mnist-train first)"
            )

    async def _open_grpc_ports(self) -> None:
        """The gRPC port (TLS when set), the health port, the metrics port; then serve."""
        settings = self.settings
        address = f"{settings.host}:{settings.port}"
        if self._tls is None:
            self.port = self._grpc.add_insecure_port(address)
        else:
            files = tls.CertificateFiles(*self._tls)
            self.port = self._grpc.add_secure_port(address, tls.server_credentials(files))
        if self.port == 0:
            raise StartupError(f"cannot listen on {address}")
        if settings.health_port is not None:
            await self._start_health_port(f"{settings.host}:{settings.health_port}")
        if settings.metrics_port is not None and self.worker is None:
            self._metrics_http = HttpListener(metrics_application(self.auth), 0)
            self.metrics_port = await self._metrics_http.start(settings.host, settings.metrics_port)
        await self._grpc.start()

    def _log_auth(self) -> None:
        if self.auth is None:
            return
        logger.info(
            "api keys on",
            extra={"keys": len(self.auth.names), "metrics_auth": self.settings.metrics_auth},
        )
        if not self.settings.tls:
            logger.warning(
                "api keys over plaintext: tokens cross the network readable by anyone on "
                "the path; serve with --tls-cert/--tls-key or behind a TLS proxy"
            )

    def _log_serving(self) -> None:
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
                "max_connections": self.max_connections,
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
        """Say NOT_SERVING; keep answering for the drain delay and until the calls sent
        before the signal have arrived; then refuse new calls (UNAVAILABLE, HTTP 503) and
        let admitted ones finish within `grace`."""
        if self._stopping:
            return
        self._stopping = True
        signalled = time.monotonic()
        grace = self.settings.grace_period if grace is None else grace
        drain = self.settings.drain_delay
        logger.info("shutting down", extra={"drain_seconds": drain, "grace_seconds": grace})
        self.core.ready = False  # /v2/health/ready says 503 from now on
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()  # also abandons a load in progress: see registry.loading
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._serving:
            await self._keep_admitting(signalled, drain)
        logger.info("refusing new calls", extra={"in_flight": self.admission.in_flight})
        cut = await self.admission.drain(grace, QUIET_SECONDS)
        if cut:
            logger.warning(
                "grace period over; calls still running answered UNAVAILABLE", extra={"calls": cut}
            )
        await asyncio.gather(self._grpc.stop(STREAM_GRACE_SECONDS), self._http.stop())
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._drift is not None:
            self._drift.cancel()
            await asyncio.gather(self._drift, return_exceptions=True)
        self.quality.close()  # the last images reach the histograms
        await self.registry.close()
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        self._inference.shutdown(wait=False)
        self._batch_inference.shutdown(wait=False)
        # The last prediction log rows, access log lines and spans: written and exported
        # before the exit.
        if self.prediction_log is not None:
            await asyncio.to_thread(self.prediction_log.close)
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)
        await asyncio.to_thread(tracing.stop)
        self._stopped.set()
        logger.info("stopped")

    async def _keep_admitting(self, signalled: float, drain: float) -> None:
        """The drain delay, then until the calls sent before the signal have arrived; a
        second signal (end_drain) ends both."""
        ended = asyncio.ensure_future(self._drain_over.wait())
        try:
            if drain > 0:
                await asyncio.wait({ended}, timeout=drain)
            if not ended.done():
                until = signalled + max(drain, SETTLE_SECONDS)
                settled = asyncio.ensure_future(self.admission.settle(QUIET_SECONDS, until))
                await asyncio.wait({ended, settled}, return_when=asyncio.FIRST_COMPLETED)
                settled.cancel()
        finally:
            ended.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
