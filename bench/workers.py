"""`python -m bench.workers --model-dir DIR`: what --workers buys, ratios side by side in one run.

For each worker count in `--workers` (default 1,2) it starts mnist-serve on loopback and
measures, with the same load generator:
  W1  1 image, `--clients` clients over `--connections` connections: req/s / --workers 1 req/s
  W2  the same load: req/s / the bare grpc.aio echo server's req/s (bench/echo.py; one process)
  W3  batch-256 requests, 4 clients: images/s / --workers 1 images/s
and each worker's resident memory. One connection lands on one worker, so the load
generator opens several (each channel keeps its own subchannel pool).

On a small machine the load generator shares the cores with the server: pin it with
`--load-cpus` (a CPU list such as 0 or 12-15) and the server with `--server-cpus`, and give
it several processes (`--load-processes`) when one Python process cannot make enough load
for many workers. A scaling curve on a big machine: `--workers 1,2,4,8,16 --server-cpus 0-15
--load-cpus 16-31 --load-processes 8`. Read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.launcher import ServerProcess

from .echo import EchoProcess

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
BATCH = 256
BATCH_CLIENTS = 4


def cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}"""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


# --- the load generator (one process; `python -m bench.workers load ...`) ---------------


async def generate(
    target: str, images: int, clients: int, connections: int, seconds: float, warmup: float
) -> dict[str, Any]:
    pixels = np.random.default_rng(0).integers(0, 256, size=(images, 28, 28), dtype=np.uint8)
    request = pb.PredictRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=pixels.shape, content=pixels.tobytes())
    )
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),  # a TCP connection per channel
    ]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    stubs = [predict_pb2_grpc.MnistServiceStub(channel) for channel in channels]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def client(index: int) -> None:
        predict = stubs[index % len(stubs)].Predict
        while (now := time.perf_counter()) < stop_at:
            try:
                await predict(request, timeout=30)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] = errors.get(error.code().name, 0) + 1
                continue
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - measure_from
    await asyncio.gather(*(channel.close(grace=None) for channel in channels))
    done = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "requests": len(latencies),
        "images": len(latencies) * images,
        "seconds": elapsed,
        "p50_ms": float(np.percentile(done, 50) * 1000),
        "p99_ms": float(np.percentile(done, 99) * 1000),
        "errors": errors,
    }


def load(
    target: str,
    images: int,
    clients: int,
    connections: int,
    seconds: float,
    processes: int,
    cpus: set[int] | None,
) -> dict[str, Any]:
    """`processes` load generators at once, the clients and connections split among them."""
    runs = []
    for index in range(processes):
        share = clients // processes + (index < clients % processes)
        links = max(1, connections // processes + (index < connections % processes))
        command = [
            sys.executable, "-m", "bench.workers", "load", "--target", target,
            "--images", str(images), "--clients", str(share), "--connections", str(links),
            "--seconds", str(seconds),
        ]  # fmt: skip
        run = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        if cpus:
            os.sched_setaffinity(run.pid, cpus)  # before its one-second warm-up ends
        runs.append(run)
    results = []
    for run in runs:
        out, _ = run.communicate(timeout=seconds + 120)
        if run.returncode:
            raise RuntimeError(f"the load generator failed ({run.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds_run = max(r["seconds"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for code, count in r["errors"].items():
            errors[code] = errors.get(code, 0) + count
    if errors:
        print(f"  note: {target} answered errors {errors}", file=sys.stderr)
    return {
        "req_per_s": sum(r["requests"] for r in results) / seconds_run,
        "images_per_s": sum(r["images"] for r in results) / seconds_run,
        "p50_ms": max(r["p50_ms"] for r in results),  # the slowest generator's
        "p99_ms": max(r["p99_ms"] for r in results),
        "errors": errors,
    }


# --- the benchmark -----------------------------------------------------------------------


@dataclass
class Row:
    name: str
    workers: int
    what: str
    ratio: float
    target: float | None
    value: float
    baseline: float

    @property
    def met(self) -> str:
        return "" if self.target is None else ("yes" if self.ratio >= self.target else "no")


def rss_mb(pid: int) -> float:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) / 1024 if found else float("nan")


def worker_pids(server: ServerProcess) -> list[int]:
    pids: dict[str, int] = {}
    for line in server.log_lines:
        found = re.search(r'msg="worker started" child=(\d+) pid=(\d+)', line)
        if found:
            pids[found.group(1)] = int(found.group(2))
    return list(pids.values()) or [server.process.pid]


def run(args: argparse.Namespace) -> tuple[list[Row], dict[int, list[float]]]:
    server_cpus = cpu_list(args.server_cpus) if args.server_cpus else None
    load_cpus = cpu_list(args.load_cpus) if args.load_cpus else None

    def drive(target: str, images: int, clients: int) -> dict[str, Any]:
        return load(
            target,
            images,
            clients,
            args.connections,
            args.seconds,
            args.load_processes,
            load_cpus,
        )

    echo = EchoProcess()
    try:
        if server_cpus:
            os.sched_setaffinity(echo.process.pid, server_cpus)
        print(f"echo server, 1 image, {args.clients} clients ...", file=sys.stderr)
        echo_single = drive(echo.target, 1, args.clients)
    finally:
        echo.stop()
    single: dict[int, dict[str, Any]] = {}
    batch: dict[int, dict[str, Any]] = {}
    memory: dict[int, list[float]] = {}
    for count in args.workers:
        server = ServerProcess(args.model_dir, "--workers", str(count), "--poll-interval", "0")
        try:
            pids = worker_pids(server)
            if server_cpus:
                for pid in {server.process.pid, *pids}:
                    os.sched_setaffinity(pid, server_cpus)
            print(f"--workers {count}: 1 image, {args.clients} clients ...", file=sys.stderr)
            single[count] = drive(server.target, 1, args.clients)
            print(f"--workers {count}: batch {BATCH}, {BATCH_CLIENTS} clients ...", file=sys.stderr)
            batch[count] = drive(server.target, BATCH, BATCH_CLIENTS)
            memory[count] = [rss_mb(pid) for pid in pids]
            if count > 1:
                memory[count].append(rss_mb(server.process.pid))
        finally:
            server.stop()
    base = args.workers[0]
    rows: list[Row] = []
    for count in args.workers:
        rows.append(
            Row(
                "W1",
                count,
                f"1 image, {args.clients} clients, {args.connections} connections: "
                f"req/s / --workers {base} req/s",
                single[count]["req_per_s"] / single[base]["req_per_s"],
                None,
                single[count]["req_per_s"],
                single[base]["req_per_s"],
            )
        )
        rows.append(
            Row(
                "W2",
                count,
                "the same load: req/s / bare grpc.aio echo server req/s",
                single[count]["req_per_s"] / echo_single["req_per_s"],
                1.0 if count >= 2 else None,
                single[count]["req_per_s"],
                echo_single["req_per_s"],
            )
        )
        rows.append(
            Row(
                "W3",
                count,
                f"batch-{BATCH} uint8, {BATCH_CLIENTS} clients: images/s / --workers {base} "
                "images/s",
                batch[count]["images_per_s"] / batch[base]["images_per_s"],
                None,
                batch[count]["images_per_s"],
                batch[base]["images_per_s"],
            )
        )
    return rows, memory


def print_table(rows: list[Row], memory: dict[int, list[float]], settings: dict[str, Any]) -> None:
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    header = (
        f"{'row':4} {'workers':>7} {'ratio':>7} {'target':>7} {'met':>4} "
        f"{'value':>10} {'baseline':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        target = "" if r.target is None else f">={r.target:g}"
        print(
            f"{r.name:4} {r.workers:7d} {r.ratio:7.2f} {target:>7} {r.met:>4} "
            f"{r.value:10.0f} {r.baseline:10.0f}"
        )
    for name in dict.fromkeys(r.name for r in rows):
        print(f"  {name}: {next(r.what for r in rows if r.name == name)}")
    for count, sizes in memory.items():
        each = ", ".join(f"{size:.0f}" for size in sizes[:count])
        rest = f"; supervisor {sizes[count]:.0f} MB" if count > 1 else ""
        print(f"  memory, --workers {count}: {each} MB resident per worker{rest}")


def _workers(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts are positive integers, e.g. 1,2,4")
    return counts


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        parser = argparse.ArgumentParser(prog="python -m bench.workers load")
        parser.add_argument("--target", required=True)
        parser.add_argument("--images", type=int, default=1)
        parser.add_argument("--clients", type=int, default=64)
        parser.add_argument("--connections", type=int, default=4)
        parser.add_argument("--seconds", type=float, default=5.0)
        parser.add_argument("--warmup", type=float, default=1.0)
        a = parser.parse_args(argv[1:])
        result = asyncio.run(
            generate(a.target, a.images, a.clients, a.connections, a.seconds, a.warmup)
        )
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--workers", type=_workers, default=[1, 2], help="default: 1,2")
    parser.add_argument("--clients", type=int, default=64, help="single-image clients")
    parser.add_argument("--connections", type=int, default=4, help="TCP connections in all")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--load-cpus", help="CPU list for the load generator, e.g. 0 or 12-15")
    parser.add_argument("--server-cpus", help="CPU list for the servers, e.g. 1 or 0-11")
    parser.add_argument("--load-processes", type=int, default=1, help="load generators")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    args = parser.parse_args(argv)
    settings = {
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "connections": args.connections,
        "load_processes": args.load_processes,
        "load_cpus": args.load_cpus or "any",
        "server_cpus": args.server_cpus or "any",
        "usable_cpus": len(os.sched_getaffinity(0)),
    }
    rows, memory = run(args)
    print_table(rows, memory, settings)
    if args.json:
        with args.json.open("w") as out:
            for r in rows:
                out.write(json.dumps({**asdict(r), "met": r.met, "settings": settings}) + "\n")


if __name__ == "__main__":
    main()
