"""`python -m bench.observability --model-dir DIR`: what the access log, tracing and API
keys cost, ratios side by side in one run.

One server per setting, the same load on each (single images from `--clients` clients;
batch-256 requests from 4 clients), each figure divided by the same figure with all of them off:
  O0a/O0b  both off again, run last: how far two identical runs differ on this machine
  O1/O2  --access-log FILE at sample rate 1.0 (every call a line)
  O3/O4  --tracing, sampler always on (every call 3+ spans, exported over OTLP/gRPC)
  O5/O6  --tracing, parentbased_traceidratio at 0.01 (1 % of the calls traced)
  O7/O8  --auth-keys with 3 keys, every call sending a predict key's bearer token (the
         key checked, its role, and the caller label on the request metrics); with
         --rounds N, the two servers side by side, loaded in turn, medians of N rounds
Spans go to an OTLP/gRPC receiver in this process that counts them and answers at once
(the load of a collector on the same machine). Read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from mnist_serving.server.launcher import ServerProcess

from .harness import Row, Stats, load, print_table, row, write_json

BATCH = 256
BATCH_CLIENTS = 4


class SpanSink:
    """An OTLP/gRPC trace receiver on a free loopback port that only counts spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans = 0
        lock = threading.Lock()
        answer = trace_service_pb2.ExportTraceServiceResponse()
        sink = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                count = sum(
                    len(scope.spans)
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                )
                with lock:
                    sink.spans += count
                return answer

        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            Servicer(), self.server
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def make_keys(path: Path) -> str:
    """A keys file of three keys (a read one, a rate-limited one, and the one the load
    sends), like a small deployment's; the token of the predict key."""
    from mnist_serving.server.auth import keys_main

    with contextlib.redirect_stdout(io.StringIO()) as out:
        keys_main(["add", "viewer", "--role", "read", "--file", str(path)])
        keys_main(["add", "limited", "--role", "predict", "--file", str(path),
                   "--requests-per-second", "10"])  # fmt: skip
        keys_main(["add", "bench", "--role", "predict", "--file", str(path)])
    return out.getvalue().strip().splitlines()[-1]


def check_cost(keys: Path, token: str, calls: int = 20000) -> float:
    """Microseconds per key check in this process (the token's hash, the lookup, the
    constant-time compare, the role): what auth adds to a call, free of the load's noise."""
    from mnist_serving.server.auth import Authenticator
    from mnist_serving.server.call_context import Call

    auth = Authenticator(keys)
    carrier = {"authorization": f"Bearer {token}", "x-request-id": "bench"}
    started = time.perf_counter()
    for _ in range(calls):
        auth.check("predict", carrier, Call("native", "Predict"))
    return (time.perf_counter() - started) / calls * 1e6


def run(args: argparse.Namespace) -> list[Row]:
    sink = SpanSink()
    folder = Path(tempfile.mkdtemp(prefix="mnist-bench-access-"))
    keys = folder / "keys.json"
    token = make_keys(keys)
    print(f"  auth: one key check in process: {check_cost(keys, token):.1f} µs", file=sys.stderr)
    otlp = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    settings: dict[str, tuple[list[str], dict[str, str]]] = {
        "off": ([], {}),
        "auth on": (["--auth-keys", str(keys)], {}),
        "access log 1.0": (["--access-log", str(folder / "access.jsonl")], {}),
        "tracing always on": (
            ["--tracing"],
            {**otlp, "OTEL_TRACES_SAMPLER": "always_on"},
        ),
        "tracing 1 %": (
            ["--tracing"],
            {
                **otlp,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01",
            },
        ),
        "off again": ([], {}),  # the noise floor: the same server as the first, run last
    }
    if args.only:  # a focused run: these settings, between "off" and "off again"
        wanted = {"off", "off again", *args.only}
        unknown = wanted - set(settings)
        if unknown:
            raise SystemExit(f"--only: no setting {sorted(unknown)}; known: {list(settings)}")
        settings = {name: value for name, value in settings.items() if name in wanted}
    single: dict[str, Stats] = {}
    batch: dict[str, Stats] = {}
    try:
        for name, (flags, env) in settings.items():
            server = ServerProcess(args.model_dir, "--poll-interval", "0", *flags, env=env)
            try:
                # Every load sends the token: the servers without keys ignore it.
                print(f"{name}: 1 image, {args.clients} clients ...", file=sys.stderr)
                single[name] = load(
                    server.target, 1, args.clients, args.seconds, connections=4, token=token
                )
                print(f"{name}: batch {BATCH}, {BATCH_CLIENTS} clients ...", file=sys.stderr)
                batch[name] = load(server.target, BATCH, BATCH_CLIENTS, args.seconds, token=token)
                failed = single[name]["errors"] or batch[name]["errors"]
                if failed:
                    raise RuntimeError(f"{name}: calls failed: {failed}")
            finally:
                server.stop()
    finally:
        sink.stop()
    print(f"  spans received: {sink.spans}", file=sys.stderr)
    lines = folder / "access.jsonl"
    if lines.exists():
        with lines.open() as written:
            print(f"  access log lines written: {sum(1 for _ in written)}", file=sys.stderr)
        lines.unlink()
    keys.unlink()
    folder.rmdir()
    targets = {
        "off again": None,
        "access log 1.0": 0.9,
        "tracing always on": None,
        "tracing 1 %": 0.95,
        "auth on": 0.95,
    }
    names = {"off again": ("O0a", "O0b"), "access log 1.0": ("O1", "O2")}
    names.update({"tracing always on": ("O3", "O4"), "tracing 1 %": ("O5", "O6")})
    names["auth on"] = ("O7", "O8")
    rows: list[Row] = []
    off_single, off_batch = single["off"], batch["off"]
    for name, target in targets.items():
        if name not in single:
            continue
        first, second = names[name]
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
    return rows


def alternate(args: argparse.Namespace) -> list[Row]:
    """`--rounds N`: a server without keys and one with them, both up, loaded in turn (the
    order flipped every round), N rounds of each shape; the median of each side's figures.
    On a shared machine this is fairer than one run per server: slow spells hit both."""
    folder = Path(tempfile.mkdtemp(prefix="mnist-bench-auth-"))
    keys = folder / "keys.json"
    token = make_keys(keys)
    servers = {
        "off": ServerProcess(args.model_dir, "--poll-interval", "0"),
        "auth on": ServerProcess(args.model_dir, "--poll-interval", "0", "--auth-keys", str(keys)),
    }
    shapes = {"single": (1, args.clients, 4), "batch": (BATCH, BATCH_CLIENTS, 1)}
    runs: dict[tuple[str, str], list[Stats]] = {}
    try:
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for shape, (images, clients, connections) in shapes.items():
                for name in order:
                    stats = load(
                        servers[name].target, images, clients, args.seconds,
                        connections=connections, token=token,
                    )  # fmt: skip
                    if stats["errors"]:
                        raise RuntimeError(f"{name}: calls failed: {stats['errors']}")
                    runs.setdefault((name, shape), []).append(stats)
    finally:
        for server in servers.values():
            server.stop()
        keys.unlink()
        folder.rmdir()

    def median(name: str, shape: str, key: str) -> Stats:
        chosen = sorted(runs[name, shape], key=lambda stats: stats[key])
        return chosen[len(chosen) // 2]

    single_on, single_off = (
        median("auth on", "single", "req_per_s"),
        median("off", "single", "req_per_s"),
    )
    batch_on, batch_off = (
        median("auth on", "batch", "images_per_s"),
        median("off", "batch", "images_per_s"),
    )
    every = ", ".join(
        f"{name}/{shape}: " + " ".join(f"{s['req_per_s']:.0f}" for s in stats)
        for (name, shape), stats in runs.items()
    )
    print(f"  req/s of every run: {every}", file=sys.stderr)
    return [
        row("O7", f"auth on: 1 image, {args.clients} clients: median req/s / off median req/s "
            f"({args.rounds} alternating rounds)", single_on, "off", single_off,
            single_on["req_per_s"] / single_off["req_per_s"], 0.95),
        row("O8", f"auth on: batch-{BATCH} uint8, {BATCH_CLIENTS} clients: median images/s / "
            f"off median images/s ({args.rounds} alternating rounds)", batch_on, "off", batch_off,
            batch_on["images_per_s"] / batch_off["images_per_s"], 0.95),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.observability", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--clients", type=int, default=64, help="single-image clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        metavar="N",
        help="instead: auth on against off, both servers up, loaded in turn for N rounds (medians)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        metavar="NAMES",
        help='run only these settings (comma-separated, e.g. "auth on"), between "off" and '
        '"off again"',
    )
    args = parser.parse_args(argv)
    settings = {
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "usable_cpus": len(os.sched_getaffinity(0)),
    }
    rows = alternate(args) if args.rounds else run(args)
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


if __name__ == "__main__":
    main()
