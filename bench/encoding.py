"""How much tensor encoding costs: raw bytes (`tensor_content`) vs repeated fields.

`python -m bench.encoding`. Uses TensorFlow's own TensorProto, so the comparison is the
one TensorFlow Serving clients face too.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import numpy as np

from mnist_serving.contract import IMAGE_SIDE, NUM_CLASSES
from mnist_serving.contract.tfquiet import import_tensorflow

import_tensorflow()  # before tensorflow.core, so its start-up noise stays hidden
from tensorflow.core.framework import tensor_pb2  # noqa: E402


def best_microseconds(work: Callable[[], object], number: int = 500) -> float:
    return min(timeit.repeat(work, number=number, repeat=5)) / number * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.random((256, NUM_CLASSES), dtype=np.float32)
    images = rng.integers(0, 256, size=(256, IMAGE_SIDE * IMAGE_SIDE), dtype=np.uint8)
    as_values = tensor_pb2.TensorProto(float_val=probabilities.ravel()).SerializeToString()
    as_bytes = tensor_pb2.TensorProto(tensor_content=probabilities.tobytes()).SerializeToString()
    rows = [
        (
            "encode 256x10 float32, repeated float_val",
            lambda: tensor_pb2.TensorProto(float_val=probabilities.ravel()).SerializeToString(),
        ),
        (
            "encode 256x10 float32, tensor_content bytes",
            lambda: tensor_pb2.TensorProto(
                tensor_content=probabilities.tobytes()
            ).SerializeToString(),
        ),
        (
            "decode 256x10 float32, repeated float_val",
            lambda: np.asarray(tensor_pb2.TensorProto.FromString(as_values).float_val, np.float32),
        ),
        (
            "decode 256x10 float32, tensor_content bytes",
            lambda: np.frombuffer(
                tensor_pb2.TensorProto.FromString(as_bytes).tensor_content, np.float32
            ),
        ),
        (
            "encode 256 uint8 images, repeated int_val",
            lambda: tensor_pb2.TensorProto(int_val=images.ravel()).SerializeToString(),
        ),
        (
            "encode 256 uint8 images, tensor_content bytes",
            lambda: tensor_pb2.TensorProto(tensor_content=images.tobytes()).SerializeToString(),
        ),
    ]
    for name, work in rows:
        number = 5 if "int_val" in name else 500
        print(f"{name:48s} {best_microseconds(work, number):10.1f} us")


if __name__ == "__main__":
    main()
