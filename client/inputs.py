"""Where images come from: .npz/.npy arrays, IDX files, image files and folders.

A `Source` is an ordered collection of inputs with a key per input (its index, or its
file name), optional labels, and `load(start, stop)` that reads just that slice: folders
of images are decoded a batch at a time, so a scoring job never holds them all.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import IMAGE_SIDE
from mnist_serving.contract.idx import IdxError, read_idx

from .codec import as_batch
from .errors import InputFileError, MnistError
from .images import IMAGE_SUFFIXES, ImageError, read_image

Batch = npt.NDArray[np.uint8] | npt.NDArray[np.float32]
SPLITS = ("test", "train")
# The original file names: t10k-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz).
_IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$")
_IDX_PREFIX = {"test": "t10k", "train": "train"}


def folder_labels(folders: Sequence[str]) -> npt.NDArray[np.int64] | None:
    """Each image's label from its folder's name when every one is a digit 0-9 (MNIST's
    image-folder layout), else None. ASCII only: str.isdigit() also passes "²", which
    int() refuses."""
    if folders and all(len(name) == 1 and name in "0123456789" for name in folders):
        return np.array([int(name) for name in folders], np.int64)
    return None


class Source:
    """Inputs in order. `keys` are file names (str) or None, meaning keys are indices."""

    def __init__(
        self,
        description: str,
        count: int,
        *,
        keys: Sequence[str] | None = None,
        labels: npt.NDArray[np.int64] | None = None,
    ) -> None:
        self.description = description
        self.count = count
        self.keys = keys
        self.labels = labels
        if labels is not None and len(labels) != count:
            raise InputFileError(f"{description}: {count} images but {len(labels)} labels")

    def __len__(self) -> int:
        return self.count

    @property
    def key_name(self) -> str:
        return "index" if self.keys is None else "file"

    def key(self, index: int) -> str | int:
        return index if self.keys is None else self.keys[index]

    def load(self, start: int, stop: int) -> tuple[Batch, dict[int, str]]:
        """Inputs start..stop-1 that could be read, in order, and a message for each one
        (by index) that could not: one bad file fails its own row, not its batch."""
        raise NotImplementedError


class ArraySource(Source):
    def __init__(
        self,
        description: str,
        images: npt.ArrayLike,
        labels: npt.ArrayLike | None = None,
    ) -> None:
        try:
            self.images = as_batch(images)
        except MnistError as error:
            raise InputFileError(f"{description}: {error.details}") from None
        super().__init__(
            description, len(self.images), labels=None if labels is None else _labels(labels)
        )

    def load(self, start: int, stop: int) -> tuple[Batch, dict[int, str]]:
        return self.images[start:stop], {}


class ImageFilesSource(Source):
    """Image files, decoded when loaded. Labels come from the parent folders when every
    file sits in a folder named after its digit (folder/7/x.png)."""

    def __init__(
        self, description: str, files: Sequence[Path], keys: Sequence[str], invert: bool
    ) -> None:
        self.files = list(files)
        self.invert = invert
        labels = folder_labels([f.parent.name for f in self.files])
        super().__init__(description, len(self.files), keys=keys, labels=labels)

    def load(self, start: int, stop: int) -> tuple[Batch, dict[int, str]]:
        images = np.empty((stop - start, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
        bad: dict[int, str] = {}
        for index in range(start, stop):
            try:
                images[index - start - len(bad)] = read_image(self.files[index], invert=self.invert)
            except ImageError as error:
                bad[index] = str(error)
        return images[: stop - start - len(bad)], bad


def _labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InputFileError(
            f"labels must be integers of shape [N], got {array.dtype} {list(array.shape)}"
        )
    return array.astype(np.int64)


def open_source(path: Path, *, split: str = "test", invert: bool = False) -> Source:
    """A source for `path`: a folder (IDX files, else images), .npz, .npy, IDX or image file."""
    if not path.exists():
        raise InputFileError(f"{path}: no such file or folder")
    if path.is_dir():
        if any(_IDX_IMAGES.search(p.name) for p in path.iterdir()):
            return _idx_folder(path, split)
        return _image_folder(path, invert)
    name = path.name.lower()
    if name.endswith(".npz"):
        return _npz(path, split)
    if name.endswith(".npy"):
        return _npy(path)
    if "idx" in name or name.endswith("-ubyte"):
        return _idx_file(path)
    if name.endswith(IMAGE_SUFFIXES):
        return ImageFilesSource(str(path), [path], [path.name], invert)
    raise InputFileError(
        f"{path}: unknown kind of input; expected .png/.jpg/.jpeg, .npy, .npz, an IDX file "
        "or a folder"
    )


def _npz(path: Path, split: str) -> Source:
    images, labels, keras = read_npz(path, str(path), split)
    return ArraySource(f"{path}[x_{split}]" if keras else str(path), images, labels)


def read_npz(
    source: Path | BinaryIO, where: str, split: str
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(images, labels or None, whether it is Keras' layout) from an .npz archive: Keras'
    x_<split> with y_<split> when present, or its one array. `where` names it in errors."""
    try:
        with np.load(source, allow_pickle=False) as archive:
            names = archive.files
            if f"x_{split}" in names:
                labels = archive[f"y_{split}"] if f"y_{split}" in names else None
                return archive[f"x_{split}"], labels, True
            if len(names) == 1:
                return archive[names[0]], None, False
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputFileError(f"{where}: not a readable .npz archive ({error})") from None
    raise InputFileError(
        f"{where}: expected Keras' layout (x_{split}, y_{split}) or a single array, "
        f"found {', '.join(names) or 'no arrays'}"
    )


def _npy(path: Path) -> Source:
    try:
        # Memory-mapped: slices are read from disk a batch at a time.
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputFileError(f"{path}: not a readable .npy array ({error})") from None
    return ArraySource(str(path), images)


def _read_idx(path: Path) -> npt.NDArray[np.generic]:
    try:
        return read_idx(path)
    except IdxError as error:
        raise InputFileError(str(error)) from None


def _idx_file(path: Path) -> Source:
    """An IDX images file; its labels are read from the sibling labels file if present."""
    images = _read_idx(path)
    labels_path = _labels_sibling(path)
    labels = _read_idx(labels_path) if labels_path is not None else None
    return ArraySource(str(path), images, labels)


def _labels_sibling(images_path: Path) -> Path | None:
    name = images_path.name.replace("images-idx3", "labels-idx1")
    if name == images_path.name:
        return None
    for candidate in (name, name.removesuffix(".gz"), name + ".gz"):
        if (images_path.parent / candidate).is_file():
            return images_path.parent / candidate
    return None


def _idx_folder(folder: Path, split: str) -> Source:
    prefix = _IDX_PREFIX[split]
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"):
        if (folder / name).is_file():
            return _idx_file(folder / name)
    raise InputFileError(f"{folder}: no {prefix}-images-idx3-ubyte[.gz] for the {split} split")


def _image_folder(folder: Path, invert: bool) -> Source:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise InputFileError(f"{folder}: no .png/.jpg/.jpeg images in this folder")
    keys = [p.relative_to(folder).as_posix() for p in files]
    return ImageFilesSource(str(folder), files, keys, invert)
