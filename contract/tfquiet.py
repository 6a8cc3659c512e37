"""Import TensorFlow without the start-up noise it prints on a CPU-only machine.

TensorFlow's C++ runtime logs CUDA, oneDNN and CPU-feature lines to stderr at import time,
before any Python-side setting (TF_CPP_MIN_LOG_LEVEL included) can reach it. They are not
errors here, so unless the caller asks for them, stderr is pointed at /dev/null while the
import runs and restored right after. Shared by the trainer and server/model.py.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType


def import_tensorflow(verbose: bool = False) -> ModuleType:
    if "tensorflow" in sys.modules or verbose:
        import tensorflow

        module: ModuleType = tensorflow
        return module
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tensorflow.get_logger().setLevel("ERROR")
    quiet: ModuleType = tensorflow
    return quiet
