"""Online callers beside a batch job on one server: `python -m bench.mixed --model-dir DIR`.

One server at default flags. Four online clients send single images (native gRPC), alone,
then while one batch client runs against the same server (batches of 1,024, four in
flight: what `mnist-client score` sends), marked `mnist-priority: batch`; then the batch
client alone. For the record it also runs the mixed case with the batch client left in the
online class (no priority: one FIFO queue, as before priority classes). Every figure comes
from the same run; the rows are ratios.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mnist_serving.server.launcher import ServerProcess

from .harness import Row, Stats, load, print_table, row, write_json

ONLINE_CLIENTS = 4
BATCH_IMAGES = 1024
BATCH_IN_FLIGHT = 4


def online(target: str, seconds: float) -> Stats:
    return load(target, 1, ONLINE_CLIENTS, seconds, connections=ONLINE_CLIENTS)


def batch(target: str, seconds: float, priority: str | None) -> Stats:
    return load(target, BATCH_IMAGES, BATCH_IN_FLIGHT, seconds, priority=priority)


def together(target: str, seconds: float, priority: str | None) -> tuple[Stats, Stats]:
    """The online clients and the batch client at once, each in its own process."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        online_run = pool.submit(online, target, seconds)
        batch_run = pool.submit(batch, target, seconds, priority)
        return online_run.result(), batch_run.result()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/mnist"))
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("server_args", nargs="*", help="extra mnist-serve flags (after --)")
    args = parser.parse_args()

    server = ServerProcess(args.model_dir, "--poll-interval", "0", *args.server_args)
    try:
        target = server.target
        alone = online(target, args.seconds)
        with_batch, batch_beside = together(target, args.seconds, "batch")
        batch_alone = batch(target, args.seconds, "batch")
        fifo_online, fifo_batch = together(target, args.seconds, None)
    finally:
        server.stop()

    rows: list[Row] = [
        row("M1", "online p99, batch job running / alone", with_batch, "online alone", alone,
            with_batch["p99_ms"] / alone["p99_ms"], "<=2"),
        row("M2", "online p50, batch job running / alone", with_batch, "online alone", alone,
            with_batch["p50_ms"] / alone["p50_ms"], "<=1.5"),
        row("M3", "online req/s, batch job running / alone", with_batch, "online alone", alone,
            with_batch["req_per_s"] / alone["req_per_s"], 0.7),
        row("M4", "batch images/s, online running / alone", batch_beside, "batch alone",
            batch_alone, batch_beside["images_per_s"] / batch_alone["images_per_s"], 0.8),
        row("M5", "without classes (one FIFO): online p99 / alone", fifo_online, "online alone",
            alone, fifo_online["p99_ms"] / alone["p99_ms"], None),
        row("M6", "without classes (one FIFO): batch images/s / alone", fifo_batch,
            "batch alone", batch_alone, fifo_batch["images_per_s"] / batch_alone["images_per_s"],
            None),
    ]  # fmt: skip
    settings = {
        "online": f"{ONLINE_CLIENTS} clients x 1 image",
        "batch": f"1 client, {BATCH_IN_FLIGHT} in flight x {BATCH_IMAGES} images",
        "seconds": args.seconds,
        "server_args": " ".join(args.server_args) or "defaults",
    }
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
