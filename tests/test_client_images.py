"""Image files -> MNIST-style 28x28 digits, and the input readers (no server needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_serving.client.errors import InputFileError
from mnist_serving.client.images import ImageError, mnist_layout, read_image
from mnist_serving.client.inputs import open_source


def synthetic_digit() -> np.ndarray:
    """An off-centre, tall 'digit' on a big canvas."""
    canvas = np.zeros((300, 200), np.uint8)
    canvas[40:240, 120:160] = 255  # a bar 200 high, 40 wide
    canvas[40:70, 60:160] = 255  # a top stroke: a 7-like shape
    return canvas


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return float((rows * image).sum() / total), float((cols * image).sum() / total)


def test_mnist_layout_fits_20_box_and_centres_mass() -> None:
    digit = mnist_layout(synthetic_digit().astype(np.float32))
    assert digit.shape == (28, 28)
    assert digit.dtype == np.uint8
    assert digit.max() == 255
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    assert rows[-1] - rows[0] + 1 == 20  # the long side is 20 (resampling may add a pixel)
    assert cols[-1] - cols[0] + 1 <= 12
    row, col = center_of_mass(digit.astype(np.float64))
    assert abs(row - 14) <= 0.5
    assert abs(col - 14) <= 0.5


def test_real_mnist_digits_survive_a_round_trip(mnist_path: Path, tmp_path: Path) -> None:
    """MNIST digits drawn big, off-centre, dark on light, come back close to the originals."""
    with np.load(mnist_path) as data:
        originals = data["x_test"][:100]
    rng = np.random.default_rng(0)
    correlations = []
    for i, original in enumerate(originals):
        big = Image.fromarray(original).resize((196, 196), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (400, 300), 0)
        canvas.paste(big, (int(rng.integers(0, 200)), int(rng.integers(0, 100))))
        path = tmp_path / f"{i}.jpg"
        Image.eval(canvas, lambda v: 255 - v).save(path, quality=90)
        restored = read_image(path, invert=True).astype(np.float64)
        correlations.append(np.corrcoef(restored.ravel(), original.ravel())[0, 1])
    assert np.mean(correlations) > 0.93
    assert np.min(correlations) > 0.6


def test_transparency_is_background(tmp_path: Path) -> None:
    strokes = synthetic_digit()
    # Dark strokes on a transparent ground (what drawing apps export).
    rgba = np.zeros((*strokes.shape, 4), np.uint8)
    rgba[..., 3] = strokes
    Image.fromarray(rgba, "RGBA").save(tmp_path / "drawn.png")
    expected = mnist_layout(strokes.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "drawn.png", invert=True), expected)
    # White strokes on transparent: no --invert.
    rgba[..., :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "white.png")
    np.testing.assert_array_equal(read_image(tmp_path / "white.png"), expected)


def test_colour_and_grey_images(tmp_path: Path) -> None:
    strokes = synthetic_digit()
    rgb = np.stack([strokes, strokes // 2, strokes], axis=-1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "colour.png")
    digit = read_image(tmp_path / "colour.png")
    assert digit.shape == (28, 28)
    assert digit.max() == 255


def test_bad_images(tmp_path: Path) -> None:
    Image.new("L", (10, 10), 0).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="blank image"):
        read_image(tmp_path / "blank.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(ImageError, match=r"junk\.png: not a readable image"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_missing_pillow_is_one_clear_error(tmp_path: Path) -> None:
    Image.new("L", (10, 10), 255).save(tmp_path / "x.png")
    code = (
        "import sys; sys.modules['PIL'] = None\n"
        "from pathlib import Path\n"
        "from mnist_serving.client.images import read_image\n"
        f"read_image(Path({str(tmp_path / 'x.png')!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert 'pip install "mnist-serving[images]"' in result.stderr.splitlines()[-1]


def test_sources(tmp_path: Path) -> None:
    images = np.arange(5 * 784, dtype=np.int64).reshape(5, 784) % 256
    np.save(tmp_path / "flat.npy", images.astype(np.uint8))
    source = open_source(tmp_path / "flat.npy")
    assert (len(source), source.key_name, source.labels) == (5, "index", None)
    batch, bad = source.load(1, 3)
    np.testing.assert_array_equal(batch, images[1:3])
    assert bad == {}
    np.savez(tmp_path / "one.npz", anything=images.astype(np.float32) / 255)
    assert open_source(tmp_path / "one.npz").load(0, 5)[0].dtype == np.float32
    np.savez(tmp_path / "keras.npz", x_train=np.zeros((2, 28, 28), np.uint8),
             y_train=np.zeros(2, np.uint8), x_test=np.zeros((3, 28, 28), np.uint8),
             y_test=np.array([1, 2, 3], np.uint8))  # fmt: skip
    test = open_source(tmp_path / "keras.npz")
    assert len(test) == 3
    assert test.labels is not None
    assert test.labels.tolist() == [1, 2, 3]
    assert len(open_source(tmp_path / "keras.npz", split="train")) == 2
    np.savez(tmp_path / "mismatch.npz", x_test=np.zeros((3, 28, 28), np.uint8), y_test=[1])
    with pytest.raises(InputFileError, match="3 images but 1 labels"):
        open_source(tmp_path / "mismatch.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match=r"no \.png"):
        open_source(tmp_path / "empty")
    for folder in ("3", "²"):  # "²" passes str.isdigit(); it is no label
        (tmp_path / "digits" / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "digits" / folder / "a.png")
    assert open_source(tmp_path / "digits").labels is None
    shutil.rmtree(tmp_path / "digits" / "²")
    labelled = open_source(tmp_path / "digits").labels
    assert labelled is not None
    assert labelled.tolist() == [3]
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 nope")
    with pytest.raises(InputFileError, match=r"broken\.npz"):
        open_source(tmp_path / "broken.npz")


def test_idx_sources(mnist_path: Path, tmp_path: Path) -> None:
    """IDX files through contract.idx's reader: a folder (per split) or one images file."""
    folder = mnist_path.parent
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("the IDX files are not next to MNIST_PATH")
    with np.load(mnist_path) as data:
        x_test, y_test = data["x_test"], data["y_test"]
    source = open_source(folder)
    assert len(source) == 10000
    assert source.labels is not None
    np.testing.assert_array_equal(source.labels, y_test)
    np.testing.assert_array_equal(source.load(9990, 10000)[0], x_test[9990:])
    single = open_source(folder / "t10k-images-idx3-ubyte.gz")
    assert single.labels is not None
    np.testing.assert_array_equal(single.load(0, 10)[0], x_test[:10])
    # Without a labels file beside it, an IDX file has no labels.
    lone = tmp_path / "t10k-images-idx3-ubyte.gz"
    lone.write_bytes((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert open_source(lone).labels is None
    (tmp_path / "broken-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")
    with pytest.raises(InputFileError, match="broken-images-idx3-ubyte: truncated"):
        open_source(tmp_path / "broken-images-idx3-ubyte")
    if not any(folder.glob("train-images-idx3-ubyte*")):
        with pytest.raises(InputFileError, match="no train-images-idx3-ubyte"):
            open_source(folder, split="train")
