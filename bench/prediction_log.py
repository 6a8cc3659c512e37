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
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.server.call_context import Call
from mnist_serving.server.launcher import ServerProcess
from mnist_serving.server.prediction_log import PredictionLog
from mnist_serving.server.runtimes.base import Prediction
from mnist_serving.server.settings import Settings

from .harness import Row, Stats, load, print_table, row, write_json

BATCH = 256
BATCH_CLIENTS = 4


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


def images_of(stats: Stats) -> float:
    return float(stats["images_per_s"] * stats["seconds"])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    # Rounds of every setting in turn: each ratio is the median over the rounds of
    # (setting / off of the same round), so that a neighbour's burst on a shared machine
    # lands in one round's figures, not in one setting's.
    # The server's CPU seconds per image served, per run (all its threads): less swayed by
    # the neighbours of a shared machine than the rates are.
    cpu: dict[tuple[str, int], list[float]] = {(n, i): [] for n in settings for i in (1, BATCH)}
    single: dict[str, list[Stats]] = {name: [] for name in settings}
    batch: dict[str, list[Stats]] = {name: [] for name in settings}
    try:
        for round_number in range(args.rounds):
            for name, flags in settings.items():
                server = ServerProcess(args.model_dir, "--poll-interval", "0", *flags)
                try:
                    print(f"round {round_number + 1}: {name} ...", file=sys.stderr)
                    pid = server.process.pid
                    spent = cpu_seconds(pid)
                    stats = load(server.target, 1, args.clients, args.seconds, connections=4)
                    cpu[name, 1].append((cpu_seconds(pid) - spent) / images_of(stats))
                    single[name].append(stats)
                    spent = cpu_seconds(pid)
                    stats = load(server.target, BATCH, BATCH_CLIENTS, args.seconds)
                    cpu[name, BATCH].append((cpu_seconds(pid) - spent) / images_of(stats))
                    batch[name].append(stats)
                    dropped = [
                        value
                        for (metric, _), value in server.scrape().items()
                        if metric == "mnist_prediction_log_dropped_total"
                    ]
                    if any(dropped):
                        print(f"  {name}: rows dropped {sum(dropped):.0f}", file=sys.stderr)
                finally:
                    server.stop()
    finally:
        receiver.stop()
    print(f"  CloudEvents POSTs received: {receiver.posts}", file=sys.stderr)
    for (name, images), runs in cpu.items():
        off = statistics.median(cpu["off", images])
        print(
            f"  server CPU per image, {images}-image calls, {name}: "
            f"{statistics.median(runs) / off:.2f} x off (median of {len(runs)})",
            file=sys.stderr,
        )
    shutil.rmtree(folder)
    targets = {
        "off again": None,
        "log dir 1.0": 0.9,
        "log dir 1.0 + inputs": None,
        "log url 1.0": None,
    }
    names = {
        "off again": ("P0a", "P0b"),
        "log dir 1.0": ("P1", "P2"),
        "log dir 1.0 + inputs": ("P3", "P4"),
        "log url 1.0": ("P5", "P6"),
    }
    rows: list[Row] = []

    def median_ratio(runs: dict[str, list[Stats]], name: str, figure: str) -> float:
        return float(
            statistics.median(
                on[figure] / off[figure] for on, off in zip(runs[name], runs["off"], strict=True)
            )
        )

    def middle(runs: list[Stats], figure: str) -> Stats:
        """The run whose figure is the median (the row's absolute figures)."""
        return sorted(runs, key=lambda stats: stats[figure])[len(runs) // 2]

    off_single, off_batch = middle(single["off"], "req_per_s"), middle(batch["off"], "images_per_s")
    for name, target in targets.items():
        first, second = names[name]
        rows.append(
            row(first, f"{name}: 1 image, {args.clients} clients: req/s / off req/s "
                f"(median of {args.rounds} rounds)", middle(single[name], "req_per_s"), "off",
                off_single, median_ratio(single, name, "req_per_s"), target)
        )  # fmt: skip
        rows.append(
            row(second, f"{name}: batch-{BATCH} uint8, {BATCH_CLIENTS} clients: images/s / "
                f"off images/s (median of {args.rounds} rounds)",
                middle(batch[name], "images_per_s"), "off", off_batch,
                median_ratio(batch, name, "images_per_s"), target)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prediction_log", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--clients", type=int, default=64, help="single-image clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--rounds", type=int, default=3, help="every setting, this many times")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    args = parser.parse_args(argv)
    settings = {
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "rounds": args.rounds,
        "usable_cpus": len(os.sched_getaffinity(0)),
    }
    rows = run(args)
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
