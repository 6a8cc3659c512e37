"""Generate the Python code for every .proto under protos/: `python protos/generate.py`.

The one way generated code is made; it is committed so that installing the client needs
no protoc, and never edited by hand (tests/test_protos.py checks it matches this script).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
# protoc writes absolute imports rooted at the include path ("from mnist.v1 import ...");
# the package installs as mnist_serving.protos, so sibling imports must be relative.
_ABSOLUTE_IMPORT = re.compile(r"^from mnist\.v(\d+) import (\w+_pb2)", re.MULTILINE)


def generate(out_dir: Path = PROTOS) -> list[Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out_dir.rglob("*_pb2*.py*"))
    for path in written:
        text = path.read_text()
        path.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \2", text))
    for folder in {p.parent for p in written}:
        # Each folder between out_dir and the modules must be a package.
        while folder != out_dir and out_dir in folder.parents:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS):
        print(path)
