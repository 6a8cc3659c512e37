"""Export a trained model as a versioned SavedModel in TensorFlow Serving's layout.

    <model_dir>/<version>/                 version: a positive integer
        saved_model.pb, variables/
        assets.extra/metrics.json, ...     the run's report (written by the caller)

Signatures (both return the Softmax head and the argmax):
    serving_default  images uint8   [None, 28, 28], raw pixels 0..255, scaled in the graph
    serving_float    images float32 [None, 28, 28], already scaled to [0, 1]
    outputs          probabilities float32 [None, 10], classes int64 [None]

The export is atomic: everything is written to a hidden temporary folder beside the
versions and renamed into place only when complete. A server polling <model_dir> ignores
names that are not integers, so it never sees half a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_serving.contract import (
    INPUT_NAME,
    REPORT_DIR,
    SIGNATURE_FLOAT,
    SIGNATURE_UINT8,
    next_version,
)
from mnist_serving.contract.tfquiet import import_tensorflow


def export_saved_model(
    model: Any,
    model_dir: Path,
    version: int | None = None,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` (float [N,28,28] -> logits) as <model_dir>/<version>; return that path.

    `write_extras(folder)` is called with the version's assets.extra folder before the
    rename, so that the report becomes visible together with the model.
    """
    tf = import_tensorflow()
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = next_version(model_dir)
    if version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    final = model_dir / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; pick another --version")

    def head(images: Any) -> dict[str, Any]:
        probabilities = tf.nn.softmax(model(images, training=False), axis=-1)
        classes = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {"probabilities": probabilities, "classes": classes}

    archive = tf.keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE_UINT8,
        fn=lambda images: head(tf.cast(images, tf.float32) / 255.0),
        input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name=INPUT_NAME)],
    )
    archive.add_endpoint(
        name=SIGNATURE_FLOAT,
        fn=head,
        input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name=INPUT_NAME)],
    )
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        archive.write_out(str(staging), verbose=False)
        extras = staging / REPORT_DIR
        extras.mkdir(exist_ok=True)
        if write_extras is not None:
            write_extras(extras)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a server may run as another user
        os.rename(staging, final)  # atomic on one file system; fails if final appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
