"""The same images through every protocol of one server, side by side in one run.

    python -m bench.protocols --model-dir models/mnist [--seconds 3] [--rounds 3]
        [--concurrency 4] [--json FILE]

Starts the real server once (batching on, defaults), then for batch 1 and batch 256 drives
it with a closed-loop load generator in its own process (bench/harness.py), the protocols
taking turns for `--rounds` rounds (so that a burst of load elsewhere on the machine hits
them alike; the median round counts), the same uint8 images each time:
- native: mnist.v1 Predict over gRPC (numpy bytes in and out);
- v2_grpc: inference.GRPCInferenceService/ModelInfer, raw_input_contents / raw_output_contents;
- v2_http_binary: KServe v2 REST with the binary tensor data extension, both ways;
- v2_http_json: KServe v2 REST, tensors as JSON numbers;
- tfserving_rest: TF Serving REST, row format ("instances").
Every client builds its request once and decodes every answer into numpy arrays, as a real
caller would. Prints req/s, images/s and p50 per protocol and its ratio to native at the
same batch size. Targets: v2_grpc >= 0.9 x native; v2_http_binary at batch 256 >= 0.7 x
native. The machine is shared and noisy: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_serving.server.launcher import ServerProcess

from .harness import GRPC_PROTOCOLS, NAN, PROTOCOLS, Row, Stats, load, print_table, row, write_json

BATCHES = (1, 256)
TARGETS = {("v2_grpc", 1): 0.9, ("v2_grpc", 256): 0.9, ("v2_http_binary", 256): 0.7}
WHAT = {
    "native": "mnist.v1 Predict over gRPC",
    "v2_grpc": "KServe v2 ModelInfer over gRPC, raw contents",
    "v2_http_binary": "KServe v2 REST, binary tensor data both ways",
    "v2_http_json": "KServe v2 REST, tensors as JSON numbers",
    "tfserving_rest": "TF Serving REST, row format",
}


def median_round(runs: list[Stats]) -> Stats:
    ordered = sorted(runs, key=lambda stats: stats["req_per_s"])
    return ordered[len(ordered) // 2]


def run(model_dir: Path, seconds: float, rounds: int, concurrency: int) -> list[Row]:
    rows: list[Row] = []
    with ServerProcess(model_dir, "--poll-interval", "0") as server:
        http = f"{server.host}:{server.http_port}"
        for batch in BATCHES:
            runs: dict[str, list[Stats]] = {p: [] for p in PROTOCOLS}
            for turn in range(rounds):
                for protocol in PROTOCOLS:
                    print(f"batch {batch}, round {turn + 1}, {protocol} ...", file=sys.stderr)
                    target = server.target if protocol in GRPC_PROTOCOLS else http
                    runs[protocol].append(
                        load(target, batch, concurrency, seconds, protocol=protocol, decode=True)
                    )
            results = {protocol: median_round(r) for protocol, r in runs.items()}
            native = results["native"]
            for protocol, stats in results.items():
                ratio = stats["req_per_s"] / native["req_per_s"] if native["req_per_s"] else NAN
                rows.append(
                    row(protocol, f"{WHAT[protocol]}: req/s / native req/s, same batch",
                        stats, f"native, batch {batch}", native, ratio,
                        TARGETS.get((protocol, batch)), batch=batch)
                )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.protocols", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/mnist"))
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="turns each protocol takes")
    parser.add_argument("--concurrency", type=int, default=4, help="clients per measurement")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    args = parser.parse_args()
    settings = {
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
    }
    rows = run(args.model_dir, args.seconds, args.rounds, args.concurrency)
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
