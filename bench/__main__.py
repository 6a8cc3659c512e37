"""`python -m bench --model-dir DIR [--json FILE]`: ratios measured side by side in one run.

Starts what it needs on loopback (the server with batching on and off, with each runtime,
a bare grpc.aio echo server with the same API), drives each with a load generator in its
own process, and prints one row per comparison. Machines here are shared and noisy: read
the ratios, which compare runs made minutes apart on the same machine, not the absolute
figures.

Rows B*: the serving path (batching, the API's cost), with the server's defaults.
Rows L*: the runtimes side by side: the SavedModel and its LiteRT twin called in process,
the server with --runtime auto (twins) and --runtime tensorflow, the echo server at the
same payloads (784 B and 200 KB), start-up time and resident memory. `--rows B` or
`--rows L` runs one group. The model dir's newest version must have a twin for L*.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mnist_serving.contract import existing_versions
from mnist_serving.server.launcher import ServerProcess
from mnist_serving.server.runtimes import RuntimeSetting

from .echo import EchoProcess
from .harness import NAN, Row, Stats, load, pixels, print_table, row, rss_mb, write_json


def in_process_images_per_s(
    model_dir: Path, batch: int, seconds: float, runtime: RuntimeSetting = "tensorflow"
) -> Stats:
    """The model's own speed at `batch`, called in this process as the server calls it:
    the SavedModel through TensorFlow, or (runtime "litert") its twin."""
    from mnist_serving.server.runtimes import load_model

    version = _newest(model_dir)
    model = load_model(model_dir / str(version), "mnist", version, runtime)
    images = pixels(batch)
    for _ in range(20):
        model.predict(images)
    calls: list[float] = []
    stop_at = time.perf_counter() + seconds
    while (start := time.perf_counter()) < stop_at:
        model.predict(images)
        calls.append(time.perf_counter() - start)
    elapsed = sum(calls)
    return {
        "req_per_s": len(calls) / elapsed,
        "images_per_s": len(calls) * batch / elapsed,
        "p50_ms": float(np.percentile(calls, 50) * 1000),
        "p99_ms": float(np.percentile(calls, 99) * 1000),
    }


def scoring_images_per_s(target: str, runs: int = 5) -> Stats:
    """`mnist-client score` of the 10k MNIST test images, end to end; median of `runs`.

    The images are MNIST_PATH's test set when it is set, random digits-sized noise if not.
    """
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "test.npz"
        data = os.environ.get("MNIST_PATH")
        if data and Path(data).exists():
            with np.load(data) as mnist:
                np.savez(source, x_test=mnist["x_test"], y_test=mnist["y_test"])
        else:
            np.savez(source, x_test=pixels(10_000))
        rates = []
        for _ in range(runs):
            job = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mnist_serving.client",
                    "score",
                    "--target",
                    target,
                    "--input",
                    str(source),
                    "--output",
                    str(Path(folder) / "scores.csv"),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            found = re.search(r"scored (\d+) images in [\d.]+ s \((\d+) images/s", job.stdout)
            if found is None:
                raise RuntimeError(f"no summary in mnist-client score's output:\n{job.stdout}")
            rates.append(float(found.group(2)))
    rate = statistics.median(rates)
    return {
        "req_per_s": float("nan"),
        "images_per_s": rate,
        "p50_ms": float("nan"),
        "p99_ms": float("nan"),
    }


def run(model_dir: Path, seconds: float, server_args: list[str]) -> list[Row]:
    rows: list[Row] = []
    print(f"in-process SavedModel, batch 256, {seconds:.0f} s ...", file=sys.stderr)
    in_process = in_process_images_per_s(model_dir, 256, seconds)
    echo = EchoProcess()
    batching = ServerProcess(model_dir, "--poll-interval", "0", *server_args)
    unbatched = ServerProcess(model_dir, "--poll-interval", "0", "--no-batching", *server_args)
    try:
        print("B1 batch-256 requests, 4 clients ...", file=sys.stderr)
        b1 = load(batching.target, 256, 4, seconds)
        rows.append(
            row(
                "B1",
                "batch-256 uint8, 4 clients: served images/s / in-process images/s",
                b1,
                "in-process SavedModel, batch 256",
                in_process,
                b1["images_per_s"] / in_process["images_per_s"],
                0.9,
            )
        )
        print("B2 single images, 1 client ...", file=sys.stderr)
        echo_1 = load(echo.target, 1, 1, seconds)
        b2 = load(batching.target, 1, 1, seconds)
        rows.append(
            row(
                "B2",
                "1 image, 1 client: served p50 / echo p50",
                b2,
                "bare grpc.aio echo server",
                echo_1,
                b2["p50_ms"] / echo_1["p50_ms"],
                "<=1.2",
            )
        )
        print("B3 single images, 64 clients ...", file=sys.stderr)
        echo_64 = load(echo.target, 1, 64, seconds)
        b3 = load(batching.target, 1, 64, seconds)
        off_64 = load(unbatched.target, 1, 64, seconds)
        rows.append(
            row(
                "B3a",
                "1 image, 64 clients: served req/s / echo req/s",
                b3,
                "bare grpc.aio echo server",
                echo_64,
                b3["req_per_s"] / echo_64["req_per_s"],
                0.9,
            )
        )
        rows.append(
            row(
                "B3b",
                "1 image, 64 clients: batching on req/s / batching off req/s",
                b3,
                "same server, --no-batching",
                off_64,
                b3["req_per_s"] / off_64["req_per_s"],
                5.0,
            )
        )
        print("B4 batch scoring of the 10k test images ...", file=sys.stderr)
        b4 = scoring_images_per_s(batching.target)
        rows.append(
            row(
                "B4",
                "mnist-client score of 10k test images, end to end: images/s / B1 served images/s",
                b4,
                "B1: the server's batch-256 throughput",
                b1,
                b4["images_per_s"] / b1["images_per_s"],
                0.8,
            )
        )
    finally:
        batching.stop()
        unbatched.stop()
        echo.stop()
    return rows


def started(model_dir: Path, *args: str) -> tuple[ServerProcess, float]:
    """A server and the seconds from its process start to health SERVING (the "serving"
    line is logged right after health says so)."""
    begun = time.perf_counter()
    server = ServerProcess(model_dir, "--poll-interval", "0", *args)
    return server, time.perf_counter() - begun


def figure(value: float, **stats: float) -> Stats:
    return {"req_per_s": NAN, "images_per_s": NAN, "p50_ms": NAN, "p99_ms": NAN, **stats} | {
        "value": value
    }


def run_runtimes(model_dir: Path, seconds: float, server_args: list[str]) -> list[Row]:
    rows: list[Row] = []
    print(
        f"L1 in-process SavedModel and twin, batch 256, {seconds:.0f} s each ...", file=sys.stderr
    )
    saved_model = in_process_images_per_s(model_dir, 256, seconds, "tensorflow")
    twin = in_process_images_per_s(model_dir, 256, seconds, "litert")
    saved_model_1 = in_process_images_per_s(model_dir, 1, seconds, "tensorflow")
    twin_1 = in_process_images_per_s(model_dir, 1, seconds, "litert")
    rows.append(
        row("L1a", "in process, batch 256: twin images/s / SavedModel images/s", twin,
            "in-process SavedModel, batch 256", saved_model,
            twin["images_per_s"] / saved_model["images_per_s"], None)
    )  # fmt: skip
    rows.append(
        row("L1b", "in process, batch 1: twin p50 / SavedModel p50", twin_1,
            "in-process SavedModel, batch 1", saved_model_1,
            twin_1["p50_ms"] / saved_model_1["p50_ms"], None)
    )  # fmt: skip
    echo = EchoProcess()
    lean, lean_start = started(model_dir, "--runtime", "auto", *server_args)
    heavy, heavy_start = started(model_dir, "--runtime", "tensorflow", *server_args)
    try:
        for name, server in (("auto", lean), ("tensorflow", heavy)):
            if f"runtimes={_newest(model_dir)}:" not in server.log:
                raise RuntimeError(f"the {name} server's log names no runtime:\n{server.log}")
        if f"runtimes={_newest(model_dir)}:litert" not in lean.log:
            raise RuntimeError(f"--runtime auto does not serve a twin (is there one?):\n{lean.log}")
        print("L2 batch-256 requests, 4 clients, each runtime ...", file=sys.stderr)
        auto_256 = load(lean.target, 256, 4, seconds)
        tf_256 = load(heavy.target, 256, 4, seconds)
        rows.append(
            row("L2a", "batch-256 uint8, 4 clients, --runtime auto: served images/s / in-process "
                "SavedModel images/s", auto_256, "in-process SavedModel, batch 256", saved_model,
                auto_256["images_per_s"] / saved_model["images_per_s"], 1.0)
        )  # fmt: skip
        rows.append(
            row("L2b", "batch-256 uint8, 4 clients, --runtime tensorflow: served images/s / "
                "in-process SavedModel images/s", tf_256, "in-process SavedModel, batch 256",
                saved_model, tf_256["images_per_s"] / saved_model["images_per_s"], None)
        )  # fmt: skip
        print("L3 one request at a time, 784 B and 200 KB ...", file=sys.stderr)
        echo_1 = load(echo.target, 1, 1, seconds)
        auto_1 = load(lean.target, 1, 1, seconds)
        tf_1 = load(heavy.target, 1, 1, seconds)
        echo_256 = load(echo.target, 256, 1, seconds)
        auto_256_1 = load(lean.target, 256, 1, seconds)
        rows.append(
            row("L3a", "1 image (784 B), 1 client, --runtime auto: served p50 / echo p50", auto_1,
                "bare grpc.aio echo server, 784 B", echo_1, auto_1["p50_ms"] / echo_1["p50_ms"],
                "<=1.3")
        )  # fmt: skip
        rows.append(
            row("L3b", "1 image, 1 client, --runtime tensorflow: served p50 / echo p50", tf_1,
                "bare grpc.aio echo server, 784 B", echo_1, tf_1["p50_ms"] / echo_1["p50_ms"], None)
        )  # fmt: skip
        rows.append(
            row("L3c", "256 images (200 KB), 1 client, --runtime auto: served p50 / echo p50",
                auto_256_1, "bare grpc.aio echo server, 200 KB", echo_256,
                auto_256_1["p50_ms"] / echo_256["p50_ms"], None)
        )  # fmt: skip
        print("L4 single images, 64 clients ...", file=sys.stderr)
        echo_64 = load(echo.target, 1, 64, seconds)
        auto_64 = load(lean.target, 1, 64, seconds)
        tf_64 = load(heavy.target, 1, 64, seconds)
        rows.append(
            row("L4a", "1 image, 64 clients, --runtime auto: served req/s / echo req/s", auto_64,
                "bare grpc.aio echo server", echo_64, auto_64["req_per_s"] / echo_64["req_per_s"],
                0.8)
        )  # fmt: skip
        rows.append(
            row("L4b", "1 image, 64 clients, --runtime tensorflow: served req/s / echo req/s",
                tf_64, "bare grpc.aio echo server", echo_64,
                tf_64["req_per_s"] / echo_64["req_per_s"], None)
        )  # fmt: skip
        # Start-up and memory: what the rows' p50 column holds is seconds / MB here.
        lean_rss, heavy_rss = rss_mb(lean.process.pid), rss_mb(heavy.process.pid)
        rows.append(
            row("L5a", "process start to health SERVING, --runtime auto / --runtime tensorflow "
                "(p50 column: seconds)", figure(lean_start, p50_ms=lean_start),
                "--runtime tensorflow", figure(heavy_start, p50_ms=heavy_start),
                lean_start / heavy_start, "<=0.25")
        )  # fmt: skip
        rows.append(
            row("L5b", "process start to health SERVING, --runtime auto: seconds / 1.5 s",
                figure(lean_start, p50_ms=lean_start), "1.5 s", figure(1.5, p50_ms=1.5),
                lean_start / 1.5, "<=1.0")
        )  # fmt: skip
        rows.append(
            row("L6", "resident memory after the runs above, --runtime auto: MB / 150 MB "
                f"(p50 column: MB; --runtime tensorflow: {heavy_rss:.0f} MB)",
                figure(lean_rss, p50_ms=lean_rss), "150 MB", figure(150, p50_ms=150),
                lean_rss / 150, "<=1.0")
        )  # fmt: skip
    finally:
        lean.stop()
        heavy.stop()
        echo.stop()
    return rows


def _newest(model_dir: Path) -> int:
    return max(existing_versions(model_dir))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra mnist-serve flag (repeatable)"
    )
    parser.add_argument(
        "--rows", choices=("all", "B", "L"), default="all", help="which group of rows to run"
    )
    args = parser.parse_args()
    settings = {"seconds_per_run": args.seconds, "server_args": args.server_arg or "defaults"}
    rows = []
    if args.rows in ("all", "B"):
        rows += run(args.model_dir, args.seconds, args.server_arg)
    if args.rows in ("all", "L"):
        rows += run_runtimes(args.model_dir, args.seconds, args.server_arg)
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
