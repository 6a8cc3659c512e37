"""Model runtimes behind one small interface: load a version folder, predict a batch.

Each runtime is one module, and only it imports its framework: tensorflow.py imports
TensorFlow, litert.py imports ai_edge_litert; nothing else in server/ does, and neither is
imported before a version needs it. A loaded version is a `Model`.

Which runtime serves a version (--runtime):
- auto (default): its LiteRT twin (model.tflite) when it has one, else TensorFlow;
- litert: its twin; a version without one is refused;
- tensorflow: the SavedModel through TensorFlow, as before twins existed.
A server installed without TensorFlow (`pip install mnist-serving[server]`) serves twins
only, and refuses a version without one with a message that says what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from mnist_serving.contract import TWIN

from ..errors import StartupError
from .base import Model, Prediction

__all__ = [
    "RUNTIMES",
    "Model",
    "Prediction",
    "RuntimeSetting",
    "RuntimeUnavailable",
    "import_runtime",
    "load_model",
    "runtime_for",
]

RuntimeSetting = Literal["auto", "litert", "tensorflow"]
RUNTIMES: tuple[RuntimeSetting, ...] = ("auto", "litert", "tensorflow")
INSTALL_TENSORFLOW = "pip install 'mnist-serving[tensorflow]'"


class RuntimeUnavailable(Exception):
    """This server cannot run a version: no twin where one is required, no TensorFlow."""


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def runtime_for(path: Path, setting: RuntimeSetting) -> str:
    """The runtime that serves the version in `path` under --runtime `setting`."""
    has_twin = (path / TWIN).is_file()
    if setting == "litert" or (setting == "auto" and has_twin):
        if not has_twin:
            raise RuntimeUnavailable(
                f"it has no LiteRT twin ({TWIN}) and --runtime litert serves twins only: "
                "export it again with mnist-train (which adds a verified twin), "
                "or serve it with --runtime auto"
            )
        return "litert"
    if not tensorflow_installed():
        raise RuntimeUnavailable(
            f"it has no LiteRT twin ({TWIN}) and TensorFlow is not installed: "
            f"{INSTALL_TENSORFLOW} to serve it through TensorFlow, "
            "or export it again with mnist-train (which adds a verified twin)"
        )
    return "tensorflow"


def import_runtime(setting: RuntimeSetting = "auto", verbose: bool = False) -> None:
    """Import what every version will need now, once per process, before any load:
    TensorFlow (seconds) only for --runtime tensorflow; auto imports it only when a version
    without a twin turns up."""
    if setting != "tensorflow":
        return
    if not tensorflow_installed():
        raise StartupError(f"--runtime tensorflow needs TensorFlow: {INSTALL_TENSORFLOW}")
    from . import tensorflow

    tensorflow.import_runtime(verbose)


def load_model(
    path: Path, name: str, version: int, setting: RuntimeSetting = "auto", verbose: bool = False
) -> Model:
    """Load, check and warm up the version in `path` with the runtime `setting` picks."""
    if runtime_for(path, setting) == "litert":
        from . import litert

        return litert.load_model(path, name, version, verbose)
    from . import tensorflow

    return tensorflow.load_model(path, name, version, verbose)
