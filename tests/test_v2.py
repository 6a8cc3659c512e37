"""The Open Inference Protocol (KServe v2) over gRPC, called through tritonclient[grpc] and
through raw messages of its own generated code (a second, independent copy of the proto).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from .support import ServerProcess, native, scrape

SERVICE = "inference.GRPCInferenceService"


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def infer_input(images: np.ndarray, datatype: str = "UINT8") -> triton.InferInput:
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


@pytest.fixture(scope="module")
def client(served_tiny: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served_tiny.target) as client:
        yield client


@pytest.fixture(scope="module")
def stub(served_tiny: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served_tiny.target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_tritonclient_reads_liveness_readiness_and_metadata(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("mnist", "7")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "mnist-serving"
    assert "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("mnist", as_json=True)
    assert model["name"] == "mnist"
    assert model["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        ("images", "UINT8", ["-1", "28", "28"])
    ]
    assert [(t["name"], t["datatype"]) for t in model["outputs"]] == [
        ("probabilities", "FP32"),
        ("classes", "INT64"),
    ]


def test_tritonclient_infer_equals_the_native_api(
    served_tiny: ServerProcess, client: triton.InferenceServerClient
) -> None:
    images = pixels(7)
    result = client.infer("mnist", [infer_input(images)], request_id="req-1")
    probabilities, classes = native(served_tiny.target, images)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("classes"), classes)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mnist", "1", "req-1")
    floats = (images / 255.0).astype(np.float32).reshape(7, 784)
    result = client.infer("mnist", [infer_input(floats, "FP32")], model_version="1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)


def test_requested_outputs_are_honoured(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "mnist", [infer_input(pixels(3))], outputs=[triton.InferRequestedOutput("classes")]
    )
    assert [o.name for o in result.get_response().outputs] == ["classes"]
    assert result.as_numpy("classes").shape == (3,)
    assert result.as_numpy("probabilities") is None


def test_typed_contents_are_accepted(
    served_tiny: ServerProcess, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    images = pixels(2, seed=3)
    request = service_pb2.ModelInferRequest(model_name="mnist")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[2, 28, 28])
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["probabilities", "classes"]
    probabilities, _ = native(served_tiny.target, images)
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_array_equal(got, probabilities)


def test_served_accuracy_equals_the_native_api(
    served_trained: ServerProcess, mnist_path: Path
) -> None:
    with np.load(mnist_path) as data:
        images, labels = data["x_test"][:2000], data["y_test"][:2000]
    with triton.InferenceServerClient(served_trained.target) as client:
        tensor = triton.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        classes = client.infer("mnist", [tensor]).as_numpy("classes")
    _, native_classes = native(served_trained.target, images)
    np.testing.assert_array_equal(classes, native_classes)
    assert (classes == labels).mean() > 0.9


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda r: setattr(r, "model_name", "other"), "NOT_FOUND", "no model named"),
        (lambda r: setattr(r, "model_version", "9"), "NOT_FOUND", "version 9"),
        (lambda r: setattr(r, "model_version", "x"), "INVALID_ARGUMENT", "not a version"),
        # str.isdigit() passes "²", int() refuses it: this was INTERNAL (found by test_fuzz.py).
        (lambda r: setattr(r, "model_version", "²"), "INVALID_ARGUMENT", "not a version"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), "INVALID_ARGUMENT", "unknown input"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), "INVALID_ARGUMENT", "UINT8"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 27), "INVALID_ARGUMENT", "shape"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"12"), "INVALID_ARGUMENT", "bytes"),
        (lambda r: r.outputs.add(name="logits"), "INVALID_ARGUMENT", "unknown outputs"),
        (lambda r: r.raw_input_contents.append(b""), "INVALID_ARGUMENT", "raw_input_contents"),
        (
            lambda r: r.parameters["sequence_id"].__setattr__("int64_param", 3),
            "INVALID_ARGUMENT",
            "sequence_id",
        ),
    ],
)
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    client: triton.InferenceServerClient,
    make: object,
    code: str,
    words: str,
) -> None:
    request = service_pb2.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
    request.raw_input_contents.append(bytes(784))
    make(request)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request)
    assert raised.value.code().name == code
    assert words in (raised.value.details() or "")
    assert client.infer("mnist", [infer_input(pixels(1))]).as_numpy("classes").shape == (1,)


def test_the_timeout_parameter_is_a_deadline(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("mnist", [infer_input(pixels(1))], timeout=1)  # 1 microsecond
    assert "DEADLINE_EXCEEDED" in str(raised.value.status())


def test_methods_not_served_answer_unimplemented_and_are_counted(
    served_tiny: ServerProcess, client: triton.InferenceServerClient
) -> None:
    key = (
        "mnist_requests_total",
        (
            ("api", "v2"),
            ("caller", "anonymous"),
            ("code", "UNIMPLEMENTED"),
            ("method", "ModelConfig"),
            ("priority", "online"),
        ),
    )
    before = scrape(served_tiny).get(key, 0.0)
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_config("mnist")
    assert "UNIMPLEMENTED" in str(raised.value.status())
    assert scrape(served_tiny)[key] == before + 1


def test_calls_are_counted_under_api_v2(
    served_tiny: ServerProcess, client: triton.InferenceServerClient
) -> None:
    key = (
        "mnist_requests_total",
        (
            ("api", "v2"),
            ("caller", "anonymous"),
            ("code", "OK"),
            ("method", "ModelInfer"),
            ("priority", "online"),
        ),
    )
    before = scrape(served_tiny).get(key, 0.0)
    client.infer("mnist", [infer_input(pixels(2))])
    assert scrape(served_tiny)[key] == before + 1


def test_health_and_reflection_know_the_service(served_tiny: ServerProcess) -> None:
    with grpc.insecure_channel(served_tiny.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed, described = reflection.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
                ]
            )
        )
    assert SERVICE in {s.name for s in listed.list_services_response.service}
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in described.file_descriptor_response.file_descriptor_proto
    ]
    [service] = [s for f in files for s in f.service if f.package == "inference"]
    methods = {m.name for m in service.method}
    assert {"ModelInfer", "ModelMetadata", "ServerReady"} <= methods
