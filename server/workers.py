"""Several server processes on one port: the supervisor (spawn, watch, restart, drain).
A worker is the one-process server of app.py; worker_link.py is its end of the pipes.

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

The supervisor knows processes and ports, not protocols: it imports nothing of the request
path (only the metrics listener, for --metrics-port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import StartupError
from .settings import Settings
from .worker_link import SETTINGS_ENV, WORKER_FLAG

logger = logging.getLogger(__name__)

# The ports every worker serves; settings with port 0 get one picked here, shared by all.
SHARED_PORTS = ("port", "http_port", "health_port")
FIRST_BACKOFF = 0.5  # seconds before the first restart of a worker that died
MAX_BACKOFF = 30.0
BACKOFF_RESET = 60.0  # a worker that lived this long restarts after FIRST_BACKOFF again
KILL_MARGIN = 60.0  # seconds past --grace-period after which a draining worker is killed


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
        from .auth import Authenticator, KeysFileError
        from .listener import HttpListener, metrics_application

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
                auth = None
                if self.settings.metrics_auth and self.settings.auth_keys is not None:
                    try:
                        auth = Authenticator(self.settings.auth_keys, metrics_auth=True)
                    except KeysFileError as error:
                        raise StartupError(str(error)) from None
                listener = HttpListener(metrics_application(auth), 0)
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
        from . import metrics  # after supervise() set the multiprocess dir

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
        from . import metrics  # after supervise() set the multiprocess dir

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
