"""`python -m bench.drift_cost --model-dir DIR`: what drift accounting and the feedback
window cost the calls, ratios side by side in one run (issue 24's target: >= 0.97x).

One server per setting, the same load on each (single images from `--clients` clients;
batch-256 requests from 4 clients), each figure divided by the same figure with both off:
  D0a/D0b  both off again, run last: how far two identical runs differ on this machine
  D1/D2    drift signals and the feedback window on (the defaults)
  D5/D6    the same with --drift-sample-rate 0.1 (one call in ten reaches the drift windows)
  D3/D4    the server process's CPU time per image (user + system, from /proc) on, over off
           (D7/D8: sampled 0.1):
           less sensitive than throughput to other processes on a shared machine, and
           what the work on the call path costs (target: <= 1/0.97 = 1.03)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mnist_serving.server.launcher import ServerProcess

from .harness import Row, Stats, load, print_table, row, write_json

BATCH = 256
BATCH_CLIENTS = 4
OFF = ["--no-drift", "--feedback-window", "0"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> list[Row]:
    settings = {
        "off": OFF,
        "drift + feedback window": [],
        "drift sampled 0.1": ["--drift-sample-rate", "0.1"],
        "off again": OFF,
    }
    single: dict[str, Stats] = {}
    batch: dict[str, Stats] = {}
    cpu: dict[tuple[str, int], float] = {}  # (setting, images per call) -> CPU us per image
    for name, flags in settings.items():
        server = ServerProcess(args.model_dir, "--poll-interval", "0", *flags)
        pid = server.process.pid
        try:
            print(f"{name}: 1 image, {args.clients} clients ...", file=sys.stderr)
            started = cpu_seconds(pid)
            single[name] = load(server.target, 1, args.clients, args.seconds, connections=4)
            used = cpu_seconds(pid) - started
            cpu[name, 1] = used / (single[name]["images_per_s"] * args.seconds) * 1e6
            print(f"{name}: batch {BATCH}, {BATCH_CLIENTS} clients ...", file=sys.stderr)
            started = cpu_seconds(pid)
            batch[name] = load(server.target, BATCH, BATCH_CLIENTS, args.seconds)
            used = cpu_seconds(pid) - started
            cpu[name, BATCH] = used / (batch[name]["images_per_s"] * args.seconds) * 1e6
        finally:
            server.stop()
    for (name, size), micros in cpu.items():
        print(f"  server CPU per image, {name}, {size} per call: {micros:.1f} us", file=sys.stderr)
    rows: list[Row] = []
    off_single, off_batch = single["off"], batch["off"]
    for name, (first, second), target in (
        ("off again", ("D0a", "D0b"), None),
        ("drift + feedback window", ("D1", "D2"), 0.97),
        ("drift sampled 0.1", ("D5", "D6"), 0.97),
    ):
        rows.append(
            row(first, f"{name}: 1 image, {args.clients} clients: req/s / off req/s",
                single[name], "both off", off_single,
                single[name]["req_per_s"] / off_single["req_per_s"], target)
        )  # fmt: skip
        rows.append(
            row(second, f"{name}: batch-{BATCH} uint8, {BATCH_CLIENTS} clients: images/s / "
                "off images/s", batch[name], "both off", off_batch,
                batch[name]["images_per_s"] / off_batch["images_per_s"], target)
        )  # fmt: skip
    for label, on, size, stats, off_stats in (
        ("D3", "drift + feedback window", 1, single, off_single),
        ("D4", "drift + feedback window", BATCH, batch, off_batch),
        ("D7", "drift sampled 0.1", 1, single, off_single),
        ("D8", "drift sampled 0.1", BATCH, batch, off_batch),
    ):
        rows.append(
            row(label, f"{on}: server CPU us per image, {size} per call / off (lower is better)",
                stats[on], "both off", off_stats, cpu[on, size] / cpu["off", size], None)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drift_cost", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--clients", type=int, default=64, help="single-image clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    args = parser.parse_args(argv)
    settings = {
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "usable_cpus": len(os.sched_getaffinity(0)),
    }
    rows = run(args)
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
