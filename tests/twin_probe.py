"""Load a version's LiteRT twin the way the lean server does, with TensorFlow unimportable,
and report its answers.

Run as a script in a fresh process:

    python twin_probe.py <version_dir> <images.npy> <out_dir>

Writes <out_dir>/outputs.npz with the same keys as savedmodel_probe.py (uint8 images into
serving_default, images / 255 into serving_float) and <out_dir>/modules.json (whether any
tensorflow module was imported: it must not be, and could not be).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# A None entry makes `import tensorflow` raise ImportError, as where it is not installed.
sys.modules["tensorflow"] = None  # type: ignore[assignment]

import numpy as np  # noqa: E402

from mnist_serving.server.runtimes import litert  # noqa: E402


def main(version_dir: Path, images_file: Path, out_dir: Path) -> None:
    model = litert.load_model(version_dir, "mnist", int(version_dir.name))
    images = np.load(images_file)
    raw = model.predict(images)
    scaled = model.predict(images.astype(np.float32) / np.float32(255.0))
    np.savez(
        out_dir / "outputs.npz",
        uint8_probabilities=raw.probabilities,
        uint8_classes=raw.classes,
        float_probabilities=scaled.probabilities,
        float_classes=scaled.classes,
    )
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow" and sys.modules[m])
    (out_dir / "modules.json").write_text(json.dumps({"tensorflow": imported}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
