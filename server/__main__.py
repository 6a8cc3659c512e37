"""`mnist-serve` / `python -m mnist_serving.server`: settings, logging, run until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from .errors import StartupError
from .fds import raise_open_files_limit
from .logs import configure_logging
from .settings import Settings
from .worker_link import WORKER_FLAG, WorkerLink
from .workers import supervise

logger = logging.getLogger("mnist_serving.server")


def parse_settings(argv: list[str]) -> Settings:
    """Settings from flags and MNIST_SERVING_* variables; exit code 2 on a bad value."""
    try:
        return CliApp.run(Settings, cli_args=argv)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"])
            where = f"--{field.replace('_', '-')}" if field else "settings"
            message = problem["msg"].removeprefix("Value error, ")
            print(f"mnist-serve: bad {where}: {message}", file=sys.stderr)
    except SettingsError as error:
        print(f"mnist-serve: {error}", file=sys.stderr)
    raise SystemExit(2)


async def serve(settings: Settings, worker: WorkerLink | None = None) -> bool:
    """Run until stopped; True when a model load was still running at the end."""
    logger.info(
        "starting",
        extra={"model_dir": str(settings.model_dir), "model": settings.model_name},
    )
    from .app import ModelServer  # imports grpc, numpy: after the settings are known good

    server = ModelServer(settings, worker)
    loop = asyncio.get_running_loop()
    starting = loop.create_task(server.start())
    stopping: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        logger.info("signal received", extra={"signal": signal.Signals(signum).name})
        starting.cancel()  # a no-op once started; before that, the first load may take long
        if stopping is None:
            stopping = loop.create_task(server.stop())
        else:
            server.end_drain()  # asked twice: stop accepting now; in-flight calls still finish

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await starting
    except asyncio.CancelledError:
        if stopping is None:
            raise
    await server.wait_stopped()
    return server.registry.loading


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # `mnist-serve keys add|list|remove`: manage an --auth-keys file
        from .auth import keys_main

        raise SystemExit(keys_main(argv[1:]))
    worker: WorkerLink | None = None
    if argv[:1] == [WORKER_FLAG]:
        worker, settings = WorkerLink.from_command_line(argv[1:])
        configure_logging(settings.log_level, str(worker.index))
    else:
        settings = parse_settings(argv)
        configure_logging(settings.log_level, "supervisor" if settings.workers > 1 else None)
    if not settings.model_dir.is_dir():
        print(f"mnist-serve: model dir {settings.model_dir} does not exist", file=sys.stderr)
        raise SystemExit(2)
    before, after = raise_open_files_limit()  # each worker raises its own, the same way
    if after != before and worker is None:
        logger.info("open files limit raised", extra={"from": before, "to": after})
    if worker is None and settings.workers > 1:
        raise SystemExit(supervise(settings))
    try:
        load_abandoned = asyncio.run(serve(settings, worker))
        # Stopped cleanly: a repeated SIGTERM while the interpreter exits must not turn
        # exit code 0 into death by signal (the event loop's handlers are gone by now).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (StartupError, OSError) as error:
        if worker is not None:
            worker.failed(str(error))  # the supervisor reports it, once for every worker
        else:
            logger.error("cannot start", extra={"error": str(error)})
        raise SystemExit(1) from None
    if load_abandoned:
        # A SavedModel load cannot be interrupted, and Python joins the loader thread at
        # exit: a load stuck on a slow or hung file system would hold the shutdown forever.
        logger.warning("exiting while a model version was still loading")
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    main()
