"""Helpers the tests share."""

from __future__ import annotations

import grpc
import numpy as np

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.launcher import ServerProcess

__all__ = ["Samples", "ServerProcess", "native", "scrape"]

# Every sample of a /metrics page, keyed by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: ServerProcess) -> Samples:
    """The server's /metrics, parsed by prometheus_client's own parser."""
    return server.scrape()


def native(target: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and classes for `images` through the native gRPC API."""
    with grpc.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        dtype = pb.DATA_TYPE_UINT8 if images.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
        answer = predict_pb2_grpc.MnistServiceStub(channel).Predict(
            pb.PredictRequest(
                images=pb.Tensor(dtype=dtype, shape=images.shape, content=images.tobytes())
            )
        )
    probabilities = np.frombuffer(answer.probabilities.content, "<f4").reshape(-1, 10)
    return probabilities, np.frombuffer(answer.classes.content, "<i8")
