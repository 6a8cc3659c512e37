"""Import TensorFlow without the start-up noise it prints on a CPU-only machine.

TensorFlow's C++ runtime logs CUDA, oneDNN and CPU-feature lines to stderr at import time,
before any Python-side setting (TF_CPP_MIN_LOG_LEVEL included) can reach it. They are not
errors here, so unless the caller asks for them, stderr is pointed at /dev/null while the
import runs and restored right after. The same goes for the LiteRT converter's MLIR lines
and the interpreter's "Created TensorFlow Lite XNNPACK delegate" line: `captured_stderr`
holds what the C++ side writes to file descriptor 2 so that the caller can show it when
something failed, and drop it otherwise. Shared by the trainer and the server's runtimes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from types import ModuleType


@contextlib.contextmanager
def captured_stderr(enabled: bool = True) -> Iterator[list[str]]:
    """Redirect file descriptor 2 into a temporary file for the block; the list it yields
    receives that text (one string) once the block ends, whether it raised or not."""
    captured: list[str] = []
    if not enabled:
        yield captured
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def import_tensorflow(
    verbose: bool = False, keep: Callable[[str], bool] | None = None
) -> ModuleType:
    """`import tensorflow`, quietly unless `verbose`. Lines that other threads write to
    stderr meanwhile are caught too: those for which `keep(line)` holds are written back."""
    if "tensorflow" in sys.modules or verbose:
        import tensorflow

        module: ModuleType = tensorflow
        return module
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    log: list[str] = []
    try:
        with captured_stderr() as log:
            import tensorflow
    finally:
        kept = [line for line in "".join(log).splitlines(True) if keep and keep(line)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
    tensorflow.get_logger().setLevel("ERROR")
    quiet: ModuleType = tensorflow
    return quiet
