"""The data loaders: npz and IDX (gz and plain), every kind of bad file, Keras' download."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from mnist_serving.contract.idx import read_idx
from mnist_serving.trainer.data import (
    DataError,
    Dataset,
    load_idx_folder,
    load_npz,
    load_path,
    scale,
)

from .synthetic_mnist import IDX_NAMES, idx_bytes, make_arrays, write_idx_folder, write_npz

Arrays = dict[str, npt.NDArray[np.uint8]]


@pytest.fixture
def arrays() -> Arrays:
    return make_arrays(train=60, test=20)


def assert_same(dataset: Dataset, arrays: Arrays) -> None:
    for key, expected in arrays.items():
        actual = getattr(dataset, key)
        assert actual.dtype == np.uint8, key
        np.testing.assert_array_equal(actual, expected, err_msg=key)


def error_of(path: Path) -> str:
    """The DataError message for loading `path`; checks it is one line naming the file."""
    with pytest.raises(DataError) as caught:
        load_path(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- good files ---------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path, arrays: Arrays) -> None:
    path = write_npz(tmp_path / "mnist.npz", arrays)
    dataset = load_npz(path)
    assert_same(dataset, arrays)
    assert dataset.source == str(path)
    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dataset.files == {"mnist.npz": dataset.sha256}


def test_uncompressed_npz_reads_too(tmp_path: Path, arrays: Arrays) -> None:
    path = tmp_path / "plain.npz"
    write_npz(path, arrays, compressed=False)
    assert_same(load_path(path), arrays)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_idx_folder_round_trip(tmp_path: Path, arrays: Arrays, compress: bool) -> None:
    folder = write_idx_folder(tmp_path / "idx", arrays, compress=compress)
    dataset = load_path(folder)
    assert_same(dataset, arrays)
    assert dataset.source == str(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(dataset.files) == names
    for name, digest in dataset.files.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    ordered = b"".join((folder / n).read_bytes() for n in dataset.files)
    assert dataset.sha256 == hashlib.sha256(ordered).hexdigest()


def test_idx_folder_mixes_gz_and_plain(tmp_path: Path, arrays: Arrays) -> None:
    folder = write_idx_folder(tmp_path / "idx", arrays, compress=False)
    for key in ("x_train", "y_test"):
        plain = folder / IDX_NAMES[key]
        (folder / f"{plain.name}.gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    assert_same(load_idx_folder(folder), arrays)


@pytest.mark.parametrize(
    ("type_code", "values"),
    [
        (0x08, np.arange(24, dtype=np.uint8) * 10),
        (0x09, np.arange(-12, 12, dtype=np.int8)),
        (0x0B, np.arange(-12, 12, dtype=np.int16) * 1000),
        (0x0C, np.arange(-12, 12, dtype=np.int32) * 100_000),
        (0x0D, np.linspace(-1, 1, 24, dtype=np.float32)),
    ],
    ids=["uint8", "int8", "int16", "int32", "float32"],
)
def test_read_idx_decodes_big_endian_types(
    tmp_path: Path, type_code: int, values: npt.NDArray[np.generic]
) -> None:
    values = values.reshape(2, 3, 4)
    path = tmp_path / "values-idx3"
    path.write_bytes(idx_bytes(values, type_code))
    decoded = read_idx(path)
    assert decoded.shape == (2, 3, 4)
    assert decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, values)


def test_scale_maps_pixels_to_unit_float32() -> None:
    scaled = scale(np.array([[0, 51, 255]], dtype=np.uint8))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[0.0, 0.2, 1.0]])


def test_data_module_does_not_import_tensorflow() -> None:
    probe = "import sys, mnist_serving.trainer.data; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- bad IDX files ------------------------------------------------------------------------


@pytest.fixture
def idx_folder(tmp_path: Path, arrays: Arrays) -> Path:
    return write_idx_folder(tmp_path / "idx", arrays, compress=False)


def test_idx_truncated(idx_folder: Path) -> None:
    path = idx_folder / IDX_NAMES["x_train"]
    path.write_bytes(path.read_bytes()[:-100])
    message = error_of(idx_folder)
    assert str(path) in message
    assert "truncated" in message


def test_idx_trailing_bytes(idx_folder: Path) -> None:
    path = idx_folder / IDX_NAMES["y_test"]
    path.write_bytes(path.read_bytes() + b"\0\0")
    assert "trailing bytes" in error_of(idx_folder)


def test_idx_truncated_header(idx_folder: Path) -> None:
    path = idx_folder / IDX_NAMES["x_test"]
    path.write_bytes(path.read_bytes()[:9])
    message = error_of(idx_folder)
    assert str(path) in message
    assert "header" in message


def test_idx_truncated_gzip(tmp_path: Path, arrays: Arrays) -> None:
    folder = write_idx_folder(tmp_path / "idx", arrays, compress=True)
    path = folder / f"{IDX_NAMES['x_train']}.gz"
    path.write_bytes(path.read_bytes()[:200])
    message = error_of(folder)
    assert str(path) in message
    assert "gzip" in message


def test_idx_wrong_magic(idx_folder: Path) -> None:
    path = idx_folder / IDX_NAMES["y_train"]
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    message = error_of(idx_folder)
    assert str(path) in message
    assert "magic" in message


def test_idx_unknown_type_code(idx_folder: Path) -> None:
    path = idx_folder / IDX_NAMES["y_train"]
    content = bytearray(path.read_bytes())
    content[2] = 0x07
    path.write_bytes(bytes(content))
    assert "type code 0x07" in error_of(idx_folder)


def test_idx_images_of_wrong_shape(idx_folder: Path) -> None:
    path = idx_folder / IDX_NAMES["x_train"]
    path.write_bytes(idx_bytes(np.zeros((60, 20, 20), np.uint8)))
    message = error_of(idx_folder)
    assert str(path) in message
    assert "(60, 20, 20)" in message


def test_idx_labels_as_images_are_refused(idx_folder: Path) -> None:
    images = idx_folder / IDX_NAMES["x_test"]
    images.write_bytes((idx_folder / IDX_NAMES["y_test"]).read_bytes())
    message = error_of(idx_folder)
    assert str(images) in message
    assert "expected (N, 28, 28)" in message


def test_idx_count_mismatch(idx_folder: Path, arrays: Arrays) -> None:
    labels = idx_folder / IDX_NAMES["y_train"]
    labels.write_bytes(idx_bytes(arrays["y_train"][:-1]))
    message = error_of(idx_folder)
    assert str(labels) in message
    assert str(idx_folder / IDX_NAMES["x_train"]) in message
    assert "60 images but 59 labels" in message


def test_idx_labels_out_of_range(idx_folder: Path, arrays: Arrays) -> None:
    labels = arrays["y_test"].copy()
    labels[3] = 12
    path = idx_folder / IDX_NAMES["y_test"]
    path.write_bytes(idx_bytes(labels))
    message = error_of(idx_folder)
    assert str(path) in message
    assert "0..12" in message


def test_idx_missing_file(idx_folder: Path) -> None:
    (idx_folder / IDX_NAMES["y_test"]).unlink()
    message = error_of(idx_folder)
    assert "t10k-labels-idx1-ubyte[.gz]" in message
    assert "train-images" not in message


# --- bad npz files ------------------------------------------------------------------------


def test_npz_missing_keys(tmp_path: Path, arrays: Arrays) -> None:
    path = tmp_path / "mnist.npz"
    write_npz(
        path,
        {"x_train": arrays["x_train"], "y_train": arrays["y_train"], "images": arrays["x_test"]},
    )
    message = error_of(path)
    assert str(path) in message
    assert "x_test, y_test" in message


def test_npz_wrong_image_shape(tmp_path: Path, arrays: Arrays) -> None:
    arrays["x_train"] = arrays["x_train"].reshape(60, 784)
    message = error_of(write_npz(tmp_path / "flat.npz", arrays))
    assert "x_train has shape (60, 784), expected (N, 28, 28)" in message


def test_npz_wrong_label_shape(tmp_path: Path, arrays: Arrays) -> None:
    arrays["y_test"] = arrays["y_test"].reshape(20, 1)
    assert "y_test has shape (20, 1), expected (N,)" in error_of(
        write_npz(tmp_path / "m.npz", arrays)
    )


def test_npz_float_images_are_refused(tmp_path: Path, arrays: Arrays) -> None:
    floats: dict[str, npt.NDArray[Any]] = {
        **arrays,
        "x_test": arrays["x_test"].astype(np.float32) / 255,
    }
    write_npz(tmp_path / "m.npz", floats)
    assert "x_test has dtype float32, expected uint8" in error_of(tmp_path / "m.npz")


def test_npz_count_mismatch(tmp_path: Path, arrays: Arrays) -> None:
    arrays["y_test"] = arrays["y_test"][:-5]
    message = error_of(write_npz(tmp_path / "m.npz", arrays))
    assert "test set has 20 images but 15 labels" in message


def test_npz_truncated(tmp_path: Path, arrays: Arrays) -> None:
    path = write_npz(tmp_path / "m.npz", arrays)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = error_of(path)
    assert str(path) in message
    assert "npz" in message


def test_npz_garbage(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    path.write_text("<html>404 Not Found</html>\n")
    message = error_of(path)
    assert (
        message == f"{path}: not an npz archive (no zip header); expected Keras' mnist.npz layout"
    )


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    path.touch()
    assert "empty file" in error_of(path)


def test_single_npy_is_refused(tmp_path: Path, arrays: Arrays) -> None:
    path = tmp_path / "x.npy"
    np.save(path, arrays["x_train"])
    assert "single .npy array" in error_of(path)


def test_pickled_member_is_not_loaded(tmp_path: Path, arrays: Arrays) -> None:
    path = tmp_path / "m.npz"
    write_npz(path, {**arrays, "y_train": np.array([{"a": 1}], dtype=object)})
    message = error_of(path)
    assert str(path) in message
    assert "pickle" in message


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "mnist.npz"
    assert error_of(missing) == f"{missing}: no such file or folder"


# --- the real data set --------------------------------------------------------------------


def test_real_npz(mnist_path: Path) -> None:
    dataset = load_path(mnist_path)
    assert dataset.x_train.shape == (60000, 28, 28)
    assert dataset.y_train.shape == (60000,)
    assert dataset.x_test.shape == (10000, 28, 28)
    assert dataset.y_test.shape == (10000,)
    # Published for MNIST; a scrambled or rescaled copy would not match it.
    assert dataset.x_train.mean() == pytest.approx(33.3184, abs=1e-4)
    assert np.bincount(dataset.y_test).tolist()[:3] == [980, 1135, 1032]


def test_real_idx_files_equal_the_npz(mnist_path: Path) -> None:
    folder = mnist_path.parent
    pairs = {
        "x_test": folder / "t10k-images-idx3-ubyte.gz",
        "y_test": folder / "t10k-labels-idx1-ubyte.gz",
        "y_train": folder / "train-labels-idx1-ubyte.gz",
    }
    present = {key: path for key, path in pairs.items() if path.exists()}
    if not present:
        pytest.skip(f"no MNIST IDX files beside {mnist_path}")
    dataset = load_npz(mnist_path)
    for key, path in present.items():
        np.testing.assert_array_equal(read_idx(path), getattr(dataset, key), err_msg=str(path))


# --- Keras' download ----------------------------------------------------------------------


def test_download_failure_is_one_line(tmp_path: Path) -> None:
    """No --data, no MNIST_PATH, no network: one line saying how to pass a local file."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in {"mnist_path", "no_proxy"}}
    # An empty Keras cache, and a proxy on a closed port: no download can succeed even on a
    # machine with network access.
    env |= {"KERAS_HOME": str(tmp_path / "keras"), "HOME": str(tmp_path)}
    env |= {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-m", "mnist_serving.trainer", "--model-dir", str(tmp_path / "models")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mnist-train: error: cannot download MNIST with Keras")
    assert "--data /path/to/mnist.npz" in lines[0]
    assert "MNIST_PATH" in lines[0]
    assert not (tmp_path / "models").exists()
