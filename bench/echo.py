"""A bare grpc.aio server with the same API that answers without a model: the baseline.

It decodes nothing and runs nothing; it answers each Predict with a response of the size
the real server would send (N x 10 float32 + N int64), so the two differ only by the work
mnist-serve does. `python -m bench.echo --port 0` prints `port=<N>` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from typing import Any

import grpc

from mnist_serving.contract import NUM_CLASSES
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .harness import MAX_MESSAGE_BYTES


class EchoServicer(predict_pb2_grpc.MnistServiceServicer):  # type: ignore[misc]
    async def Predict(
        self, request: pb.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        count = request.images.shape[0] if request.images.shape else 1
        return pb.PredictResponse(
            model_spec=pb.ModelSpec(name="echo", version=1),
            probabilities=pb.Tensor(
                dtype=pb.DATA_TYPE_FLOAT32,
                shape=[count, NUM_CLASSES],
                content=bytes(count * NUM_CLASSES * 4),
            ),
            classes=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[count], content=bytes(count * 8)),
        )


async def serve(port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    predict_pb2_grpc.add_MnistServiceServicer_to_server(EchoServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"port={bound}", flush=True)
    await server.wait_for_termination()


class EchoProcess:
    """This echo server in a process of its own, on a free port (for the benchmarks)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.echo", "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.target = f"127.0.0.1:{int(line.strip().split('=')[1])}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
