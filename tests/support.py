"""Helpers the tests share: a real server process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


class ServerProcess:
    """`mnist-serve` in its own process on free loopback ports, as operators run it."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.model_dir = model_dir
        command = [
            sys.executable, "-m", "mnist_serving.server",
            "--model-dir", str(model_dir), "--host", "127.0.0.1",
            "--port", "0", "--metrics-port", "0", *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log_lines: list[str] = []
        self.port = self.metrics_port = 0
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line)
            if " msg=serving " in line:
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                self.port, self.metrics_port = int(fields["port"]), int(fields["metrics_port"])
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.log_lines))
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait, and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._drain.join(5)
        return code
