"""Run mnist-serve as a child process and wait until it serves: for the demo, the
benchmarks and the tests. Ports default to 0 (free ones); the real ones are read from the
server's "serving" log line. /metrics is on the HTTP port unless --metrics-port is given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path


class ServerProcess:
    """`mnist-serve` in its own process, returned once it serves (health SERVING)."""

    def __init__(
        self,
        model_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 180,
        python: str = sys.executable,
        prefix: Sequence[str] = (),
    ) -> None:
        """`prefix` goes before the command, e.g. ("ip", "netns", "exec", NAME) to serve
        from a network namespace (the tool must exec the command: signals reach it)."""
        self.model_dir = model_dir
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        command = [
            *prefix, python, "-m", "mnist_serving.server",
            "--model-dir", str(model_dir), "--host", host,
            "--port", "0", "--http-port", "0", *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.log_lines: list[str] = []
        self.port = self.http_port = self.metrics_port = 0
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if not self._started.wait(start_timeout) or not self.port:
            self.process.kill()
            raise RuntimeError("mnist-serve did not start:\n" + self.log)

    def _read_log(self) -> None:
        if self.process.stderr is None:
            raise RuntimeError("stderr is not piped")
        for line in self.process.stderr:
            self.log_lines.append(line)
            if not self.port and " msg=serving " in line:
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                self.port, self.http_port = int(fields["port"]), int(fields["http_port"])
                self.metrics_port = int(fields.get("metrics_port", self.http_port))
                self._started.set()
        self._started.set()  # exited: the constructor sees port 0 and reports the log

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the server's /metrics, keyed by (name, sorted labels)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=10) as answer:
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.stop()
