"""A tiny, learnable stand-in for MNIST, written as npz or IDX files for fast tests.

Each class is a bright 7x7 square at its own place on a 28x28 canvas, over faint noise:
any of the networks separates the classes within an epoch or two.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def make_split(count: int, seed: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, column = 2 + 8 * (int(label) // 4), 2 + 6 * (int(label) % 4)
        images[index, row : row + 7, column : column + 7] = rng.integers(180, 256, (7, 7))
    return images, labels


def make_arrays(train: int = 600, test: int = 200) -> dict[str, npt.NDArray[np.uint8]]:
    x_train, y_train = make_split(train, seed=1)
    x_test, y_test = make_split(test, seed=2)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_npz(
    path: Path, arrays: Mapping[str, npt.NDArray[Any]] | None = None, compressed: bool = True
) -> Path:
    members: dict[str, Any] = dict(arrays if arrays is not None else make_arrays())
    if compressed:
        np.savez_compressed(path, **members)
    else:
        np.savez(path, **members)
    return path


def idx_bytes(array: npt.NDArray[np.generic], type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_folder(
    folder: Path,
    arrays: dict[str, npt.NDArray[np.uint8]] | None = None,
    compress: bool = True,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, array in (arrays if arrays is not None else make_arrays()).items():
        content = idx_bytes(array)
        if compress:
            (folder / f"{IDX_NAMES[key]}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / IDX_NAMES[key]).write_bytes(content)
    return folder
