"""The server with each runtime: LiteRT twins, TensorFlow, and a server without TensorFlow.

Real server processes on free ports, called through the native API and TF Serving's own
stubs. The tiny model of conftest.py has a twin; a TensorFlow-only version is the same
folder without model.tflite.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mnist_serving.contract import TWIN
from mnist_serving.contract.tfquiet import import_tensorflow
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import ServerProcess, scrape

tf = import_tensorflow()  # TF Serving's official stubs import it

from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

# Put first on a child's sys.path, this makes `import tensorflow` fail in that process,
# as in an install without TensorFlow (and importlib finds no tensorflow to offer).
NO_TENSORFLOW = "import sys\nsys.modules['tensorflow'] = None\n"


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def native(server: ServerProcess, batch: np.ndarray, version: int = 0) -> tuple[Any, Any, int]:
    with grpc.insecure_channel(server.target) as channel:
        response = predict_pb2_grpc.MnistServiceStub(channel).Predict(
            pb.PredictRequest(
                model_spec=pb.ModelSpec(version=version),
                images=pb.Tensor(
                    dtype=pb.DATA_TYPE_UINT8, shape=batch.shape, content=batch.tobytes()
                ),
            ),
            timeout=30,
        )
    probabilities = np.frombuffer(response.probabilities.content, "<f4").reshape(-1, 10)
    return (
        probabilities,
        np.frombuffer(response.classes.content, "<i8"),
        response.model_spec.version,
    )


def tfserving(server: ServerProcess, batch: np.ndarray, signature: str = "") -> tuple[Any, Any]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = signature
    if signature == "serving_float":
        batch = batch.astype(np.float32) / np.float32(255)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch))
    with grpc.insecure_channel(server.target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=30
        )
    return (
        tf.make_ndarray(response.outputs["probabilities"]),
        tf.make_ndarray(response.outputs["classes"]),
    )


def runtimes(server: ServerProcess) -> dict[int, str]:
    with grpc.insecure_channel(server.target) as channel:
        metadata = predict_pb2_grpc.MnistServiceStub(channel).GetModelMetadata(
            pb.GetModelMetadataRequest(), timeout=10
        )
    return {v.version: v.runtime for v in metadata.versions}


def without_twin(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    (destination / TWIN).unlink()
    return destination


def wait_for(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def mixed_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1 without a twin (TensorFlow only), version 2 with one: the same weights."""
    model_dir = tmp_path_factory.mktemp("mixed") / "mnist"
    without_twin(tiny_model_dir / "1", model_dir / "1")
    shutil.copytree(tiny_model_dir / "1", model_dir / "2")
    return model_dir


@pytest.fixture(scope="module")
def served_tensorflow(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_model_dir, "--poll-interval", "0", "--runtime", "tensorflow")
    yield server
    assert server.stop() == 0, server.log


@pytest.fixture(scope="module")
def served_litert(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_model_dir, "--poll-interval", "0", "--runtime", "litert")
    yield server
    assert server.stop() == 0, server.log


def test_both_runtimes_give_the_same_answers_through_both_apis(
    served_tensorflow: ServerProcess, served_litert: ServerProcess
) -> None:
    for count in (1, 7, 300):  # inline on the event loop, and on the inference thread
        batch = images(count, seed=count)
        tf_probabilities, tf_classes, _ = native(served_tensorflow, batch)
        for server in (served_tensorflow, served_litert):
            for probabilities, classes in (
                native(server, batch)[:2],
                tfserving(server, batch),
                tfserving(server, batch, "serving_float"),
            ):
                np.testing.assert_array_equal(classes, tf_classes)
                np.testing.assert_allclose(probabilities, tf_probabilities, rtol=0, atol=1e-6)
    assert runtimes(served_tensorflow) == {1: "tensorflow"}
    assert runtimes(served_litert) == {1: "litert"}
    assert "runtimes=1:litert" in served_litert.log
    assert "runtimes=1:tensorflow" in served_tensorflow.log
    metric = (
        "mnist_model_version_info",
        (("name", "mnist"), ("runtime", "litert"), ("version", "1")),
    )
    assert scrape(served_litert)[metric] == 1


def test_tf_serving_metadata_is_the_same_with_either_runtime(
    served_tensorflow: ServerProcess, served_litert: ServerProcess, tiny_model_dir: Path
) -> None:
    """SignatureDefs read without TensorFlow are byte for byte what TensorFlow reads."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString(
        (tiny_model_dir / "1" / "saved_model.pb").read_bytes()
    )
    expected = saved.meta_graphs[0].signature_def
    for server in (served_tensorflow, served_litert):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "mnist"
        with grpc.insecure_channel(server.target) as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
                request, timeout=10
            )
        found = get_model_metadata_pb2.SignatureDefMap()
        assert response.metadata["signature_def"].Unpack(found)
        assert set(found.signature_def) == {"serving_default", "serving_float"}
        for name, signature_def in found.signature_def.items():
            assert signature_def.SerializeToString(deterministic=True) == expected[
                name
            ].SerializeToString(deterministic=True)


def test_auto_serves_each_version_with_the_runtime_it_can(mixed_dir: Path) -> None:
    with ServerProcess(mixed_dir, "--poll-interval", "0", "--version-policy", "all") as server:
        assert runtimes(server) == {2: "litert", 1: "tensorflow"}
        batch = images(5)
        one = native(server, batch, version=1)
        two = native(server, batch, version=2)
        np.testing.assert_array_equal(one[1], two[1])
        np.testing.assert_allclose(one[0], two[0], rtol=0, atol=1e-6)


def test_litert_refuses_a_version_without_a_twin_and_serves_the_others(mixed_dir: Path) -> None:
    with ServerProcess(
        mixed_dir, "--poll-interval", "0", "--version-policy", "all", "--runtime", "litert"
    ) as server:
        assert runtimes(server) == {2: "litert"}
        native(server, images(3))
    refused = [line for line in server.log_lines if "version not served" in line]
    assert len(refused) == 1, server.log
    assert "version=1 " in refused[0]
    assert "no LiteRT twin" in refused[0]
    assert "--runtime auto" in refused[0]


def test_hot_reload_from_tensorflow_to_a_twin_and_back(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "mnist"
    without_twin(tiny_model_dir / "1", model_dir / "1")
    batch = images(4)
    with ServerProcess(model_dir, "--poll-interval", "0.2") as server:
        assert runtimes(server) == {1: "tensorflow"}
        first = native(server, batch)
        shutil.copytree(tiny_model_dir / "1", model_dir / "2")  # a version with a twin
        wait_for(lambda: runtimes(server) == {2: "litert"})
        second = native(server, batch)
        without_twin(tiny_model_dir / "1", model_dir / "3")
        wait_for(lambda: runtimes(server) == {3: "tensorflow"})
        third = native(server, batch)
    assert [first[2], second[2], third[2]] == [1, 2, 3]
    for answer in (second, third):
        np.testing.assert_array_equal(answer[1], first[1])
        np.testing.assert_allclose(answer[0], first[0], rtol=0, atol=1e-6)


def test_without_tensorflow_twins_serve_and_a_version_without_one_is_refused(
    mixed_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_TENSORFLOW)
    with ServerProcess(
        mixed_dir,
        "--poll-interval", "0", "--version-policy", "all",
        env={"PYTHONPATH": str(tmp_path)},
    ) as server:  # fmt: skip
        assert runtimes(server) == {2: "litert"}
        native(server, images(2))
        tfserving(server, images(2))
    refused = [line for line in server.log_lines if "version not served" in line]
    assert len(refused) == 1, server.log
    assert "version=1 " in refused[0]
    assert "TensorFlow is not installed" in refused[0]
    assert "pip install 'mnist-serving[tensorflow]'" in refused[0]


def test_reflection_describes_every_service_with_its_imports(served_litert: ServerProcess) -> None:
    """What grpcurl does: list the services, fetch each one's file and its imports, and
    build them into a pool of its own."""
    with grpc.insecure_channel(served_litert.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (listing,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = sorted(s.name for s in listing.list_services_response.service)
        assert {
            "mnist.v1.MnistService",
            "tensorflow.serving.PredictionService",
            "tensorflow.serving.ModelService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= set(names)
        answers = stub.ServerReflectionInfo(
            iter(reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names)
        )
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for answer in answers:
            assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
            for raw in answer.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    for name in names:
        assert pool.FindServiceByName(name).methods
    inputs = pool.FindMessageTypeByName("tensorflow.serving.PredictRequest.InputsEntry")
    value = inputs.fields_by_name["value"].message_type
    assert value is not None
    assert value.full_name == "tensorflow.TensorProto"


def test_a_lean_server_never_imports_tensorflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    """With every version a twin, the server process has no tensorflow module at all."""
    report = tmp_path / "modules.json"
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, json, sys\n"
        "def report():\n"
        "    found = sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow')\n"
        f"    open({str(report)!r}, 'w').write(json.dumps(found))\n"
        "atexit.register(report)\n"
    )
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", env={"PYTHONPATH": str(tmp_path)}
    ) as server:
        native(server, images(1))
        tfserving(server, images(1))
        assert server.stop() == 0
    assert json.loads(report.read_text()) == []


def test_a_broken_twin_is_refused_with_its_path_and_the_others_keep_serving(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "mnist"
    shutil.copytree(tiny_model_dir / "1", model_dir / "1")
    shutil.copytree(tiny_model_dir / "1", model_dir / "2")
    (model_dir / "2" / TWIN).write_bytes(b"not a flatbuffer")
    with ServerProcess(model_dir, "--poll-interval", "0", "--version-policy", "all") as server:
        assert runtimes(server) == {1: "litert"}
        native(server, images(1))
    failed = [line for line in server.log_lines if "failed to load" in line]
    assert len(failed) == 1, server.log
    assert "version=2 " in failed[0]
    assert str(model_dir / "2" / TWIN) in failed[0]


def test_auto_imports_tensorflow_only_when_a_version_needs_it_and_keeps_logging(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "mnist"
    shutil.copytree(tiny_model_dir / "1", model_dir / "1")
    with ServerProcess(model_dir, "--poll-interval", "0.2") as server:
        assert runtimes(server) == {1: "litert"}
        without_twin(tiny_model_dir / "1", model_dir / "2")  # TensorFlow is imported now
        wait_for(lambda: runtimes(server) == {2: "tensorflow"})
        native(server, images(2))
    loaded = [line for line in server.log_lines if "version loaded" in line]
    assert ["runtime=litert" in loaded[0], "runtime=tensorflow" in loaded[1]] == [True, True]
    # TensorFlow was imported while serving, quietly: its start-up noise is not in the log.
    assert any("version=2" in line and "loading version" in line for line in server.log_lines)
    assert not any("oneDNN" in line or "cuda" in line.lower() for line in server.log_lines)
