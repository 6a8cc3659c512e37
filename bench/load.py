"""Closed-loop load generator, run in its own process: `python -m bench.load --target ...`.

`--concurrency` tasks on one grpc.aio channel each send Predict with `--images` images,
wait for the answer and send the next, for `--seconds` (after `--warmup`). Prints one JSON
object: requests, images, seconds, req_per_s, images_per_s, p50_ms, p99_ms, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import grpc
import numpy as np

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def run(
    target: str, images: int, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(images, 28, 28), dtype=np.uint8)
    request = pb.PredictRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=pixels.shape, content=pixels.tobytes())
    )
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    ) as channel:
        predict = predict_pb2_grpc.MnistServiceStub(channel).Predict
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds

        async def worker() -> None:
            while (now := time.perf_counter()) < stop_at:
                try:
                    await predict(request, timeout=30)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1
                    continue
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - measure_from
    done = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "requests": len(latencies),
        "images": len(latencies) * images,
        "seconds": elapsed,
        "req_per_s": len(latencies) / elapsed,
        "images_per_s": len(latencies) * images / elapsed,
        "p50_ms": float(np.percentile(done, 50) * 1000),
        "p99_ms": float(np.percentile(done, 99) * 1000),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.target, args.images, args.concurrency, args.seconds, args.warmup))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
