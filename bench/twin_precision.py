"""`python -m bench.twin_precision --model-dir DIR [--data mnist.npz]`: how far apart the
SavedModel, its LiteRT twin and exact arithmetic answer, as max |probability difference|
over the 10k test images.

What sets the trainer's TWIN_TOLERANCE. Each version (the newest unless --version) is run
through both signatures of the SavedModel (TensorFlow) and of the twin (LiteRT, XNNPACK,
as the server runs it; also LiteRT's own kernels, without the XNNPACK delegate), and, for
the MLP, through a float64 evaluation of its weights (the exact answer, rounded once). The
float32 signature gets pixels / 255 rounded once (numpy), as a client would send them.
Prints a matrix of max differences and, per pair, how many images differ by over 1e-6.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.contract import (
    INPUT_NAME,
    SIGNATURE_FLOAT,
    SIGNATURE_UINT8,
    TWIN,
    existing_versions,
)
from mnist_serving.contract.tfquiet import captured_stderr, import_tensorflow

BATCH = 2500
THRESHOLD = 1e-6


def batched(call: Callable[..., Any], images: np.ndarray) -> np.ndarray:
    """Probabilities of `call(images=...)` (a signature of either runtime), BATCH at a time."""
    return np.concatenate(
        [
            np.asarray(call(**{INPUT_NAME: images[s : s + BATCH]})["probabilities"])
            for s in range(0, len(images), BATCH)
        ]
    )


def exact(saved: Any, pixels: np.ndarray) -> np.ndarray | None:
    """Flatten -> Dense(relu) -> Dense -> softmax in float64 from the SavedModel's own
    float32 weights; None for any other architecture."""
    weights = [v.numpy().astype(np.float64) for v in saved.variables]
    if [w.ndim for w in weights] != [2, 1, 2, 1]:
        return None
    kernel_1, bias_1, kernel_2, bias_2 = weights
    hidden = np.maximum(pixels.reshape(len(pixels), -1).astype(np.float64) @ kernel_1 + bias_1, 0)
    logits = hidden @ kernel_2 + bias_2
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def answers(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    tf = import_tensorflow()
    saved = tf.saved_model.load(str(version_dir))
    scaled = images.astype(np.float32) / np.float32(255)
    found: dict[str, np.ndarray] = {}
    for label, signature, pixels in (("uint8", SIGNATURE_UINT8, images),
                                     ("float32", SIGNATURE_FLOAT, scaled)):  # fmt: skip
        found[f"SavedModel {label}"] = batched(saved.signatures[signature], pixels)
        resolvers = {
            "XNNPACK": OpResolverType.AUTO,
            "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        }
        for kernels, resolver in resolvers.items():
            interpreter = Interpreter(
                model_path=str(version_dir / TWIN),
                num_threads=1,
                experimental_op_resolver_type=resolver,
            )
            runner = interpreter.get_signature_runner(signature)
            with captured_stderr(True):  # "Created TensorFlow Lite XNNPACK delegate for CPU."
                found[f"twin {label} {kernels}"] = batched(runner, pixels)
    reference = exact(saved, scaled)
    if reference is not None:
        found["exact (float64)"] = reference
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.twin_precision", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--version", type=int, help="default: the newest")
    parser.add_argument("--data", type=Path, default=os.environ.get("MNIST_PATH"),
                        help="mnist.npz (default: $MNIST_PATH)")  # fmt: skip
    args = parser.parse_args()
    if args.data is None:
        parser.error("pass --data or set MNIST_PATH")
    version = args.version or max(existing_versions(args.model_dir))
    version_dir = args.model_dir / str(version)
    if not (version_dir / TWIN).exists():
        parser.error(f"{version_dir} has no {TWIN}")
    with np.load(args.data) as data:
        images = data["x_test"]
    found = answers(version_dir, images)
    names = list(found)
    width = max(len(n) for n in names)
    print(f"version {version}, {len(images)} test images: max |probability difference| "
          f"(images differing by over {THRESHOLD:g})")  # fmt: skip
    for a in names:
        cells = []
        for b in names:
            difference = np.abs(found[a] - found[b]).max(axis=1)
            cells.append(f"{difference.max():.2e} ({int((difference > THRESHOLD).sum()):>2})")
        print(f"{a:<{width}}  " + "  ".join(cells))
    print("columns in the same order as the rows")


if __name__ == "__main__":
    main()
