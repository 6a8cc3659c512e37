"""The committed generated code is exactly what protos/generate.py makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    # In its own process: protoc's bundled C++ protobuf and TensorFlow's clash in one.
    subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "no code generated"
    for path in fresh:
        committed = REPO / "protos" / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is not committed"
        assert committed.read_text() == path.read_text(), f"{committed} differs; run make proto"


def test_the_copies_are_wire_compatible_with_the_originals() -> None:
    """Every message, field, enum value and method of protos/tensorflow*/ exists upstream
    (tensorflow, tensorflow-serving-api) under the same full name, number and type."""
    from google.protobuf import descriptor_pool

    from mnist_serving.contract.tfquiet import import_tensorflow
    from mnist_serving.protos import _pool
    from mnist_serving.protos.tensorflow.core.protobuf import saved_model_pb2 as _ours_saved
    from mnist_serving.protos.tensorflow_serving.apis import model_service_pb2 as _ours_models
    from mnist_serving.protos.tensorflow_serving.apis import prediction_service_pb2 as _ours

    import_tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: F401
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401

    upstream = descriptor_pool.Default()
    files = {_ours.DESCRIPTOR, _ours_models.DESCRIPTOR, _ours_saved.DESCRIPTOR}
    seen: set[str] = set()
    checked = 0
    while files:
        file = files.pop()
        if file.name in seen or file.name.startswith("google/"):
            continue
        seen.add(file.name)
        files.update(file.dependencies)
        assert _pool.POOL.FindFileByName(file.name) is file
        messages = list(file.message_types_by_name.values())
        while messages:
            ours = messages.pop()
            messages.extend(ours.nested_types)
            theirs = upstream.FindMessageTypeByName(ours.full_name)
            for field in ours.fields:
                original = theirs.fields_by_number[field.number]
                assert (field.name, field.type, field.is_repeated) == (
                    original.name,
                    original.type,
                    original.is_repeated,
                ), field.full_name
                for kind in ("message_type", "enum_type"):
                    mine, other = getattr(field, kind), getattr(original, kind)
                    assert (mine and mine.full_name) == (other and other.full_name), field.full_name
                checked += 1
            for enum in ours.enum_types:
                original_enum = upstream.FindEnumTypeByName(enum.full_name)
                for value in enum.values:
                    assert original_enum.values_by_name[value.name].number == value.number
        for enum in file.enum_types_by_name.values():
            original_enum = upstream.FindEnumTypeByName(enum.full_name)
            for value in enum.values:
                assert original_enum.values_by_name[value.name].number == value.number
        for service in file.services_by_name.values():
            original_service = upstream.FindServiceByName(service.full_name)
            for method in service.methods:
                other_method = original_service.methods_by_name[method.name]
                assert method.input_type.full_name == other_method.input_type.full_name
                assert method.output_type.full_name == other_method.output_type.full_name
    assert checked > 30
