"""PNG/JPEG files -> 28x28 uint8 digits, prepared the way MNIST itself was.

MNIST's recipe (LeCun et al.): the digit is scaled, keeping its aspect ratio, to fit a
20x20 box (anti-aliasing makes grey levels), then placed in a 28x28 field so that its
centre of mass sits at the centre. Digits are white (255) on black (0).

Pillow is an optional dependency (`mnist-serving[images]`), imported only when needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import IMAGE_SIDE

from .errors import InputFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIDE = IMAGE_SIDE
BOX = 20
# Pixels dimmer than this share of the brightest one are background (JPEG noise, paper
# texture) when finding the digit's bounding box.
INK_THRESHOLD = 0.2


class ImageError(InputFileError):
    """An image that cannot be turned into a digit; the message names the file."""


class LightBackground(ImageError):
    """Most of the border is bright: not white ink on a dark ground."""


def require_pillow() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImageError(
            'reading PNG/JPEG images needs Pillow: pip install "mnist-serving[images]"'
        ) from None


def read_image(
    path: Path | str, *, invert: bool = False, data: bytes | None = None
) -> npt.NDArray[np.uint8]:
    """One image file as an MNIST-style [28, 28] uint8 digit.

    `invert` is for dark digits on a light background. Transparent pixels count as
    background either way. `data`, when given, is the file's content (read from any
    filesystem); `path` then only names it in messages.
    """
    require_pillow()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as opened:
            image: Image.Image = opened
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # Flatten onto the background so that transparency never reads as ink.
                rgba = image.convert("RGBA")
                color = (255, 255, 255, 255) if invert else (0, 0, 0, 255)
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, color), rgba)
            gray = np.asarray(image.convert("L"), dtype=np.float32)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: not a readable image ({error})") from None
    if invert:
        gray = 255.0 - gray
    try:
        return mnist_layout(gray)
    except LightBackground:
        hint = (
            "it is light around the edges after --invert: drop --invert"
            if invert
            else "it is light around the edges: for a dark digit on a light background "
            "pass --invert"
        )
        raise ImageError(f"{path}: {hint}") from None
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def mnist_layout(gray: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """A grayscale image (white ink on black, 0..255, any size) as a 28x28 MNIST digit."""
    from PIL import Image

    peak = float(gray.max()) if gray.size else 0.0
    if peak <= 0:
        raise ImageError("blank image: no digit to classify")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 0.5 * peak:
        raise LightBackground("light background")
    rows = np.flatnonzero((gray > INK_THRESHOLD * peak).any(axis=1))
    cols = np.flatnonzero((gray > INK_THRESHOLD * peak).any(axis=0))
    digit = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Stretch the ink to the full 0..255 range first, as the binary NIST strokes were.
    digit = np.clip(digit * (255.0 / peak), 0, 255).astype(np.uint8)
    resized = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS), np.float32)
    field = np.zeros((SIDE, SIDE), np.float32)
    top, left = (SIDE - size[1]) // 2, (SIDE - size[0]) // 2
    field[top : top + size[1], left : left + size[0]] = resized
    return _center_of_mass_shift(field).round().clip(0, 255).astype(np.uint8)


def _center_of_mass_shift(field: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Shift by whole pixels so that the centre of mass lands on pixel (14, 14), as in
    MNIST (its test set averages 13.99, 14.01); ink is never pushed off the field."""
    total = float(field.sum())
    if total <= 0:
        return field
    rows, cols = np.indices(field.shape)
    shift_row = round(SIDE / 2 - float((rows * field).sum()) / total)
    shift_col = round(SIDE / 2 - float((cols * field).sum()) / total)
    ink_rows = np.flatnonzero(field.any(axis=1))
    ink_cols = np.flatnonzero(field.any(axis=0))
    shift_row = int(np.clip(shift_row, -ink_rows[0], SIDE - 1 - ink_rows[-1]))
    shift_col = int(np.clip(shift_col, -ink_cols[0], SIDE - 1 - ink_cols[-1]))
    return np.roll(field, (shift_row, shift_col), axis=(0, 1))
