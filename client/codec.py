"""Arrays <-> the API's Tensor messages: one tobytes() out, one np.frombuffer() back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import IMAGE_SIDE
from mnist_serving.contract import NUM_CLASSES as NUM_CLASSES  # still importable from here
from mnist_serving.protos.mnist.v1 import predict_pb2

from .errors import InvalidInput, ProtocolError

PIXELS = IMAGE_SIDE * IMAGE_SIDE
_IMAGE = (IMAGE_SIDE, IMAGE_SIDE)

_WIRE_DTYPES: dict[int, np.dtype[np.generic]] = {
    predict_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
    predict_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    predict_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
}


@dataclass(frozen=True)
class Prediction:
    """Per image, in input order: `probabilities` float32 [N, 10], `classes` int64 [N].

    `model_version` is the version that answered (all parts of a split call are pinned to it).
    `request_ids` are the server's IDs of the RPCs that answered, one per part of a split
    call (empty for a server that sends none); `request_id` is the first. `part_sizes` are
    the images each of those RPCs answered.
    """

    probabilities: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]
    model_version: int
    request_ids: tuple[str, ...] = ()
    part_sizes: tuple[int, ...] = ()

    @property
    def request_id(self) -> str | None:
        return self.request_ids[0] if self.request_ids else None

    def __len__(self) -> int:
        return len(self.classes)

    def image_request_ids(self) -> tuple[list[str], list[int]] | None:
        """Per image, in input order: the request ID of the RPC that answered it and its
        position in that RPC (what feedback names it by); None when the server sent no
        request IDs (or not one for every part of a split call), or when the parts of a
        split call share one (a `request_id` the caller sent): they would be ambiguous."""
        if not self.request_ids or len(self.part_sizes) != len(self.request_ids):
            return None
        if len(set(self.request_ids)) != len(self.request_ids):
            return None  # one caller-sent ID for every part of a split call: ambiguous
        ids = [i for i, size in zip(self.request_ids, self.part_sizes, strict=True)
               for _ in range(size)]  # fmt: skip
        positions = [p for size in self.part_sizes for p in range(size)]
        if len(ids) != len(self):
            return None
        return ids, positions

    @property
    def confidence(self) -> npt.NDArray[np.float32]:
        """The probability of each predicted class, [N]."""
        return np.take_along_axis(self.probabilities, self.classes[:, None], axis=1)[:, 0]

    @staticmethod
    def concatenate(parts: list[Prediction]) -> Prediction:
        if len(parts) == 1:
            return parts[0]
        return Prediction(
            probabilities=np.concatenate([p.probabilities for p in parts]),
            classes=np.concatenate([p.classes for p in parts]),
            model_version=parts[0].model_version,
            request_ids=tuple(i for p in parts for i in p.request_ids),
            part_sizes=tuple(n for p in parts for n in p.part_sizes),
        )


def as_batch(images: npt.ArrayLike) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """Check and normalise images to a uint8 or float32 batch of [N, 28, 28] or [N, 784].

    Accepted: uint8 pixels 0..255 (the MNIST convention) or floats scaled to [0, 1], as one
    image ([28, 28], [784]) or a batch ([N, 28, 28], [N, 784], [N, 28, 28, 1]). Integer arrays
    of another type are accepted when every value fits 0..255. Range checks on floats are left
    to the server, which owns them.
    """
    array = np.asarray(images)
    if array.shape in (_IMAGE, (PIXELS,)):
        array = array[None]
    elif array.ndim == 4 and array.shape[1:] == (*_IMAGE, 1):
        array = array[..., 0]
    if array.ndim < 2 or array.shape[1:] not in (_IMAGE, (PIXELS,)):
        raise InvalidInput(
            f"images must have shape [N, {IMAGE_SIDE}, {IMAGE_SIDE}] or [N, {PIXELS}] (or one "
            f"[{IMAGE_SIDE}, {IMAGE_SIDE}] image), got {list(array.shape)}"
        )
    if len(array) == 0:
        raise InvalidInput("no images to classify (N = 0)")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        if array.min() < 0 or array.max() > 255:
            raise InvalidInput(
                f"integer pixels must be within 0..255, got {array.min()}..{array.max()}"
            )
        return array.astype(np.uint8)
    raise InvalidInput(f"images must be uint8 (0..255) or float (0..1), got dtype {array.dtype}")


def encode_images(
    batch: npt.NDArray[np.uint8] | npt.NDArray[np.float32],
) -> predict_pb2.Tensor:
    """A Tensor of a batch from `as_batch`; the bytes are copied once, by tobytes()."""
    if batch.dtype == np.uint8:
        dtype, content = predict_pb2.DATA_TYPE_UINT8, batch.tobytes()
    else:
        dtype, content = predict_pb2.DATA_TYPE_FLOAT32, batch.astype("<f4", copy=False).tobytes()
    return predict_pb2.Tensor(dtype=dtype, shape=batch.shape, content=content)


def decode_tensor(tensor: predict_pb2.Tensor, field: str) -> npt.NDArray[np.generic]:
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    shape = tuple(tensor.shape)
    if dtype is None or len(tensor.content) != dtype.itemsize * int(np.prod(shape)):
        raise ProtocolError(
            f"malformed {field} tensor: dtype {tensor.dtype}, shape {list(shape)}, "
            f"{len(tensor.content)} bytes"
        )
    # frombuffer is zero-copy but read-only and keeps the message alive; one copy of the
    # (small) result gives the caller a writable array in native byte order.
    return np.frombuffer(tensor.content, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def decode_prediction(response: predict_pb2.PredictResponse, count: int) -> Prediction:
    probabilities = decode_tensor(response.probabilities, "probabilities")
    classes = decode_tensor(response.classes, "classes")
    if (
        probabilities.dtype != np.float32
        or probabilities.shape != (count, NUM_CLASSES)
        or classes.dtype != np.int64
        or classes.shape != (count,)
    ):
        raise ProtocolError(
            f"expected probabilities float32 [{count}, {NUM_CLASSES}] and classes int64 "
            f"[{count}], got {probabilities.dtype} {list(probabilities.shape)} and "
            f"{classes.dtype} {list(classes.shape)}"
        )
    return Prediction(
        probabilities=probabilities.astype(np.float32, copy=False),
        classes=classes.astype(np.int64, copy=False),
        model_version=response.model_spec.version,
    )
