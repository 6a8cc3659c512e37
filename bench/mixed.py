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

from .harness import Row, Stats, cpu_list, load, pin, print_table, row, write_json

ONLINE_CLIENTS = 4
BATCH_IMAGES = 1024
BATCH_IN_FLIGHT = 4


LOAD_CPUS: set[int] | None = None  # --load-cpus


def online(target: str, seconds: float) -> Stats:
    return load(target, 1, ONLINE_CLIENTS, seconds, connections=ONLINE_CLIENTS, cpus=LOAD_CPUS)


def batch(target: str, seconds: float, priority: str | None) -> Stats:
    return load(target, BATCH_IMAGES, BATCH_IN_FLIGHT, seconds, priority=priority, cpus=LOAD_CPUS)


def together(target: str, seconds: float, priority: str | None) -> tuple[Stats, Stats]:
    """The online clients and the batch client at once, each in its own process."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        online_run = pool.submit(online, target, seconds)
        batch_run = pool.submit(batch, target, seconds, priority)
        return online_run.result(), batch_run.result()


Sums = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def sums(server: ServerProcess) -> Sums:
    """The server's histogram sums and counts, by series."""
    return {
        key: value for key, value in server.scrape().items() if key[0].endswith(("_sum", "_count"))
    }


def where_online_waits(before: Sums, after: Sums) -> dict[str, float]:
    """Mean milliseconds of an online call between two scrapes, as the server saw it: its
    whole time in the server, its wait in the model queue, and one model call."""

    def mean(name: str, **labels: str) -> float:
        def total(samples: Sums, suffix: str) -> float:
            return sum(
                value
                for (series, found), value in samples.items()
                if series == name + suffix and labels.items() <= dict(found).items()
            )

        count = total(after, "_count") - total(before, "_count")
        return (total(after, "_sum") - total(before, "_sum")) / count * 1000 if count else 0.0

    return {
        "server_ms": mean("mnist_request_duration_seconds", method="Predict", priority="online"),
        "queue_wait_ms": mean("mnist_batch_queue_wait_seconds", priority="online"),
        "model_call_ms": mean("mnist_model_inference_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mixed", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/mnist"))
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--server-cpus", help="pin the server to these CPUs (e.g. 0 or 0-7)")
    parser.add_argument("--load-cpus", help="pin the load generators to these CPUs")
    parser.add_argument("server_args", nargs="*", help="extra mnist-serve flags (after --)")
    args = parser.parse_args()
    global LOAD_CPUS
    LOAD_CPUS = cpu_list(args.load_cpus) if args.load_cpus else None

    server = ServerProcess(args.model_dir, "--poll-interval", "0", *args.server_args)
    if args.server_cpus:
        pin(server.process.pid, cpu_list(args.server_cpus))
    try:
        target = server.target
        alone = online(target, args.seconds)
        before = sums(server)
        with_batch, batch_beside = together(target, args.seconds, "batch")
        waits = where_online_waits(before, sums(server))
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
        "server_cpus": args.server_cpus or "any",
        "load_cpus": args.load_cpus or "any",
    }
    print_table(rows, settings)
    print(
        f"  online calls with the batch job, mean as the server saw them: "
        f"{waits['server_ms']:.2f} ms in the server, {waits['queue_wait_ms']:.2f} ms of it in "
        f"the model queue; a model call took {waits['model_call_ms']:.2f} ms; the client saw "
        f"p50 {with_batch['p50_ms']:.2f} ms"
    )
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
