"""The committed generated code is exactly what protos/generate.py makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    # In its own process: protoc's bundled C++ protobuf and TensorFlow's clash in one.
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "no code generated"
    for path in fresh:
        committed = REPO / "protos" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed"
        assert committed.read_text() == path.read_text(), f"{committed} differs; run make proto"
