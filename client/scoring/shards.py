"""Input shards of the Ray engine: Parquet, .npy and .npz files and folders of images, on
any filesystem pyarrow speaks (local paths, s3://, gs://, hdfs://, ...).

`list_shards` expands the job's inputs into an ordered list of shards, each with the
deterministic name of its output file; `read_shard` reads one of them whole, in a worker.
Nothing here imports Ray; pyarrow (the `ray` extra) is imported when called.
"""

from __future__ import annotations

import io
import itertools
import posixpath
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import IMAGE_SIDE

from ..codec import PIXELS, as_batch
from ..errors import InputFileError, MnistError
from ..images import IMAGE_SUFFIXES, ImageError, read_image
from ..inputs import folder_labels, read_npz

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

ARRAY_SUFFIXES = (".parquet", ".npy", ".npz")
DEFAULT_IMAGES_PER_SHARD = 10_000


@dataclass(frozen=True)
class Shard:
    """One unit of work: its input (a file, or a run of image files) and its output name."""

    index: int
    uri: str  # the input file, or the folder an image shard's files are in
    kind: str  # "parquet", "npy", "npz" or "images"
    output: str  # the output file's name: deterministic, sortable in input order
    files: tuple[str, ...] = ()  # image shards: the files (filesystem paths), sorted

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uri": self.uri,
            "kind": self.kind,
            "output": self.output,
            "files": list(self.files),
        }

    @staticmethod
    def from_dict(values: dict[str, Any]) -> Shard:
        return Shard(
            int(values["index"]),
            str(values["uri"]),
            str(values["kind"]),
            str(values["output"]),
            tuple(str(f) for f in values["files"]),
        )


@dataclass(frozen=True)
class ReadOptions:
    split: str = "test"  # the half of a Keras-layout .npz
    invert: bool = False  # images are dark digits on a light background
    image_column: str = "image"
    key_column: str = "key"  # used when the Parquet file has it
    label_column: str = "label"  # used when the Parquet file has it


@dataclass
class ShardData:
    """A shard read whole: a key per row, the images of the rows that could be read (in
    order), labels (or None), and why each other row could not be read.

    Keys keep the type of a Parquet key column (integers as int64, anything else as text),
    so that the scores join back to the input table as they are; without one they are the
    engine's own strings (`<uri>#<row>`, or the image's path)."""

    keys: list[str] | npt.NDArray[np.int64]
    images: npt.NDArray[np.uint8] | npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64] | None
    errors: dict[int, str] = field(default_factory=dict)


def resolve(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(filesystem, path) of a URI; plain paths are local and may be relative."""
    import os

    import pyarrow.fs

    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)  # type: ignore[no-any-return]
    except (ValueError, OSError) as error:
        raise InputFileError(f"{uri}: cannot open this location ({error})") from None


def _uri(filesystem: pyarrow.fs.FileSystem, path: str, like: str) -> str:
    """The URI of `path` on the filesystem `like` was resolved to."""
    if "://" not in like:
        return path
    scheme = like.split("://", 1)[0]
    return f"{scheme}://{path}"


def _stem(path: str) -> str:
    name = posixpath.basename(path.rstrip("/"))
    for suffix in ARRAY_SUFFIXES:
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "shard"


def list_shards(
    inputs: Sequence[str], *, images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
) -> list[Shard]:
    """Each input file is one shard; a folder gives its .parquet/.npy/.npz files (sorted,
    recursively) and its images, in runs of `images_per_shard`. Output names are
    `<position>-<input name>.parquet`, so a rerun over the same inputs finds the same
    names, and the output folder lists in input order."""
    import pyarrow.fs

    found: list[tuple[str, str, tuple[str, ...]]] = []  # (uri, kind, files)
    for uri in inputs:
        filesystem, path = resolve(uri)
        try:
            info = filesystem.get_file_info(path)
            if info.type == pyarrow.fs.FileType.NotFound:
                raise InputFileError(f"{uri}: no such file or folder")
            if info.type == pyarrow.fs.FileType.Directory:
                selector = pyarrow.fs.FileSelector(path, recursive=True)
                entries = sorted(e.path for e in filesystem.get_file_info(selector) if e.is_file)
            else:
                entries = [path]
        except OSError as error:
            raise InputFileError(f"{uri}: cannot list it ({error})") from None
        images: list[str] = []
        for entry in entries:
            name = entry.lower()
            if name.endswith(ARRAY_SUFFIXES):
                found.append((_uri(filesystem, entry, uri), name.rsplit(".", 1)[1], ()))
            elif name.endswith(IMAGE_SUFFIXES):
                images.append(entry)
            elif info.type != pyarrow.fs.FileType.Directory:
                raise InputFileError(
                    f"{uri}: unknown kind of input; expected .parquet, .npy, .npz, "
                    "a folder, or .png/.jpg/.jpeg images"
                )
        for start in range(0, len(images), images_per_shard):
            files = tuple(images[start : start + images_per_shard])
            found.append((_uri(filesystem, path, uri), "images", files))
    if not found:
        raise InputFileError(
            f"{', '.join(inputs)}: no .parquet, .npy, .npz or image files to score"
        )
    shards = []
    for index, (uri, kind, files) in enumerate(found):
        stem = _stem(uri) if kind != "images" else f"{_stem(uri)}-images"
        shards.append(Shard(index, uri, kind, f"{index:05d}-{stem}.parquet", files))
    return shards


def read_shard(shard: Shard, options: ReadOptions) -> ShardData:
    """Read one shard whole. An unreadable shard raises InputFileError naming it; an
    unreadable image fails only its own row."""
    filesystem, path = resolve(shard.uri)
    if shard.kind == "images":
        return _images(shard, filesystem, options)
    try:
        with filesystem.open_input_file(path) as stream:
            content = stream.read()
    except OSError as error:
        raise InputFileError(f"{shard.uri}: cannot read it ({error})") from None
    if shard.kind == "parquet":
        return _parquet(shard.uri, content, options)
    if shard.kind == "npy":
        return _npy(shard.uri, content)
    return _npz(shard.uri, content, options.split)


def _row_keys(uri: str, count: int) -> list[str]:
    return [f"{uri}#{i}" for i in range(count)]


def _checked(uri: str, images: Any) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    if np.shape(images)[:1] == (0,):  # an empty shard is complete once written, not an error
        return np.empty((0, PIXELS), np.uint8)
    try:
        return as_batch(images)
    except MnistError as error:
        raise InputFileError(f"{uri}: {error.details}") from None


def _labels(uri: str, labels: Any, count: int) -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.shape != (count,) or not np.issubdtype(array.dtype, np.integer):
        raise InputFileError(
            f"{uri}: labels must be {count} integers, got {array.dtype} {list(array.shape)}"
        )
    return array.astype(np.int64)


def _parquet(uri: str, content: bytes, options: ReadOptions) -> ShardData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(content))
    except (pa.ArrowException, OSError) as error:
        raise InputFileError(f"{uri}: not a readable Parquet file ({error})") from None
    names = table.column_names
    if options.image_column not in names:
        raise InputFileError(
            f"{uri}: no column {options.image_column!r} (columns: {', '.join(names)}); "
            "name the images' column with --image-column"
        )
    images = _pixels(uri, options.image_column, table.column(options.image_column))
    count = table.num_rows
    keys: list[str] | npt.NDArray[np.int64] = _row_keys(uri, count)
    if options.key_column in names:
        keys = _keys(uri, options.key_column, table.column(options.key_column))
    labels = None
    if options.label_column in names:
        column = table.column(options.label_column)
        if column.null_count:
            raise InputFileError(f"{uri}: column {options.label_column!r} has empty labels")
        labels = _labels(uri, column.to_numpy(), count)
    return ShardData(keys, images, labels)


def _keys(uri: str, name: str, column: pa.ChunkedArray) -> list[str] | npt.NDArray[np.int64]:
    """A Parquet key column: integers (of any width) as int64, anything else as text."""
    import pyarrow as pa

    if column.null_count:
        raise InputFileError(f"{uri}: column {name!r} has {column.null_count} empty keys")
    if pa.types.is_dictionary(column.type):  # e.g. written from a pandas Categorical
        column = column.cast(column.type.value_type)
    if pa.types.is_integer(column.type):
        try:
            return column.cast(pa.int64()).to_numpy()  # type: ignore[no-any-return]
        except pa.ArrowInvalid:
            raise InputFileError(f"{uri}: column {name!r} holds keys beyond int64") from None
    return [str(key) for key in column.to_pylist()]


def _pixels(
    uri: str, name: str, column: pa.ChunkedArray
) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """A Parquet image column as [N, 784]: 784 bytes per row (binary or fixed-size binary),
    or a list of 784 pixels per row (uint8 0..255 or floats in [0, 1])."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    wrong = InputFileError(
        f"{uri}: column {name!r} is {kind}; expected {PIXELS} bytes per image (binary) "
        f"or a list of {PIXELS} pixels per image"
    )
    if column.null_count:
        raise InputFileError(f"{uri}: column {name!r} has {column.null_count} empty images")
    count = len(column)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        lengths = pc.binary_length(column).to_numpy()
        if count and (lengths != PIXELS).any():
            bad = int(np.flatnonzero(lengths != PIXELS)[0])
            raise InputFileError(
                f"{uri}: row {bad} of column {name!r} has {lengths[bad]} bytes, "
                f"expected {PIXELS} (one 28x28 uint8 image)"
            )
        data = b"".join(_binary_values(chunk) for chunk in column.chunks)
        return _checked(uri, np.frombuffer(data, np.uint8).reshape(count, PIXELS))
    if pa.types.is_fixed_size_binary(kind):
        if kind.byte_width != PIXELS:
            raise wrong
        data = b"".join(_binary_values(chunk) for chunk in column.chunks)
        return _checked(uri, np.frombuffer(data, np.uint8).reshape(count, PIXELS))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        values_type = kind.value_type
        if not (pa.types.is_integer(values_type) or pa.types.is_floating(values_type)):
            raise wrong
        lengths = pc.list_value_length(column).to_numpy()
        if count and (lengths != PIXELS).any():
            bad = int(np.flatnonzero(lengths != PIXELS)[0])
            raise InputFileError(
                f"{uri}: row {bad} of column {name!r} has {lengths[bad]} pixels, expected {PIXELS}"
            )
        flat = pc.list_flatten(column).to_numpy()
        return _checked(uri, flat.reshape(count, PIXELS))
    raise wrong


def _binary_values(chunk: pa.Array) -> bytes:
    """The rows of a binary array, end to end (every row has been checked to be 784 bytes)."""
    return b"".join(chunk.to_pylist())


def _npy(uri: str, content: bytes) -> ShardData:
    try:
        images = np.load(io.BytesIO(content), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputFileError(f"{uri}: not a readable .npy array ({error})") from None
    batch = _checked(uri, images)
    return ShardData(_row_keys(uri, len(batch)), batch, None)


def _npz(uri: str, content: bytes, split: str) -> ShardData:
    images, labels, _ = read_npz(io.BytesIO(content), uri, split)
    batch = _checked(uri, images)
    checked = None if labels is None else _labels(uri, labels, len(batch))
    return ShardData(_row_keys(uri, len(batch)), batch, checked)


def _images(shard: Shard, filesystem: pyarrow.fs.FileSystem, options: ReadOptions) -> ShardData:
    root = resolve(shard.uri)[1]
    if shard.files == (root,):  # a single image file: its key is its name
        root = posixpath.dirname(root)
    keys = [posixpath.relpath(f, root) if f.startswith(root) else f for f in shard.files]
    images = np.empty((len(shard.files), IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    errors: dict[int, str] = {}
    for index, path in enumerate(shard.files):
        try:
            with filesystem.open_input_file(path) as stream:
                content = stream.read()
            images[index - len(errors)] = read_image(path, invert=options.invert, data=content)
        except ImageError as error:
            errors[index] = str(error)
        except OSError as error:
            errors[index] = f"{path}: cannot read it ({error})"
    labels = folder_labels([posixpath.basename(posixpath.dirname(f)) for f in shard.files])
    good = len(shard.files) - len(errors)
    return ShardData(keys, images[:good], labels, errors)


# --- the README's example: MNIST as Parquet shards ---------------------------------------------


def npz_to_parquet(
    npz: str, output: str, *, shards: int = 8, splits: Sequence[str] = ("train", "test")
) -> list[str]:
    """Write a Keras-layout MNIST .npz as `shards` Parquet files in `output`: columns `key`
    ("train/0", ...), `image` (784 bytes) and `label`. Returns the files' URIs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shards < 1:
        raise ValueError("shards must be at least 1")
    filesystem, path = resolve(npz)
    try:
        with filesystem.open_input_file(path) as stream:
            content = stream.read()
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            missing = [s for s in splits if f"x_{s}" not in archive.files]
            if missing:
                raise InputFileError(f"{npz}: no x_{missing[0]} (expected Keras' layout)")
            parts = [(s, archive[f"x_{s}"], archive.get(f"y_{s}")) for s in splits]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputFileError(f"{npz}: not a readable .npz archive ({error})") from None
    keys = [f"{s}/{i}" for s, images, _ in parts for i in range(len(images))]
    images = np.concatenate([_checked(npz, x).reshape(-1, PIXELS) for _, x, _ in parts])
    if images.dtype != np.uint8:
        raise InputFileError(f"{npz}: expected uint8 pixels, got {images.dtype}")
    has_labels = all(y is not None for _, _, y in parts)
    labels = np.concatenate([y for _, _, y in parts]).astype(np.int64) if has_labels else None
    out_filesystem, out_path = resolve(output)
    out_filesystem.create_dir(out_path, recursive=True)
    written = []
    bounds = np.linspace(0, len(images), shards + 1).astype(int)
    for number, (start, stop) in enumerate(itertools.pairwise(bounds)):
        columns: dict[str, Any] = {
            "key": pa.array(keys[start:stop], pa.string()),
            "image": pa.array([row.tobytes() for row in images[start:stop]], pa.binary()),
        }
        if labels is not None:
            columns["label"] = pa.array(labels[start:stop], pa.int64())
        target = f"{out_path.rstrip('/')}/part-{number:05d}.parquet"
        pq.write_table(pa.table(columns), target, filesystem=out_filesystem)
        written.append(_uri(out_filesystem, target, output))
    return written
