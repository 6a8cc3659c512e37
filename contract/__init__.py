"""What the trainer and the server agree on, and nothing else: the artifact on disk.

Neither job owns this module; each imports it, and neither imports the other.

    <model_dir>/<version>/                 version: a positive integer, exactly ("4", not "04")
        saved_model.pb, variables/         the SavedModel: the contract TF Serving also reads
        model.tflite                       its LiteRT twin (optional; present only when verified)
        assets.extra/metrics.json, ...     the training report

Signatures (in the SavedModel and in the twin, same names; both return the Softmax head
and the argmax):
    serving_default  images uint8   [None, 28, 28], raw pixels 0..255, scaled in the graph
    serving_float    images float32 [None, 28, 28], already scaled to [0, 1]
    outputs          probabilities float32 [None, 10], classes int64 [None]

Names that are not versions (the trainer's hidden `.tmp-*` staging folders) are never
looked at, so a reader never sees half a version.
"""

from __future__ import annotations

import re
from pathlib import Path

SIGNATURE_UINT8 = "serving_default"
SIGNATURE_FLOAT = "serving_float"
# Input dtype name -> the signature that takes it.
SIGNATURES = {"uint8": SIGNATURE_UINT8, "float32": SIGNATURE_FLOAT}
INPUT_NAME = "images"
OUTPUTS = ("probabilities", "classes")
NUM_CLASSES = 10
IMAGE_SIDE = 28

SAVED_MODEL = "saved_model.pb"
TWIN = "model.tflite"
REPORT_DIR = "assets.extra"
REPORT = Path(REPORT_DIR) / "metrics.json"

_VERSION = re.compile(r"[1-9][0-9]*")


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """The complete exports under model_dir by version: folders named exactly by a positive
    integer (hidden temporary folders and anything else are not versions)."""
    if not model_dir.is_dir():
        return {}
    return {
        int(p.name): p for p in model_dir.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir()
    }


def existing_versions(model_dir: Path) -> list[int]:
    """Version numbers present under model_dir, ascending (complete exports only)."""
    return sorted(version_dirs(model_dir))


def next_version(model_dir: Path) -> int:
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1
