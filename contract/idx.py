"""The IDX file format MNIST was first published in, read with numpy only.

The trainer reads its training data with it and the client its inputs; neither imports the
other, so the reader lives here. Every problem with a file (missing, truncated, not IDX,
corrupt gzip) is raised as `IdxError` with a one-line message that names the file; each
caller turns it into its own error.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); big-endian.
_IDX_DTYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """A file that cannot be read as IDX; the message is one line and names the file."""


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdxError(f"{path}: no such file") from None
    except OSError as err:
        raise IdxError(f"{path}: cannot read: {err.strerror or err}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({err})") from None


def read_idx(path: Path) -> npt.NDArray[np.generic]:
    """Parse one IDX file (plain or gzip-compressed) into an array of its declared shape.

    The header is: two zero bytes, a type code, the number of dimensions, then each
    dimension as a big-endian uint32. The data that follows must fill the array exactly.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxError(f"{path}: not an IDX file: {len(data)} bytes, shorter than the header")
    if data[0] != 0 or data[1] != 0:
        raise IdxError(
            f"{path}: not an IDX file: magic number starts with {data[:2].hex()}, expected 0000"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise IdxError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise IdxError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxError(f"{path}: truncated IDX header ({len(data)} of {header_size} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IdxError(
            f"{path}: {what}: header declares shape {shape} ({expected} data bytes), "
            f"file holds {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)
