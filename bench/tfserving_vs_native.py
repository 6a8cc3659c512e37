"""What a TensorFlow Serving Predict costs next to a native Predict, same server, same images.

    python -m bench.tfserving_vs_native --model-dir models/mnist [--rounds 200]

Starts the real server in its own process (mnist_serving.server.launcher), then calls it
one request at a time, native and TF Serving alternating within each round so that both see
the same machine load:
- native: mnist.v1 Predict, numpy bytes in and out;
- tfserving tensor_content: tf.make_tensor_proto / tf.make_ndarray, as TF Serving clients do;
- tfserving int_val: the same tensor with its pixels in int_val instead of tensor_content.
Reports the median client-side time of a whole call (build the request, RPC, decode the
answer) and the server's mean handling time from its own histogram, per API.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from mnist_serving.contract import IMAGE_SIDE, INPUT_NAME
from mnist_serving.contract.tfquiet import import_tensorflow
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.launcher import ServerProcess

tf = import_tensorflow()
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402


def server_seconds(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the Predict duration histogram, per API."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("method") != "Predict":
                continue
            api = sample.labels["api"]
            if sample.name == "mnist_request_duration_seconds_sum":
                totals.setdefault(api, [0.0, 0.0])[0] = sample.value
            elif sample.name == "mnist_request_duration_seconds_count":
                totals.setdefault(api, [0.0, 0.0])[1] = sample.value
    return {api: (s, c) for api, (s, c) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tfserving_vs_native", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    server = ServerProcess(args.model_dir, "--poll-interval", "0")
    try:
        channel = grpc.insecure_channel(server.target)
        native = predict_pb2_grpc.MnistServiceStub(channel)
        tfserving = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call_native(images: np.ndarray) -> np.ndarray:
            tensor = pb.Tensor(
                dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes()
            )
            response = native.Predict(pb.PredictRequest(images=tensor))
            probabilities = np.frombuffer(response.probabilities.content, dtype="<f4")
            return probabilities.reshape(tuple(response.probabilities.shape))

        def call_tfserving(images: np.ndarray, values: bool) -> np.ndarray:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist"
            tensor = request.inputs[INPUT_NAME]
            tensor.CopyFrom(tf.make_tensor_proto(images))
            if values:
                tensor.ClearField("tensor_content")
                tensor.int_val.extend(images.ravel())
            response = tfserving.Predict(request)
            probabilities: np.ndarray = tf.make_ndarray(response.outputs["probabilities"])
            return probabilities

        forms: dict[str, Callable[[np.ndarray], Any]] = {
            "tensor_content": lambda images: call_tfserving(images, values=False),
            "int_val": lambda images: call_tfserving(images, values=True),
        }
        rng = np.random.default_rng(0)
        print(
            f"{'images':>6}  {'tfserving form':<14} {'native ms':>9} {'tfserving ms':>12} "
            f"{'ratio':>6}   server: {'native ms':>9} {'tfserving ms':>12}"
        )
        for count in (1, 256):
            images = rng.integers(0, 256, size=(count, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
            for form, call in forms.items():
                # Warm-up, and a check that both answer the same.
                np.testing.assert_allclose(call(images), call_native(images), atol=1e-6)
                for _ in range(10):
                    call(images), call_native(images)
                pair = {"native": call_native, "tfserving": call}
                times: dict[str, list[float]] = {api: [] for api in pair}
                before = server_seconds(server.metrics_url)
                for round_ in range(args.rounds):
                    order = list(pair.items())
                    if round_ % 2:
                        order.reverse()
                    for api, function in order:
                        started = time.perf_counter()
                        function(images)
                        times[api].append(time.perf_counter() - started)
                after = server_seconds(server.metrics_url)
                native_ms, tfserving_ms = (1e3 * statistics.median(times[api]) for api in pair)
                print(
                    f"{count:>6}  {form:<14} {native_ms:>9.3f} {tfserving_ms:>12.3f} "
                    f"{tfserving_ms / native_ms:>5.2f}x   server: "
                    f"{mean_ms(before, after, 'native'):>9.3f} "
                    f"{mean_ms(before, after, 'tfserving'):>12.3f}"
                )
    finally:
        server.stop()


def mean_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], api: str
) -> float:
    seconds = after[api][0] - before.get(api, (0.0, 0.0))[0]
    count = after[api][1] - before.get(api, (0.0, 0.0))[1]
    return 1e3 * seconds / count


if __name__ == "__main__":
    main()
