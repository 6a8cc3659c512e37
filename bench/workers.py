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
import os
import re
import sys
from pathlib import Path

from mnist_serving.server.launcher import ServerProcess

from .echo import EchoProcess
from .harness import Row, Stats, cpu_list, load, pin, print_table, row, rss_mb, write_json

BATCH = 256
BATCH_CLIENTS = 4


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

    def drive(target: str, images: int, clients: int) -> Stats:
        return load(
            target,
            images,
            clients,
            args.seconds,
            connections=args.connections,
            processes=args.load_processes,
            cpus=load_cpus,
        )

    echo = EchoProcess()
    try:
        if server_cpus:
            pin(echo.process.pid, server_cpus)
        print(f"echo server, 1 image, {args.clients} clients ...", file=sys.stderr)
        echo_single = drive(echo.target, 1, args.clients)
    finally:
        echo.stop()
    single: dict[int, Stats] = {}
    batch: dict[int, Stats] = {}
    memory: dict[int, list[float]] = {}
    for count in args.workers:
        server = ServerProcess(args.model_dir, "--workers", str(count), "--poll-interval", "0")
        try:
            pids = worker_pids(server)
            if server_cpus:
                for pid in {server.process.pid, *pids}:
                    pin(pid, server_cpus)
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
            row("W1", f"1 image, {args.clients} clients, {args.connections} connections: "
                f"req/s / --workers {base} req/s", single[count], f"--workers {base}",
                single[base], single[count]["req_per_s"] / single[base]["req_per_s"], None,
                workers=count)
        )  # fmt: skip
        rows.append(
            row("W2", "the same load: req/s / bare grpc.aio echo server req/s", single[count],
                "bare grpc.aio echo server", echo_single,
                single[count]["req_per_s"] / echo_single["req_per_s"],
                1.0 if count >= 2 else None, workers=count)
        )  # fmt: skip
        rows.append(
            row("W3", f"batch-{BATCH} uint8, {BATCH_CLIENTS} clients: images/s / --workers "
                f"{base} images/s", batch[count], f"--workers {base}", batch[base],
                batch[count]["images_per_s"] / batch[base]["images_per_s"], None, workers=count)
        )  # fmt: skip
    return rows, memory


def print_memory(memory: dict[int, list[float]]) -> None:
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
    print_table(rows, settings)
    print_memory(memory)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
