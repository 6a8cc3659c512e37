"""Several server processes on one port: the supervisor (spawn, watch, restart, drain) and
a worker's end of the link to it. A worker is the one-process server of app.py.

A Python gRPC server keeps to about one core (the GIL), so `--workers N` runs N of them.
They share the gRPC port through SO_REUSEPORT: the kernel hands each new connection to
one of them, so a client spreads its calls by opening several connections. Each worker is
a fresh interpreter (`python -m mnist_serving.server --worker I`), never a fork of a
process holding gRPC or TensorFlow state, and loads and polls the model versions itself.

The supervisor is the process the user started. It binds the shared ports first (port 0
picks them), starts the workers, and logs "serving" (and lets the workers' health say
SERVING) only once every worker is ready. A worker that dies is started again with
backoff while the others keep serving (mnist_worker_restarts_total counts it); one that
exits before the server was ever ready stops the whole server with its error. SIGTERM or
SIGINT is forwarded to every worker, which drain as a lone server does. The supervisor
serves --metrics-port itself: every worker writes its values to the multiprocess files
(see metrics.py), and one page sums them.

Pipes: each worker's stdout carries status lines up ("ready", "serving", "failed <error>");
its stdin carries "serve" down, and its end (the supervisor is gone, even by kill -9)
stops the worker as SIGTERM does. Workers log to the inherited stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StartupError
from .settings import Settings
from .validation import decimal

if TYPE_CHECKING:
    from grpc_health.v1._async import HealthServicer

logger = logging.getLogger(__name__)

WORKER_FLAG = "--worker"
SETTINGS_ENV = "MNIST_WORKER_SETTINGS"
# Each worker also says SERVING for this name + its index, and NOT_FOUND for the others':
# a health check on a connection tells which worker that connection reached.
WORKER_HEALTH_PREFIX = "mnist_serving.worker."
# The ports every worker serves; settings with port 0 get one picked here, shared by all.
SHARED_PORTS = ("port", "http_port", "health_port")
FIRST_BACKOFF = 0.5  # seconds before the first restart of a worker that died
MAX_BACKOFF = 30.0
BACKOFF_RESET = 60.0  # a worker that lived this long restarts after FIRST_BACKOFF again
KILL_MARGIN = 60.0  # seconds past --grace-period after which a draining worker is killed


def usable_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota
    (rounded down, at least 1: a worker per fraction of a core would only be throttled)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, own_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path, own_cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup quota allows (v2 cpu.max, v1 cpu.cfs_quota_us), the
    tightest along this process's cgroup and its parents; None when there is no quota."""
    paths = ["/"]
    with contextlib.suppress(OSError):
        for line in own_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "" or "cpu" in controllers.split(","):
                paths.append(path)
    quotas: list[float] = []
    for path in paths:
        parts = Path(path.lstrip("/")).parts
        for depth in range(len(parts), -1, -1):
            below = Path(*parts[:depth]) if depth else Path()
            quotas.extend(_quota_in(cgroup_root / below))
            for v1 in ("cpu", "cpu,cpuacct"):
                quotas.extend(_quota_in(cgroup_root / v1 / below))
    return min(quotas) if quotas else None


def _quota_in(folder: Path) -> Iterable[float]:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        if quota != "max" and float(period) > 0:
            yield float(quota) / float(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = float((folder / "cpu.cfs_quota_us").read_text())
        period_us = float((folder / "cpu.cfs_period_us").read_text())
        if quota_us > 0 and period_us > 0:
            yield quota_us / period_us
    except (OSError, ValueError):
        pass


# --- the worker's side ---------------------------------------------------------------


class WorkerLink:
    """A worker's end of the pipes to its supervisor (see the module's docstring)."""

    def __init__(self, index: int) -> None:
        self.index = index
        # The status pipe is a private copy of stdout; stdout itself now goes to the log
        # stream, so nothing a library prints can garble a status line.
        self._up = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._go: asyncio.Event | None = None
        threading.Thread(target=self._listen, name="supervisor-link", daemon=True).start()

    @classmethod
    def from_command_line(cls, argv: list[str]) -> tuple[WorkerLink, Settings]:
        """`--worker I`, with the settings the supervisor put in SETTINGS_ENV."""
        if len(argv) != 1 or decimal(argv[0]) is None or SETTINGS_ENV not in os.environ:
            print(f"mnist-serve: {WORKER_FLAG} is for the supervisor's use", file=sys.stderr)
            raise SystemExit(2)
        settings = Settings.model_validate_json(os.environ.pop(SETTINGS_ENV))
        return cls(int(argv[0])), settings

    @property
    def health_name(self) -> str:
        return f"{WORKER_HEALTH_PREFIX}{self.index}"

    async def serve(self, health: HealthServicer, services: Iterable[str]) -> None:
        """Say ready, wait until the supervisor says every worker is, then say SERVING."""
        from grpc_health.v1 import health_pb2

        self._loop = asyncio.get_running_loop()
        self._go = asyncio.Event()
        self._send("ready")
        await self._go.wait()
        for service in ("", *services, self.health_name):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._send("serving")

    def failed(self, error: str) -> None:
        """Hand the start-up error to the supervisor, which reports it once for all."""
        self._send(f"failed {error}")

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: stdin's end stops us
            self._up.write(line.replace("\n", " ") + "\n")

    def _listen(self) -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader makes
        # the interpreter abort at exit.
        pending = b""
        while chunk := os.read(0, 256):
            *lines, pending = (pending + chunk).split(b"\n")
            if b"serve" in lines and self._loop is not None and self._go is not None:
                self._loop.call_soon_threadsafe(self._go.set)
        os.kill(os.getpid(), signal.SIGTERM)


# --- the supervisor ------------------------------------------------------------------


def supervise(settings: Settings) -> int:
    """Run `settings.workers` workers until SIGTERM or SIGINT; return the exit code."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess dir was set")
    # A fresh folder per run: files left by an earlier run would add to these counts.
    folder = tempfile.mkdtemp(prefix="mnist-serving-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        return asyncio.run(Supervisor(settings).run())
    except (StartupError, OSError) as error:
        logger.error("cannot start", extra={"error": str(error)})
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to host:port with SO_REUSEPORT, held while the
    server runs: port 0 picks a free port that the workers then share, and no other
    program can take it meanwhile. A port that something already listens on is refused
    here: SO_REUSEPORT would otherwise let the workers join that program's port."""
    bind_host = host.strip("[]") or "0.0.0.0"
    family, kind, _, _, address = socket.getaddrinfo(
        bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    held = socket.socket(family, kind)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(address)
    except OSError as error:
        held.close()
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    if port:
        probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)
        with socket.socket(family, kind) as probe:
            probe.settimeout(2)
            if probe.connect_ex((probe_host, port, *address[2:])) == 0:
                held.close()
                raise StartupError(f"cannot listen on {host}:{port}: another program serves it")
    return held


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None  # while it runs
    pid: int = 0  # the newest one's
    ready: bool = False
    serving: bool = False
    error: str = ""


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = [_Worker(index) for index in range(settings.workers)]
        self._held: list[socket.socket] = []
        self._changed = asyncio.Event()
        self._stopping = False
        self._serving = False  # every worker was serving at once: the server started
        self._failure = ""
        self._bad_exits: list[str] = []

    async def run(self) -> int:
        # After supervise() set the multiprocess dir: metrics objects are made at import.
        from .api.http import HttpListener, metrics_application

        listener: HttpListener | None = None

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            shared = {}
            for name in SHARED_PORTS:
                port = getattr(self.settings, name)
                if port is None:  # an optional port that is off
                    continue
                self._held.append(reserve_port(self.settings.host, port))
                shared[name] = self._held[-1].getsockname()[1]
            worker_settings = self.settings.model_copy(update=shared)
            if self.settings.metrics_port is not None:
                listener = HttpListener(metrics_application(), 0)
                shared["metrics_port"] = await listener.start(
                    self.settings.host, self.settings.metrics_port
                )
        except BaseException:
            self._release()
            raise
        env = {**os.environ, SETTINGS_ENV: worker_settings.model_dump_json()}
        tasks = [loop.create_task(self._keep(worker, env)) for worker in self.workers]
        await self._until(
            lambda: bool(self._failure) or self._stopping or all(w.serving for w in self.workers)
        )
        if not (self._failure or self._stopping):
            self._serving = True
            logger.info(
                "serving",
                extra={
                    **shared,
                    "workers": len(self.workers),
                    "pids": ",".join(str(w.process.pid) for w in self.workers if w.process),
                    "model": self.settings.model_name,
                },
            )
        await self._until(lambda: bool(self._failure) or self._stopping)
        self._stop_workers()
        _, late = await asyncio.wait(tasks, timeout=self.settings.grace_period + KILL_MARGIN)
        if late:
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    logger.warning("worker did not stop; killing it", extra=self._about(worker))
                    worker.process.kill()
        await asyncio.gather(*tasks)
        if listener is not None:
            await listener.stop()
        self._release()
        if self._failure:
            # Before SERVING, the one message for every worker that could not start.
            message = "no worker can start any more" if self._serving else "cannot start"
            logger.error(message, extra={"error": self._failure})
            return 1
        if self._bad_exits:
            logger.error("workers failed while stopping", extra={"workers": self._bad_exits})
            return 1
        logger.info("stopped")
        return 0

    async def _keep(self, worker: _Worker, env: dict[str, str]) -> None:
        try:
            await self._keep_running(worker, env)
        except Exception as error:  # e.g. no process can be started (EMFILE, ENOMEM)
            logger.exception("supervising a worker failed", extra={"child": worker.index})
            self._fail(f"supervising worker {worker.index} failed: {error}")

    async def _keep_running(self, worker: _Worker, env: dict[str, str]) -> None:
        """Run one worker, and start it again each time it dies, until the server stops."""
        from . import metrics

        backoff = FIRST_BACKOFF
        while True:
            started = time.monotonic()
            code = await self._run_once(worker, env)
            if self._stopping:
                if code not in (0, -signal.SIGTERM):
                    self._bad_exits.append(f"{worker.index}:{code}")
                return
            alive = [w for w in self.workers if w.process is not None and w.serving]
            if not self._serving or (not worker.ready and not alive):
                # It never started (bad model, port, memory): a restart would fail the same.
                self._fail(worker.error or f"worker {worker.index} exited with code {code}")
                return
            if time.monotonic() - started >= BACKOFF_RESET:
                backoff = FIRST_BACKOFF
            logger.warning(
                "worker died; restarting it",
                extra={
                    **self._about(worker),
                    "code": code,
                    "error": worker.error,
                    "in_seconds": backoff,
                },
            )
            await self._until(lambda: self._stopping, timeout=backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            if self._stopping:
                return
            metrics.WORKER_RESTARTS.inc()

    async def _run_once(self, worker: _Worker, env: dict[str, str]) -> int:
        from . import metrics

        worker.ready = worker.serving = False
        worker.error = ""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mnist_serving.server",
            WORKER_FLAG,
            str(worker.index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            # Out of the terminal's process group: Ctrl-C reaches the supervisor only,
            # which forwards it as SIGTERM.
            start_new_session=True,
        )
        worker.process, worker.pid = process, process.pid
        logger.info("worker started", extra=self._about(worker))
        if self._stopping:
            process.send_signal(signal.SIGTERM)
        if process.stdout is not None:
            async for line in process.stdout:
                self._on_status(worker, line.decode(errors="replace").rstrip("\n"))
        code = await process.wait()
        metrics.process_gone(process.pid)
        logger.log(
            logging.INFO if self._stopping else logging.WARNING,
            "worker exited",
            extra={**self._about(worker), "code": code},
        )
        worker.process = None
        worker.serving = False
        self._changed.set()
        return code

    def _on_status(self, worker: _Worker, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "ready":
            worker.ready = True
            if self._serving:  # a replacement joins at once
                self._tell(worker, "serve")
            elif all(w.ready for w in self.workers):
                for each in self.workers:
                    self._tell(each, "serve")
        elif word == "serving":
            worker.serving = True
            if self._serving:
                logger.info("worker replaced", extra=self._about(worker))
        elif word == "failed":
            worker.error = rest
        self._changed.set()

    def _tell(self, worker: _Worker, word: str) -> None:
        if worker.process is not None and worker.process.stdin is not None:
            with contextlib.suppress(OSError):
                worker.process.stdin.write(word.encode() + b"\n")

    def _on_signal(self, signum: int) -> None:
        logger.info("signal received", extra={"signal": signal.Signals(signum).name})
        self._stop_workers()

    def _stop_workers(self) -> None:
        if not self._stopping:
            self._stopping = True
            for worker in self.workers:
                if worker.process is not None and worker.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.send_signal(signal.SIGTERM)
        self._changed.set()

    def _fail(self, error: str) -> None:
        self._failure = self._failure or error
        self._changed.set()

    async def _until(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until `done()` (checked at each change of state) or `timeout` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _about(self, worker: _Worker) -> dict[str, Any]:
        return {"child": worker.index, "pid": worker.pid}

    def _release(self) -> None:
        for held in self._held:
            held.close()
        self._held.clear()
