"""A worker's end of the link to its supervisor (server/workers.py has the other end).

Pipes: the worker's stdout carries status lines up ("ready", "serving", "failed <error>");
its stdin carries "serve" down, and its end (the supervisor is gone, even by kill -9)
stops the worker as SIGTERM does. Workers log to the inherited stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .settings import Settings

if TYPE_CHECKING:
    from grpc_health.v1._async import HealthServicer

WORKER_FLAG = "--worker"
SETTINGS_ENV = "MNIST_WORKER_SETTINGS"
# Each worker also says SERVING for this name + its index, and NOT_FOUND for the others':
# a health check on a connection tells which worker that connection reached.
WORKER_HEALTH_PREFIX = "mnist_serving.worker."


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
        if (
            len(argv) != 1
            or not (argv[0].isascii() and argv[0].isdigit())
            or SETTINGS_ENV not in os.environ
        ):
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
