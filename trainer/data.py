"""Read MNIST from Keras' `mnist.npz` layout or from the original IDX files, with numpy only.

Two sources on disk are understood:

    mnist.npz       x_train uint8 [N, 28, 28], y_train [N], x_test uint8 [M, 28, 28], y_test [M]
    a folder        train-images-idx3-ubyte, train-labels-idx1-ubyte,
                    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each plain or .gz)

Every problem with a file (missing, truncated, not the format it claims, wrong shape or
dtype, labels out of range, counts that do not match) is raised as `DataError` with a
one-line message that names the file and says what is wrong. Nothing here imports
TensorFlow except `download_with_keras`, which imports it lazily.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import IMAGE_SIDE, NUM_CLASSES
from mnist_serving.contract.idx import IdxError, read_idx

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
KERAS_SOURCE = "keras-download"
# What `tf.keras.datasets.mnist.load_data()` fetches, and the checksum it verifies.
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive (maybe empty)
_NPY_MAGIC = b"\x93NUMPY"

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.uint8]


class DataError(ValueError):
    """A data source that cannot be used; the message is one line, fit for the user."""


@dataclass(frozen=True)
class Dataset:
    """MNIST as raw uint8 pixels (0..255) and uint8 labels (0..9), plus where it came from."""

    x_train: Images
    y_train: Labels
    x_test: Images
    y_test: Labels
    source: str  # the path read, or KERAS_SOURCE
    sha256: str  # of the file, or of the four IDX files read in IDX_FILES order
    files: dict[str, str]  # file name -> its sha256


def scale(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Raw pixels 0..255 -> float32 in [0, 1], the input both networks are trained on."""
    return images.astype(np.float32) / np.float32(255.0)


def sha256_file(path: Path) -> str:
    return _digest_files([path])


def _digest_files(paths: list[Path]) -> str:
    """sha256 of the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _images(array: npt.NDArray[np.generic], name: str, origin: str) -> Images:
    if array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{origin}: {name} has shape {array.shape}, expected (N, {IMAGE_SHAPE[0]}, "
            f"{IMAGE_SHAPE[1]})"
        )
    if array.dtype != np.uint8:
        # Any other dtype is refused rather than guessed at: float pixels may be 0..1 or 0..255.
        raise DataError(f"{origin}: {name} has dtype {array.dtype}, expected uint8 pixels 0..255")
    return array.astype(np.uint8, copy=False)


def _labels(array: npt.NDArray[np.generic], name: str, origin: str) -> Labels:
    if array.ndim != 1:
        raise DataError(f"{origin}: {name} has shape {array.shape}, expected (N,)")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{origin}: {name} has dtype {array.dtype}, expected integer labels")
    if array.size and (array.min() < 0 or array.max() >= NUM_CLASSES):
        raise DataError(
            f"{origin}: {name} holds labels {array.min()}..{array.max()}, "
            f"expected 0..{NUM_CLASSES - 1}"
        )
    return array.astype(np.uint8)


def _check_split(
    images: Images, labels: Labels, split: str, images_from: str, labels_from: str
) -> None:
    if len(images) != len(labels):
        where = images_from if images_from == labels_from else f"{images_from} and {labels_from}"
        raise DataError(f"{where}: {split} set has {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{images_from}: {split} set is empty")


def load_npz(path: Path) -> Dataset:
    """Read a file in Keras' mnist.npz layout (no pickled objects are ever loaded)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        with path.open("rb") as stream:
            head = stream.read(len(_NPY_MAGIC))
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"{path}: a single .npy array, expected an .npz archive")
    if not head.startswith(_ZIP_MAGIC):
        kind = "empty file" if not head else "no zip header"
        raise DataError(f"{path}: not an npz archive ({kind}); expected Keras' mnist.npz layout")
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; an MNIST npz holds "
                    f"{', '.join(NPZ_KEYS)} (found: {', '.join(archive.files) or 'none'})"
                )
            for key in NPZ_KEYS:
                arrays[key] = archive[key]
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated npz archive ({err})") from None
    except ValueError as err:
        # A member that is not a valid .npy array, or holds pickled objects.
        raise DataError(f"{path}: unreadable array in the npz archive ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    origin = str(path)
    x_train = _images(arrays["x_train"], "x_train", origin)
    y_train = _labels(arrays["y_train"], "y_train", origin)
    x_test = _images(arrays["x_test"], "x_test", origin)
    y_test = _labels(arrays["y_test"], "y_test", origin)
    _check_split(x_train, y_train, "training", origin, origin)
    _check_split(x_test, y_test, "test", origin, origin)
    digest = sha256_file(path)
    return Dataset(x_train, y_train, x_test, y_test, origin, digest, {path.name: digest})


def find_idx_files(folder: Path) -> dict[str, Path]:
    """The four IDX files in `folder`, each found as <name> or <name>.gz (plain preferred)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in IDX_FILES.items():
        candidates = [folder / name, folder / f"{name}.gz"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append(f"{name}[.gz]")
        else:
            found[key] = path
    if missing:
        raise DataError(f"{folder}: missing IDX file(s) {', '.join(missing)}")
    return found


def load_idx_folder(folder: Path) -> Dataset:
    """Read the four MNIST IDX files from one folder."""
    paths = find_idx_files(folder)
    try:
        arrays = {key: read_idx(path) for key, path in paths.items()}
    except IdxError as err:
        raise DataError(str(err)) from None
    x_train = _images(arrays["x_train"], "images", str(paths["x_train"]))
    y_train = _labels(arrays["y_train"], "labels", str(paths["y_train"]))
    x_test = _images(arrays["x_test"], "images", str(paths["x_test"]))
    y_test = _labels(arrays["y_test"], "labels", str(paths["y_test"]))
    _check_split(x_train, y_train, "training", str(paths["x_train"]), str(paths["y_train"]))
    _check_split(x_test, y_test, "test", str(paths["x_test"]), str(paths["y_test"]))
    ordered = [paths[key] for key in IDX_FILES]
    files = {path.name: sha256_file(path) for path in ordered}
    digest = _digest_files(ordered)
    return Dataset(x_train, y_train, x_test, y_test, str(folder), digest, files)


def load_path(path: Path) -> Dataset:
    """A folder is read as IDX files, anything else as an npz archive."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return load_idx_folder(path)
    return load_npz(path)


def download_with_keras() -> Dataset:
    """Fetch mnist.npz the way `tf.keras.datasets.mnist.load_data()` does, into Keras' cache.

    The same origin and checksum as load_data(); going through get_file gives the cached
    file's path, so the download is validated and checksummed like a local file.
    """
    from mnist_serving.contract.tfquiet import import_tensorflow

    keras = import_tensorflow().keras
    try:
        cached = keras.utils.get_file("mnist.npz", origin=KERAS_ORIGIN, file_hash=KERAS_SHA256)
    except Exception as err:  # Keras wraps every network failure in a bare Exception.
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(
            f"cannot download MNIST with Keras ({reason}); pass a local copy with "
            "--data /path/to/mnist.npz (or a folder of the four IDX files), or set MNIST_PATH"
        ) from None
    dataset = load_npz(Path(cached))
    return Dataset(
        dataset.x_train,
        dataset.y_train,
        dataset.x_test,
        dataset.y_test,
        KERAS_SOURCE,
        dataset.sha256,
        dataset.files,
    )
