"""`python -m bench.prediction_log --model-dir DIR`: what the prediction log costs, ratios
side by side in one run (issue 24's benchmark).

One server per setting per round, the same load on each (single images from `--clients` clients;
batch-256 requests from 4 clients), each figure divided by the same figure with the log off:
  P0a/P0b  off again, run last: how far two identical runs differ on this machine
  P1/P2    --prediction-log DIR at sample rate 1.0 (every image a Parquet row)
  P3/P4    the same with --log-inputs (784 bytes more per row)
  P5/P6    --prediction-log-url at sample rate 1.0, 64 events per POST (batched mode), to a
           CloudEvents receiver in this process that answers at once (a figure to read:
           the receiver shares the cores)
Before the servers: observe()'s own cost per call, measured in this process (the part of
the log that runs on the event loop, on the call's path), for 1 and 256 images.
Read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.server.call_context import Call
from mnist_serving.server.prediction_log import PredictionLog
from mnist_serving.server.runtimes.base import Prediction
from mnist_serving.server.settings import Settings

from .harness import BATCH, Row, rounds, rounds_main


class Receiver:
    """A CloudEvents receiver on a free loopback port that counts POSTs and answers 202."""

    def __init__(self) -> None:
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def observe_microseconds(images: int, calls: int, folder: Path) -> float:
    """observe()'s cost per call (µs), with the folder sink writing meanwhile."""
    values: dict[str, Any] = {"prediction_log": folder, "prediction_log_queue_size": 10**7}
    log = PredictionLog(Settings(**values), lambda version: None)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(images, 28, 28), dtype=np.uint8)
    probabilities = rng.random((images, 10), dtype=np.float32)
    prediction = Prediction(probabilities, probabilities.argmax(axis=1))
    call = Call("native", "Predict", request_id="0123456789abcdef0123456789abcdef")
    for _ in range(100):
        log.observe(call, batch, prediction, 1)
    started = time.perf_counter()
    for _ in range(calls):
        log.observe(call, batch, prediction, 1)
    seconds = time.perf_counter() - started
    log.close()
    return seconds / calls * 1e6


def run(args: argparse.Namespace) -> list[Row]:
    folder = Path(tempfile.mkdtemp(prefix="mnist-bench-predlog-"))
    for images in (1, BATCH):
        cost = observe_microseconds(images, 20000 if images == 1 else 2000, folder / "micro")
        print(f"  observe(): {cost:.1f} us per call of {images} image(s)", file=sys.stderr)
    receiver = Receiver()
    settings: dict[str, list[str]] = {
        "off": [],
        "log dir 1.0": ["--prediction-log", str(folder / "dir")],
        "log dir 1.0 + inputs": ["--prediction-log", str(folder / "inputs"), "--log-inputs"],
        "log url 1.0": ["--prediction-log-url", receiver.url, "--prediction-log-url-batch", "64"],
        "off again": [],  # the noise floor: the same server as the first, run last
    }

    def dropped(name: str, server: Any) -> None:
        rows = [
            value
            for (metric, _), value in server.scrape().items()
            if metric == "mnist_prediction_log_dropped_total"
        ]
        if any(rows):
            print(f"  {name}: rows dropped {sum(rows):.0f}", file=sys.stderr)

    try:
        measured = rounds(
            settings,
            args.model_dir,
            count=args.rounds,
            clients=args.clients,
            seconds=args.seconds,
            after=dropped,
        )
    finally:
        receiver.stop()
    print(f"  CloudEvents POSTs received: {receiver.posts}", file=sys.stderr)
    for name in settings:
        for images in (1, BATCH):
            print(
                f"  server CPU per image, {images}-image calls, {name}: "
                f"{measured.cpu_ratio(name, images):.2f} x off (median of {args.rounds})",
                file=sys.stderr,
            )
    shutil.rmtree(folder)
    return measured.rows(
        {
            "off again": ("P0a", "P0b", None),
            "log dir 1.0": ("P1", "P2", 0.9),
            "log dir 1.0 + inputs": ("P3", "P4", None),
            "log url 1.0": ("P5", "P6", None),
        },
        args.clients,
    )


def main(argv: list[str] | None = None) -> None:
    rounds_main("python -m bench.prediction_log", __doc__, run, argv)


if __name__ == "__main__":
    main()
