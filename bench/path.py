"""`python -m bench.path --model-dir DIR`: what one single-image Predict costs the server,
beside what the echo server's own work costs, in two ways.

In process (no gRPC): the server's native Predict handler, exactly as gRPC calls it (bytes
in, through api/rpc.py's wrapper, the core, the batcher and the model, response out and
serialised), against what the echo server does per call (parse the request, build and
serialise a response of the same size): microseconds per call, in a tight loop.

Under load (`--clients`, default 64, each sending one image): the server's CPU time per
answered call (every thread, from /proc) for mnist-serve and for the echo server, side by
side, and the mean model call the server itself measured (mnist_model_inference_seconds).
A tight loop keeps code and data in cache; under load the same work costs more, and the
load generator shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from mnist_serving.contract import IMAGE_SIDE
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.server.__main__ import parse_settings
from mnist_serving.server.admission import Admission
from mnist_serving.server.api import native
from mnist_serving.server.api.calls import CallPath
from mnist_serving.server.api.rpc import RpcBinding
from mnist_serving.server.core import InferenceCore
from mnist_serving.server.launcher import ServerProcess
from mnist_serving.server.versions import ModelRegistry

from .echo import EchoProcess, EchoServicer
from .harness import WARMUP, cpu_seconds, load

REQUEST = pb.PredictRequest(
    images=pb.Tensor(
        dtype=pb.DATA_TYPE_UINT8,
        shape=[1, IMAGE_SIDE, IMAGE_SIDE],
        content=bytes(IMAGE_SIDE * IMAGE_SIDE),
    )
).SerializeToString()


class _Context:
    """What the handler asks of gRPC's ServicerContext on the success path."""

    def time_remaining(self) -> float:
        return 30.0


class _Details:
    method = "/mnist.v1.MnistService/Predict"
    invocation_metadata = ()


async def per_call_us(call: Any, calls: int) -> float:
    """Mean microseconds of `await call()`, after a warm-up."""
    for _ in range(1000):
        await call()
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - started) / calls * 1e6


async def in_process(model_dir: Path, calls: int) -> tuple[float, float]:
    """(server handler, echo's own work): microseconds per single-image call."""
    settings = parse_settings(["--model-dir", str(model_dir), "--poll-interval", "0"])
    registry = ModelRegistry(settings, ThreadPoolExecutor(max_workers=1))
    await registry.refresh()
    rpc = RpcBinding(CallPath(Admission()))
    handler = native.handlers(InferenceCore(registry, settings), rpc)[0].service(
        cast(Any, _Details())
    )
    assert handler is not None
    context = cast(Any, _Context())
    echo = EchoServicer()

    async def server_call() -> bytes:
        answer = await cast(Any, handler.unary_unary)(REQUEST, context)
        return bytes(cast(Any, handler.response_serializer)(answer))

    async def echo_call() -> bytes:
        response = await echo.Predict(pb.PredictRequest.FromString(REQUEST), context)
        return bytes(response.SerializeToString())

    try:
        return await per_call_us(server_call, calls), await per_call_us(echo_call, calls)
    finally:
        await registry.close()


def under_load(target: str, pid: int, clients: int, seconds: float) -> tuple[float, float]:
    """(req/s, server CPU microseconds per answered call) over one load run."""
    before = cpu_seconds(pid)
    stats = load(target, 1, clients, seconds)
    spent = cpu_seconds(pid) - before
    # The load generator warms up before it counts: charge that CPU to the calls it made.
    answered = stats["req_per_s"] * (stats["seconds"] + WARMUP)
    return stats["req_per_s"], spent / answered * 1e6


def model_call_us(server: ServerProcess) -> tuple[float, float]:
    """(count, sum) of mnist_model_inference_seconds from the server's /metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=30) as page:
        text = page.read().decode()
    found = dict(re.findall(r"^mnist_model_inference_seconds_(count|sum) (\S+)$", text, re.M))
    return float(found["count"]), float(found["sum"])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.path", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=50_000, help="in-process calls")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--rounds", type=int, default=3, help="load runs of each, alternating")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra mnist-serve flag (repeatable)"
    )
    args = parser.parse_args()
    server_us, echo_us = asyncio.run(in_process(args.model_dir, args.calls))
    print(f"in process, one image: server handler {server_us:.1f} us per call, "
          f"echo's own work {echo_us:.1f} us")  # fmt: skip
    echo = EchoProcess()
    server = ServerProcess(args.model_dir, "--poll-interval", "0", *args.server_arg)
    try:
        calls_before, seconds_before = model_call_us(server)
        for round_ in range(1, args.rounds + 1):
            echo_rate, echo_cpu = under_load(echo.target, echo.process.pid, args.clients,
                                             args.seconds)  # fmt: skip
            rate, cpu = under_load(server.target, server.process.pid, args.clients, args.seconds)
            print(
                f"under load, {args.clients} clients, round {round_}: mnist-serve {rate:.0f} "
                f"req/s, {cpu:.0f} us CPU per call; echo {echo_rate:.0f} req/s, {echo_cpu:.0f} "
                f"us; ratio {rate / echo_rate:.2f} req/s, {cpu / echo_cpu:.2f} CPU per call"
            )
        calls, seconds = model_call_us(server)
        mean = (seconds - seconds_before) / (calls - calls_before) * 1e6
        print(
            f"the server's model calls under load: {calls - calls_before:.0f}, mean {mean:.1f} us"
        )
    finally:
        echo.stop()
        server.stop()


if __name__ == "__main__":
    main()
