"""Load an exported SavedModel the way a server does and report what it sees.

Run as a script in a fresh process, so that nothing the exporting process built (Keras
objects, traced functions) can stand in for what is on disk:

    python savedmodel_probe.py <version_dir> <images.npy> <out_dir>

<images.npy> holds uint8 [N, 28, 28]. Writes <out_dir>/signatures.json (for each signature:
inputs and outputs with dtype and shape) and <out_dir>/outputs.npz (probabilities and
classes of both signatures: uint8 images into serving_default, images / 255 into
serving_float).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.contract.tfquiet import import_tensorflow


def describe(spec: Any) -> dict[str, Any]:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


def main(version_dir: Path, images_file: Path, out_dir: Path) -> None:
    tf = import_tensorflow()
    loaded = tf.saved_model.load(str(version_dir))
    signatures: dict[str, Any] = {}
    for name, function in loaded.signatures.items():
        _, input_specs = function.structured_input_signature
        signatures[name] = {
            "inputs": {key: describe(spec) for key, spec in input_specs.items()},
            "outputs": {key: describe(spec) for key, spec in function.structured_outputs.items()},
        }
    (out_dir / "signatures.json").write_text(json.dumps(signatures, indent=2))

    images = np.load(images_file)
    raw = loaded.signatures["serving_default"](images=tf.constant(images, tf.uint8))
    scaled = loaded.signatures["serving_float"](
        images=tf.constant(images.astype(np.float32) / np.float32(255.0))
    )
    np.savez(
        out_dir / "outputs.npz",
        uint8_probabilities=raw["probabilities"].numpy(),
        uint8_classes=raw["classes"].numpy(),
        float_probabilities=scaled["probabilities"].numpy(),
        float_classes=scaled["classes"].numpy(),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
