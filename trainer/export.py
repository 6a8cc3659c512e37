"""Export a trained model as a versioned SavedModel in TensorFlow Serving's layout, with
its LiteRT twin.

    <model_dir>/<version>/                 version: a positive integer
        saved_model.pb, variables/         the contract: TensorFlow Serving reads this too
        model.tflite                       the LiteRT twin, present only when verified
        assets.extra/metrics.json, ...     the run's report (written by the caller)

Signatures (both return the Softmax head and the argmax):
    serving_default  images uint8   [None, 28, 28], raw pixels 0..255, scaled in the graph
    serving_float    images float32 [None, 28, 28], already scaled to [0, 1]
    outputs          probabilities float32 [None, 10], classes int64 [None]

The twin is converted from the same two signatures of the written SavedModel (one
flatbuffer, same signature, input and output names), then run on the check images beside
the SavedModel: it is kept only when every class is identical and every probability is
within TWIN_TOLERANCE. Either way the result goes into metrics.json under "twin", and a
twin that disagrees (or fails to convert) is logged and left out: the version is exported
without it, and a server runs it through TensorFlow.

The export is atomic: everything is written to a hidden temporary folder beside the
versions and renamed into place only when complete. A server polling <model_dir> ignores
names that are not integers, so it never sees half a model, nor a model without its twin.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.contract import (
    IMAGE_SIDE,
    INPUT_NAME,
    REPORT,
    REPORT_DIR,
    SIGNATURE_FLOAT,
    SIGNATURE_UINT8,
    SIGNATURES,
    TWIN,
    next_version,
)
from mnist_serving.contract.tfquiet import captured_stderr, import_tensorflow

logger = logging.getLogger(__name__)

# The largest |probability difference| a twin may show on any check image: float32's own
# noise, with room. A logit near 20 is stored to 1.9e-6 and moves a probability near 0.5 by
# a quarter of that, and every runtime sums the dot products in its own order: on the 10k
# test images, the exact (float64) answer is 1.0-1.6e-6 away from the SavedModel's own
# (MLP, seeds 0-3), the SavedModel's two signatures differ by up to 8.8e-7, and twins
# differ from their SavedModels by 1.2-1.7e-6 (MLP, seeds 0-7) and 1.9e-6 (CNN, seed 0).
# `python -m bench.twin_precision` measures it. A twin that computes something else (a
# lost scaling, a wrong layer) is off by far more, and classes must be identical anyway.
TWIN_TOLERANCE = 5e-6
_RANDOM_CHECK_IMAGES = 1000  # checked when the caller passes no test images
_CHECK_BATCH = 2500


def export_saved_model(
    model: Any,
    model_dir: Path,
    version: int | None = None,
    write_extras: Callable[[Path], None] | None = None,
    *,
    twin: bool = True,
    check_images: np.ndarray | None = None,
    verbose: bool = False,
) -> Path:
    """Write `model` (float [N,28,28] -> logits) as <model_dir>/<version>; return that path.

    `write_extras(folder)` is called with the version's assets.extra folder before the
    rename, so that the report becomes visible together with the model. With `twin`, the
    LiteRT twin is converted and checked on `check_images` (uint8 [N, 28, 28]; seeded
    random pixels when None), and the check's result is added to metrics.json.
    `verbose` shows the converter's own log lines.
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

    batch = [None, IMAGE_SIDE, IMAGE_SIDE]
    archive = tf.keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE_UINT8,
        fn=lambda images: head(tf.cast(images, tf.float32) / 255.0),
        input_signature=[tf.TensorSpec(batch, tf.uint8, name=INPUT_NAME)],
    )
    archive.add_endpoint(
        name=SIGNATURE_FLOAT,
        fn=head,
        input_signature=[tf.TensorSpec(batch, tf.float32, name=INPUT_NAME)],
    )
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        archive.write_out(str(staging), verbose=False)
        extras = staging / REPORT_DIR
        extras.mkdir(exist_ok=True)
        if write_extras is not None:
            write_extras(extras)
        if twin:
            report = add_twin(staging, check_images, verbose=verbose)
            _record(staging / REPORT, "twin", report)
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a server may run as another user
        os.rename(staging, final)  # atomic on one file system; fails if final appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def add_twin(
    saved_model_dir: Path, check_images: np.ndarray | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Convert saved_model_dir's signatures to <saved_model_dir>/model.tflite, check it
    against the SavedModel, and delete it again unless it agrees. Returns the check's report."""
    if check_images is None:
        # About MNIST's ink density (a fifth of the pixels lit): uniform noise over every
        # pixel drives a trained model far outside anything it was fitted on.
        rng = np.random.default_rng(0)
        shape = (_RANDOM_CHECK_IMAGES, IMAGE_SIDE, IMAGE_SIDE)
        lit = rng.random(shape) < 0.2
        check_images = (rng.integers(0, 256, shape) * lit).astype(np.uint8)
        source = "random pixels (seed 0)"
    else:
        source = "test images"
    report: dict[str, Any] = {
        "file": TWIN,
        "published": False,
        "tolerance": TWIN_TOLERANCE,
        "check_images": len(check_images),
        "check_source": source,
    }
    try:
        flatbuffer = convert(saved_model_dir, verbose)
        report.update(compare(saved_model_dir, flatbuffer, check_images, verbose))
    except Exception as error:  # the version is still exported, served through TensorFlow
        report["reason"] = f"conversion failed: {type(error).__name__}: {_first_line(error)}"
        logger.warning("LiteRT twin not published: %s", report["reason"])
        return report
    if report["classes_identical"] and report["max_abs_difference"] <= TWIN_TOLERANCE:
        (saved_model_dir / TWIN).write_bytes(flatbuffer)
        report["published"] = True
        report["bytes"] = len(flatbuffer)
        logger.info(
            "LiteRT twin verified on %d %s: classes identical, probabilities within %.1e "
            "of the SavedModel (max difference %.1e)",
            len(check_images),
            source,
            TWIN_TOLERANCE,
            report["max_abs_difference"],
        )
    else:
        report["reason"] = (
            f"disagrees with the SavedModel: max probability difference "
            f"{report['max_abs_difference']:.3g} (tolerance {TWIN_TOLERANCE:g}), "
            f"classes agree on {report['classes_agreement']:.6f} of the images"
        )
        logger.warning("LiteRT twin not published: %s", report["reason"])
    return report


def convert(saved_model_dir: Path, verbose: bool = False) -> bytes:
    """One LiteRT flatbuffer holding both serving signatures, under their own names."""
    tf = import_tensorflow()
    failure: Exception | None = None
    flatbuffer = b""
    with captured_stderr(not verbose) as log:
        try:
            converter = tf.lite.TFLiteConverter.from_saved_model(
                str(saved_model_dir), signature_keys=list(SIGNATURES.values())
            )
            flatbuffer = converter.convert()
        except Exception as error:
            failure = error
    if failure is not None:
        logger.warning("the LiteRT converter failed; its output:\n%s", log[0][-4000:])
        raise failure
    return flatbuffer


def compare(
    saved_model_dir: Path, flatbuffer: bytes, images: np.ndarray, verbose: bool = False
) -> dict[str, Any]:
    """Both signatures of the SavedModel and of the twin on `images`, side by side."""
    from ai_edge_litert.interpreter import Interpreter

    tf = import_tensorflow()
    saved = tf.saved_model.load(str(saved_model_dir))
    with captured_stderr(not verbose):  # "Created TensorFlow Lite XNNPACK delegate for CPU."
        return _compare(Interpreter(model_content=flatbuffer, num_threads=1), saved, images)


def _compare(interpreter: Any, saved: Any, images: np.ndarray) -> dict[str, Any]:
    per_signature: dict[str, Any] = {}
    for dtype, signature in SIGNATURES.items():
        runner = interpreter.get_signature_runner(signature)
        function = saved.signatures[signature]
        difference = 0.0
        agreeing = 0
        for start in range(0, len(images), _CHECK_BATCH):
            chunk = images[start : start + _CHECK_BATCH]
            batch = chunk if dtype == "uint8" else chunk.astype(np.float32) / np.float32(255)
            expected = {k: v.numpy() for k, v in function(**{INPUT_NAME: batch}).items()}
            got = runner(**{INPUT_NAME: batch})
            difference = max(
                difference,
                float(np.abs(got["probabilities"] - expected["probabilities"]).max()),
            )
            agreeing += int((got["classes"] == expected["classes"]).sum())
        per_signature[signature] = {
            "max_abs_difference": difference,
            "classes_agreement": agreeing / len(images),
        }
    return {
        "max_abs_difference": max(s["max_abs_difference"] for s in per_signature.values()),
        "classes_agreement": min(s["classes_agreement"] for s in per_signature.values()),
        "classes_identical": all(s["classes_agreement"] == 1.0 for s in per_signature.values()),
        "signatures": per_signature,
    }


def _record(path: Path, key: str, value: Any) -> None:
    """Add `key` to the JSON report at path (made when the caller wrote none)."""
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        report = {}
    report[key] = value
    path.write_text(json.dumps(report, indent=2) + "\n")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""
