"""Decode request tensors into arrays and check them before they reach the model.

Independent of any proto: servicers hand over a dtype name, a shape and the raw bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mnist_serving.contract import IMAGE_SIDE

from .errors import InvalidInput, ModelNotFound

PIXELS = IMAGE_SIDE * IMAGE_SIDE
# Little-endian on the wire, whatever the host.
DTYPES: dict[str, np.dtype] = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}
ACCEPTED_SHAPES = f"[N, {IMAGE_SIDE}, {IMAGE_SIDE}] or [N, {PIXELS}]"
SHOWN_DIMS = 6  # a shape quoted in an error message shows at most this many dims


def decimal(text: str) -> int | None:
    """The number `text` spells in ASCII digits, else None. (str.isdigit() alone also
    passes "²" and other characters that int() refuses.)"""
    return int(text) if text.isascii() and text.isdigit() else None


def decode_images(dtype: str, shape: Sequence[int], content: bytes, max_images: int) -> np.ndarray:
    """The request's images as a read-only [N, 28, 28] array of `dtype`, without copying."""
    if dtype not in DTYPES:
        raise InvalidInput(f"images dtype {dtype} is not accepted; send uint8 or float32")
    shape = check_shape(shape)
    count = shape[0]
    if count < 1:
        raise InvalidInput("a request must carry at least one image (N >= 1)")
    if count > max_images:
        raise InvalidInput(
            f"a request carries at most {max_images} images, got {count}; split the batch"
        )
    item = DTYPES[dtype]
    expected = count * PIXELS * item.itemsize
    if len(content) != expected:
        raise InvalidInput(
            f"images content is {len(content)} bytes; {dtype} shape {list(shape)} "
            f"needs {expected} ({count} x {PIXELS} x {item.itemsize})"
        )
    images = np.frombuffer(content, dtype=item).reshape(count, IMAGE_SIDE, IMAGE_SIDE)
    if dtype == "float32":
        check_scaled(images)
    return images


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as ints if it is [N, 28, 28] or [N, 784] for some N (checked later)."""
    if len(shape) not in (2, 3):
        raise InvalidInput(
            f"images shape {show_shape(shape)} has {len(shape)} dims; send {ACCEPTED_SHAPES}"
        )
    dims = tuple(int(d) for d in shape)
    if dims[1:] not in ((IMAGE_SIDE, IMAGE_SIDE), (PIXELS,)):
        raise InvalidInput(f"images shape {list(dims)} is not accepted; send {ACCEPTED_SHAPES}")
    return dims


def show_shape(shape: Sequence[int]) -> str:
    """A shape for an error message, however many dims the request sent."""
    if len(shape) <= SHOWN_DIMS:
        return str([int(d) for d in shape])
    head = ", ".join(str(int(d)) for d in shape[:SHOWN_DIMS])
    return f"[{head}, ... ({len(shape)} dims)]"


def check_scaled(images: np.ndarray) -> None:
    """Float pixels must be finite and in [0, 1] (the model was trained on that range)."""
    low, high = images.min(), images.max()  # NaN propagates, so NaN fails the test below
    if not (low >= 0.0 and high <= 1.0):
        bad = images[~((images >= 0.0) & (images <= 1.0))]
        raise InvalidInput(
            f"float32 pixels must be finite and scaled to [0, 1]; found {bad.flat[0]!r} "
            f"({bad.size} values outside). Send uint8 for raw 0..255 pixels"
        )


def values_bytes(
    values: Any,
    dtype: str,
    shape: Sequence[int] | None,
    what: str,
    *,
    where: str = "",
    empty_hint: str = "",
) -> bytes:
    """Pixels sent as numbers (a typed repeated field of a message, or JSON's nested lists)
    as the little-endian bytes of the core's `dtype`, as if they came as raw bytes.

    With a `shape`, the values must be as many as it needs (a negative dim is left to the
    shape check); `what` and `where` name them in errors ("images", " in int_val"), and
    `empty_hint` is added when none came. uint8 pixels must be whole numbers 0..255.
    """
    array = number_array(values, what)
    needed = -1 if shape is None else math.prod(shape)
    if needed >= 0 and array.size != needed:
        raise InvalidInput(
            f"{what} carries {array.size} values{where}; shape {list(shape or ())} needs "
            f"{needed}" + ("" if array.size or not empty_hint else f" ({empty_hint})")
        )
    if dtype != "uint8":
        return array.astype("<f4").tobytes()
    outside = (array < 0) | (array > 255)
    if array.dtype.kind == "f":
        outside |= array != np.round(array)  # NaN included
    if outside.any():
        bad = array[outside]
        raise InvalidInput(
            f"{what}: uint8 pixels must be whole numbers 0..255; found {bad.flat[0]!r} "
            f"({bad.size} values outside)"
        )
    return array.astype(np.uint8).tobytes()


def number_array(values: Any, what: str) -> np.ndarray:
    """Numbers (nested lists, rectangular; or a repeated field) as an array; clear errors
    otherwise."""
    try:
        array = np.asarray(values)
    except ValueError:
        raise InvalidInput(f"{what} is not a rectangular array of numbers") from None
    if array.dtype.kind not in "iuf":
        if array.dtype.kind == "O":
            raise InvalidInput(f"{what} is not a rectangular array of numbers")
        raise InvalidInput(f"{what} must hold numbers, got {array.dtype.kind!r}-kind values")
    return array


def pinned_version(number: int, shown: str) -> int:
    """A version a caller pinned, which must be a positive integer (0 is the core's "the
    newest", which no caller pins by number); `shown` is how the caller wrote it."""
    if number < 1:
        raise ModelNotFound(f"version {shown} is not loaded; versions are positive integers")
    return number
