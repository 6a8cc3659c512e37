"""Generate the Python code for every .proto under protos/: `python protos/generate.py`.

The one way generated code is made; it is committed so that installing the client needs
no protoc, and never edited by hand (tests/test_protos.py checks it matches this script).

- protos/mnist/: this project's own API. Messages go into protobuf's default pool, with
  gRPC stubs for clients.
- every other folder: wire-compatible copies of other projects' public protos (TensorFlow
  Serving, the Open Inference Protocol), for the server only. Their messages go into the
  private pool of protos/_pool.py (see there why), and no stubs are made: the server serves
  them through generic handlers.
"""

from __future__ import annotations

import re
import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
PACKAGE = "mnist_serving.protos"
OWN = "mnist"
_DEFAULT_POOL = "_descriptor_pool.Default()"


def generate(out_dir: Path = PROTOS) -> list[Path]:
    sources = sorted(PROTOS.rglob("*.proto"))
    own = [s for s in sources if s.relative_to(PROTOS).parts[0] == OWN]
    copies = [s for s in sources if s not in own]
    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto, bundled with protoc
    common = [
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
    ]
    for args in ([*common, f"--grpc_python_out={out_dir}"], own), (common, copies):
        if args[1] and protoc.main(["grpc_tools.protoc", *args[0], *map(str, args[1])]) != 0:
            raise SystemExit("protoc failed")
    # protoc writes imports rooted at the include path ("from mnist.v1 import ..."); the
    # package installs as mnist_serving.protos, so they are made absolute under it.
    roots = sorted({s.relative_to(PROTOS).parts[0] for s in sources})
    absolute = re.compile(rf"^(from|import) ((?:{'|'.join(roots)})(?:\.\w+)*)", re.MULTILINE)
    written = sorted(p for p in out_dir.rglob("*_pb2*.py*"))
    for path in written:
        text = absolute.sub(rf"\1 {PACKAGE}.\2", path.read_text())
        if path.relative_to(out_dir).parts[0] != OWN and path.suffix == ".py":
            if _DEFAULT_POOL not in text:
                raise SystemExit(f"{path}: protoc's output changed; expected {_DEFAULT_POOL}")
            text = text.replace(_DEFAULT_POOL, "_pool.POOL").replace(
                "# @@protoc_insertion_point(imports)",
                f"from {PACKAGE} import _pool\n# @@protoc_insertion_point(imports)",
            )
        path.write_text(text)
    for folder in {p.parent for p in written}:
        # Each folder between out_dir and the modules must be a package.
        while folder != out_dir and out_dir in folder.parents:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS):
        print(path)
