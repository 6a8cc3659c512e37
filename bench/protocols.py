"""The same images through every protocol of one server, side by side in one run.

    python -m bench.protocols --model-dir models/mnist [--seconds 3] [--rounds 3]
        [--concurrency 4] [--json FILE]

Starts the real server once (batching on, defaults), then for batch 1 and batch 256 drives
it with a closed-loop load generator in its own process (`--load PROTOCOL`), the protocols
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
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOLS = ("native", "v2_grpc", "v2_http_binary", "v2_http_json", "tfserving_rest")
BATCHES = (1, 256)
TARGETS = {("v2_grpc", 1): 0.9, ("v2_grpc", 256): 0.9, ("v2_http_binary", 256): 0.7}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Call = Callable[[], Awaitable[None]]


async def grpc_call(protocol: str, target: str, pixels: np.ndarray) -> tuple[Call, Any]:
    import grpc

    channel = grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    if protocol == "native":
        from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
        from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

        request = pb.PredictRequest(
            images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=pixels.shape, content=pixels.tobytes())
        )
        predict = predict_pb2_grpc.MnistServiceStub(channel).Predict

        async def native() -> None:
            answer = await predict(request, timeout=30)
            np.frombuffer(answer.probabilities.content, "<f4").reshape(-1, 10)
            np.frombuffer(answer.classes.content, "<i8")

        return native, channel
    # tritonclient's generated code: the public proto, not ours.
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    v2_request = service_pb2.ModelInferRequest(model_name="mnist")
    v2_request.inputs.add(name="images", datatype="UINT8", shape=pixels.shape)
    v2_request.raw_input_contents.append(pixels.tobytes())
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

    async def v2() -> None:
        answer = await infer(v2_request, timeout=30)
        np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(-1, 10)
        np.frombuffer(answer.raw_output_contents[1], "<i8")

    return v2, channel


async def http_call(protocol: str, target: str, pixels: np.ndarray) -> tuple[Call, Any]:
    import aiohttp

    session = aiohttp.ClientSession(
        f"http://{target}",
        timeout=aiohttp.ClientTimeout(total=30),
        skip_auto_headers=["Accept-Encoding"],
    )
    shape = list(pixels.shape)
    headers: dict[str, str] = {}
    tensor: dict[str, Any]
    if protocol == "tfserving_rest":
        path = "/v1/models/mnist:predict"
        body = json.dumps({"instances": pixels.tolist()}).encode()
    elif protocol == "v2_http_json":
        path = "/v2/models/mnist/infer"
        tensor = {
            "name": "images",
            "datatype": "UINT8",
            "shape": shape,
            "data": pixels.ravel().tolist(),
        }
        body = json.dumps({"inputs": [tensor]}).encode()
    else:
        path = "/v2/models/mnist/infer"
        tensor = {
            "name": "images",
            "datatype": "UINT8",
            "shape": shape,
            "parameters": {"binary_data_size": pixels.nbytes},
        }
        header = json.dumps(
            {"inputs": [tensor], "parameters": {"binary_data_output": True}}
        ).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        body = header + pixels.tobytes()

    async def rest() -> None:
        async with session.post(path, data=body, headers=headers) as answer:
            data = await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"HTTP {answer.status}: {data[:200]!r}")
            length = answer.headers.get("Inference-Header-Content-Length")
        if protocol == "tfserving_rest":
            rows = json.loads(data)["predictions"]
            np.array([row["probabilities"] for row in rows], dtype=np.float32)
            np.array([row["classes"] for row in rows], dtype=np.int64)
        elif length is None:
            outputs = json.loads(data)["outputs"]
            np.array(outputs[0]["data"], dtype=np.float32).reshape(outputs[0]["shape"])
            np.array(outputs[1]["data"], dtype=np.int64)
        else:
            outputs = json.loads(data[: int(length)])["outputs"]
            sizes = [o["parameters"]["binary_data_size"] for o in outputs]
            start = int(length)
            np.frombuffer(data, "<f4", count=sizes[0] // 4, offset=start).reshape(-1, 10)
            np.frombuffer(data, "<i8", count=sizes[1] // 8, offset=start + sizes[0])

    return rest, session


async def load(
    protocol: str, target: str, images: int, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    pixels = np.random.default_rng(0).integers(0, 256, size=(images, 28, 28), dtype=np.uint8)
    make = grpc_call if protocol in ("native", "v2_grpc") else http_call
    call, resource = await make(protocol, target, pixels)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker() -> None:
        while (now := time.perf_counter()) < stop_at:
            try:
                await call()
            except Exception as error:  # a bench counts failures, it does not stop on one
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
                continue
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - measure_from
    await resource.close()
    done = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "req_per_s": len(latencies) / elapsed,
        "images_per_s": len(latencies) * images / elapsed,
        "p50_ms": float(np.percentile(done, 50) * 1000),
        "p99_ms": float(np.percentile(done, 99) * 1000),
        "errors": errors,
    }


def measure(
    protocol: str, target: str, images: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """One protocol's load run, in its own process (client and server don't share a GIL)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.protocols", "--load", protocol, "--target", target,
            "--images", str(images), "--concurrency", str(concurrency), "--seconds", str(seconds),
        ],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    )  # fmt: skip
    stats: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    if stats["errors"]:
        print(f"  note: {protocol} answered errors {stats['errors']}", file=sys.stderr)
    return stats


def median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda stats: stats["req_per_s"])
    return ordered[len(ordered) // 2]


def run(model_dir: Path, seconds: float, rounds: int, concurrency: int) -> list[dict[str, Any]]:
    from mnist_serving.server.launcher import ServerProcess

    rows: list[dict[str, Any]] = []
    with ServerProcess(model_dir, "--poll-interval", "0") as server:
        targets = {"native": server.target, "v2_grpc": server.target}
        http = f"{server.host}:{server.http_port}"
        for batch in BATCHES:
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PROTOCOLS}
            for turn in range(rounds):
                for protocol in PROTOCOLS:
                    print(f"batch {batch}, round {turn + 1}, {protocol} ...", file=sys.stderr)
                    runs[protocol].append(
                        measure(protocol, targets.get(protocol, http), batch, concurrency, seconds)
                    )
            results = {protocol: median_round(r) for protocol, r in runs.items()}
            native = results["native"]["req_per_s"]
            for protocol, stats in results.items():
                target = TARGETS.get((protocol, batch))
                ratio = stats["req_per_s"] / native if native else float("nan")
                rows.append(
                    {
                        "protocol": protocol,
                        "batch": batch,
                        "concurrency": concurrency,
                        "rounds": rounds,
                        "ratio_to_native": ratio,
                        "target": target,
                        "met": None if target is None else ratio >= target,
                        **stats,
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    heads = f"{'protocol':<16}{'batch':>6}{'req/s':>10}{'images/s':>12}{'p50 ms':>9}{'ratio':>7}"
    print(heads + "  target")
    for r in rows:
        target = (
            "" if r["target"] is None else f">= {r['target']} ({'met' if r['met'] else 'MISSED'})"
        )
        print(
            f"{r['protocol']:<16}{r['batch']:>6}{r['req_per_s']:>10.0f}{r['images_per_s']:>12.0f}"
            f"{r['p50_ms']:>9.2f}{r['ratio_to_native']:>7.2f}  {target}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/mnist"))
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="turns each protocol takes")
    parser.add_argument("--concurrency", type=int, default=4, help="clients per measurement")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    # The load generator's own mode, run by measure() in a child process.
    parser.add_argument("--load", choices=PROTOCOLS, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        stats = asyncio.run(
            load(args.load, args.target, args.images, args.concurrency, args.seconds, args.warmup)
        )
        print(json.dumps(stats))
        return
    rows = run(args.model_dir, args.seconds, args.rounds, args.concurrency)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
