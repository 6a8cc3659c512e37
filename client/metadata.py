"""What the server says it serves, as plain dataclasses (no protobuf types leak out)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mnist_serving.protos.mnist.v1 import predict_pb2


def _dtype_name(dtype: int) -> str:
    return str(predict_pb2.DataType.Name(dtype)).removeprefix("DATA_TYPE_").lower()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "uint8", "float32", "int64"
    shape: tuple[int, ...]  # -1 = any size

    @staticmethod
    def from_proto(spec: predict_pb2.TensorSpec) -> TensorSpec:
        return TensorSpec(spec.name, _dtype_name(spec.dtype), tuple(spec.shape))


@dataclass(frozen=True)
class VersionInfo:
    version: int
    test_accuracy: float
    test_loss: float
    trained_at: str
    architecture: str


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[VersionInfo, ...]  # newest first; the first answers unpinned calls
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    class_labels: tuple[str, ...]
    max_images_per_request: int

    @property
    def newest_version(self) -> int:
        return self.versions[0].version if self.versions else 0

    @staticmethod
    def from_proto(response: predict_pb2.GetModelMetadataResponse) -> ModelMetadata:
        return ModelMetadata(
            name=response.name,
            versions=tuple(
                VersionInfo(v.version, v.test_accuracy, v.test_loss, v.trained_at, v.architecture)
                for v in response.versions
            ),
            inputs=tuple(TensorSpec.from_proto(s) for s in response.inputs),
            outputs=tuple(TensorSpec.from_proto(s) for s in response.outputs),
            class_labels=tuple(response.class_labels),
            max_images_per_request=response.max_images_per_request,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
