"""The TensorFlow Serving API of the real server, called through TF Serving's own stubs."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mnist_serving.contract.tfquiet import import_tensorflow
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import ServerProcess, scrape

# TF Serving's protos import the tensorflow package: import it first, without its noise.
tf = import_tensorflow()

from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

REPO = Path(__file__).resolve().parent.parent
TensorProto = Any


def predict_request(
    images: TensorProto | np.ndarray,
    *,
    name: str = "mnist",
    signature: str = "",
    version: int | None = None,
    output_filter: tuple[str, ...] = (),
    key: str = "images",
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(output_filter=output_filter)
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    tensor = tf.make_tensor_proto(images) if isinstance(images, np.ndarray) else images
    request.inputs[key].CopyFrom(tensor)
    return request


def as_values(images: np.ndarray) -> TensorProto:
    """The same tensor with its elements in int_val / float_val instead of tensor_content."""
    tensor = tf.make_tensor_proto(images)
    tensor.ClearField("tensor_content")
    if images.dtype == np.uint8:
        tensor.int_val.extend(images.ravel().tolist())  # TF carries uint8 in int_val
    else:
        tensor.float_val.extend(images.ravel().tolist())
    return tensor


def outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {key: tf.make_ndarray(tensor) for key, tensor in response.outputs.items()}


def native_probabilities(stub: predict_pb2_grpc.MnistServiceStub, images: np.ndarray) -> Any:
    dtype = {np.dtype("u1"): pb.DATA_TYPE_UINT8, np.dtype("<f4"): pb.DATA_TYPE_FLOAT32}
    response = stub.Predict(
        pb.PredictRequest(
            images=pb.Tensor(
                dtype=dtype[images.dtype], shape=images.shape, content=images.tobytes()
            )
        )
    )
    probabilities = np.frombuffer(response.probabilities.content, dtype="<f4")
    classes = np.frombuffer(response.classes.content, dtype="<i8")
    return probabilities.reshape(tuple(response.probabilities.shape)), classes


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def channel(served_tiny: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        served_tiny.target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def two_versions(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server holding versions 1 and 2 (the same tiny model twice)."""
    model_dir = tmp_path_factory.mktemp("two") / "mnist"
    for version in ("1", "2"):
        shutil.copytree(tiny_model_dir / "1", model_dir / version)
    server = ServerProcess(model_dir, "--poll-interval", "0", "--version-policy", "all")
    yield server
    assert server.stop() == 0, server.log


def test_real_images_get_the_native_apis_answers(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    channel: grpc.Channel,
    mnist_path: Path,
) -> None:
    with np.load(mnist_path) as data:
        images = data["x_test"][:256]
    response = stub.Predict(predict_request(images))
    answer = outputs(response)
    expected_probabilities, expected_classes = native_probabilities(
        predict_pb2_grpc.MnistServiceStub(channel), images
    )
    assert answer["probabilities"].dtype == np.float32
    assert answer["probabilities"].shape == (256, 10)
    assert answer["classes"].dtype == np.int64
    np.testing.assert_allclose(answer["probabilities"], expected_probabilities, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(answer["classes"], expected_classes)
    assert response.model_spec.name == "mnist"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_tensor_content_and_typed_values_agree(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
) -> None:
    images = pixels(8)
    scaled = (images / np.float32(255)).astype(np.float32)
    answers = [
        outputs(stub.Predict(predict_request(images))),
        outputs(stub.Predict(predict_request(as_values(images)))),
        outputs(stub.Predict(predict_request(scaled, signature="serving_float"))),
        outputs(stub.Predict(predict_request(as_values(scaled), signature="serving_float"))),
    ]
    for answer in answers[1:]:
        np.testing.assert_allclose(answer["probabilities"], answers[0]["probabilities"], atol=1e-6)
        np.testing.assert_array_equal(answer["classes"], answers[0]["classes"])


def test_float_and_uint8_requests_agree_in_both_shapes(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
) -> None:
    images = pixels(16, seed=1)
    as_uint8 = outputs(stub.Predict(predict_request(images)))
    scaled = (images / np.float32(255)).astype(np.float32)
    response = stub.Predict(predict_request(scaled, signature="serving_float"))
    assert response.model_spec.signature_name == "serving_float"
    np.testing.assert_allclose(
        outputs(response)["probabilities"], as_uint8["probabilities"], atol=1e-6
    )
    flat = outputs(stub.Predict(predict_request(images.reshape(16, 784))))
    np.testing.assert_array_equal(flat["probabilities"], as_uint8["probabilities"])


@pytest.mark.parametrize(
    ("output_filter", "keys"),
    [
        ((), {"probabilities", "classes"}),
        (("classes",), {"classes"}),
        (("probabilities",), {"probabilities"}),
        (("classes", "probabilities"), {"probabilities", "classes"}),
    ],
)
def test_output_filter_returns_only_what_was_asked(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    output_filter: tuple[str, ...],
    keys: set[str],
) -> None:
    response = stub.Predict(predict_request(pixels(3), output_filter=output_filter))
    assert set(response.outputs) == keys


def test_version_pinning(two_versions: ServerProcess) -> None:
    with grpc.insecure_channel(two_versions.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        images = pixels(2)
        assert stub.Predict(predict_request(images)).model_spec.version.value == 2
        for version in (1, 2):
            response = stub.Predict(predict_request(images, version=version))
            assert response.model_spec.version.value == version
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_request(images, version=7))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert "loaded: 2, 1" in (raised.value.details() or "")

        metadata = stub.GetModelMetadata(metadata_request(version=1))
        assert metadata.model_spec.version.value == 1
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"})
        )
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert [(s.version, s.state) for s in status.model_version_status] == [
            (2, available),
            (1, available),
        ]


def metadata_request(**spec: Any) -> get_model_metadata_pb2.GetModelMetadataRequest:
    return get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec={"name": "mnist", **({"version": {"value": spec["version"]}} if spec else {})},
        metadata_field=["signature_def"],
    )


def test_metadata_holds_the_savedmodels_signature_defs(
    stub: prediction_service_pb2_grpc.PredictionServiceStub, tiny_model_dir: Path
) -> None:
    response = stub.GetModelMetadata(metadata_request())
    assert response.model_spec.name == "mnist"
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    signatures = signature_map.signature_def
    assert set(signatures) == {"serving_default", "serving_float"}

    def spec(info: Any) -> tuple[int, list[int]]:
        return info.dtype, [d.size for d in info.tensor_shape.dim]

    for name, dtype in (
        ("serving_default", types_pb2.DT_UINT8),
        ("serving_float", types_pb2.DT_FLOAT),
    ):
        signature = signatures[name]
        assert signature.method_name == "tensorflow/serving/predict"
        assert {key: spec(info) for key, info in signature.inputs.items()} == {
            "images": (dtype, [-1, 28, 28])
        }
        assert {key: spec(info) for key, info in signature.outputs.items()} == {
            "probabilities": (types_pb2.DT_FLOAT, [-1, 10]),
            "classes": (types_pb2.DT_INT64, [-1]),
        }
    # Exactly what the SavedModel holds, graph tensor names included.
    saved = saved_model_pb2.SavedModel.FromString(
        (tiny_model_dir / "1" / "saved_model.pb").read_bytes()
    )
    assert signatures["serving_default"] == saved.meta_graphs[0].signature_def["serving_default"]


def test_model_status_lists_the_loaded_version(channel: grpc.Channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    status = stub.GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"})
    )
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "x"}))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def tensor(dtype: int, shape: list[int], **fields: Any) -> TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    for name, value in fields.items():
        if name == "tensor_content":
            proto.tensor_content = value
        else:
            getattr(proto, name).extend(value)
    return proto


GOOD = np.zeros((2, 28, 28), dtype=np.uint8)
UINT8, FLOAT, INT64 = types_pb2.DT_UINT8, types_pb2.DT_FLOAT, types_pb2.DT_INT64
BAD_FLOAT = np.full((2, 28, 28), 0.5, dtype=np.float32)
BAD_FLOAT[1, 3, 3] = 1.5
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        pytest.param(predict_request(GOOD, name="cifar"), NOT_FOUND, "'mnist'", id="model-name"),
        pytest.param(predict_request(GOOD, version=7), NOT_FOUND, "loaded: 1", id="version"),
        pytest.param(predict_request(GOOD, version=0), NOT_FOUND, "version 0", id="version-0"),
        pytest.param(
            predict_request(GOOD, signature="classify"),
            INVALID,
            "['serving_default', 'serving_float']",
            id="signature",
        ),
        pytest.param(predict_request(GOOD, key="pixels"), INVALID, "'images' is missing", id="key"),
        pytest.param(
            predict_pb2.PredictRequest(
                model_spec={"name": "mnist"},
                inputs={"images": tf.make_tensor_proto(GOOD), "extra": tf.make_tensor_proto(GOOD)},
            ),
            INVALID,
            "unexpected ['extra']",
            id="extra-key",
        ),
        pytest.param(
            predict_request(GOOD.astype(np.float32)),
            INVALID,
            "use signature_name 'serving_float'",
            id="float-to-uint8-signature",
        ),
        pytest.param(
            predict_request(GOOD, signature="serving_float"),
            INVALID,
            "takes images of DT_FLOAT, got DT_UINT8",
            id="uint8-to-float-signature",
        ),
        pytest.param(
            predict_request(GOOD.astype(np.int64)),
            INVALID,
            "got DT_INT64; send DT_UINT8 or DT_FLOAT",
            id="int64",
        ),
        pytest.param(
            predict_request(np.zeros((2, 27, 29), np.uint8)),
            INVALID,
            "[N, 28, 28] or [N, 784]",
            id="shape",
        ),
        pytest.param(
            predict_request(np.zeros((0, 28, 28), np.uint8)),
            INVALID,
            "at least one image",
            id="empty",
        ),
        pytest.param(
            predict_request(tensor(UINT8, [2, 28, 28], tensor_content=bytes(784))),
            INVALID,
            "needs 1568",
            id="content-count",
        ),
        pytest.param(
            predict_request(tensor(UINT8, [2, 28, 28], int_val=[0] * 784)),
            INVALID,
            "784 values in int_val; shape [2, 28, 28] needs 1568",
            id="int_val-count",
        ),
        pytest.param(
            predict_request(
                tensor(FLOAT, [1, 784], float_val=[0.5] * 10), signature="serving_float"
            ),
            INVALID,
            "10 values in float_val",
            id="float_val-count",
        ),
        pytest.param(
            predict_request(tensor(UINT8, [1, 28, 28])),
            INVALID,
            "0 values in int_val",
            id="no-values",
        ),
        pytest.param(
            predict_request(tensor(UINT8, [1, 784], int_val=[300] * 784)),
            INVALID,
            "0..255",
            id="int_val-range",
        ),
        pytest.param(
            predict_request(BAD_FLOAT, signature="serving_float"), INVALID, "[0, 1]", id="range"
        ),
        pytest.param(
            predict_request(tensor(UINT8, [1, 784], tensor_content=bytes(784), int_val=[0] * 784)),
            INVALID,
            "both tensor_content and int_val",
            id="two-forms",
        ),
        pytest.param(
            predict_request(GOOD, output_filter=("logits",)),
            INVALID,
            "['logits']",
            id="output_filter",
        ),
    ],
)
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    request_: predict_pb2.PredictRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request_)
    assert raised.value.code() == code
    assert words in (raised.value.details() or "")
    assert outputs(stub.Predict(predict_request(GOOD)))["classes"].shape == (2,)


def test_a_version_label_is_refused_with_the_reason(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
) -> None:
    request = predict_request(GOOD)
    request.model_spec.version_label = "stable"
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version_label 'stable' is not supported" in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        pytest.param(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "mnist"}),
            INVALID,
            "at least one field",
            id="no-field",
        ),
        pytest.param(
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec={"name": "mnist"}, metadata_field=["signature_def", "graph"]
            ),
            INVALID,
            "['graph'] is not supported",
            id="unknown-field",
        ),
        pytest.param(
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec={"name": "cifar"}, metadata_field=["signature_def"]
            ),
            NOT_FOUND,
            "'mnist'",
            id="model-name",
        ),
        pytest.param(metadata_request(version=3), NOT_FOUND, "loaded: 1", id="version"),
    ],
)
def test_bad_metadata_requests_get_a_clear_status(
    stub: prediction_service_pb2_grpc.PredictionServiceStub,
    request_: get_model_metadata_pb2.GetModelMetadataRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetModelMetadata(request_)
    assert raised.value.code() == code
    assert words in (raised.value.details() or "")


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("Classify", classification_pb2.ClassificationRequest()),
        ("Regress", regression_pb2.RegressionRequest()),
        ("MultiInference", inference_pb2.MultiInferenceRequest()),
    ],
)
def test_other_tf_serving_rpcs_are_unimplemented(
    stub: prediction_service_pb2_grpc.PredictionServiceStub, method: str, request_: Any
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, method)(request_)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "PredictionService/Predict" in (raised.value.details() or "")


def requests_total(samples: dict[Any, float], api: str, method: str, code: str) -> float:
    labels = (
        ("api", api),
        ("caller", "anonymous"),
        ("code", code),
        ("method", method),
        ("priority", "online"),
    )
    return samples.get(("mnist_requests_total", labels), 0.0)


def test_calls_are_counted_in_the_same_metrics_labelled_tfserving(
    served_tiny: ServerProcess, stub: prediction_service_pb2_grpc.PredictionServiceStub
) -> None:
    before = scrape(served_tiny)
    for count in (1, 2, 5):
        stub.Predict(predict_request(pixels(count)))
    with pytest.raises(grpc.RpcError):
        stub.Predict(predict_request(GOOD, signature="nope"))
    stub.GetModelMetadata(metadata_request())
    after = scrape(served_tiny)

    def increase(api: str, method: str, code: str = "OK") -> float:
        return requests_total(after, api, method, code) - requests_total(before, api, method, code)

    assert increase("tfserving", "Predict") == 3
    assert increase("tfserving", "Predict", "INVALID_ARGUMENT") == 1
    assert increase("tfserving", "GetModelMetadata") == 1
    assert increase("native", "Predict") == 0
    images = ("mnist_images_predicted_total", ())
    assert after[images] - before.get(images, 0.0) == 8
    duration = (
        "mnist_request_duration_seconds_count",
        (
            ("api", "tfserving"),
            ("caller", "anonymous"),
            ("method", "Predict"),
            ("priority", "online"),
        ),
    )
    assert after[duration] - before.get(duration, 0.0) == 4


def test_health_and_reflection_cover_the_tf_serving_services(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing, symbol = reflection.ServerReflectionInfo(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="tensorflow.serving.PredictionService"
                ),
            ]
        )
    )
    names = {s.name for s in listing.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"} <= names
    assert symbol.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


def test_the_migration_page_client_snippet_runs_unchanged(served_tiny: ServerProcess) -> None:
    page = (REPO / "docs" / "apis" / "tfserving-migration.md").read_text()
    match = re.search(r"```python\n(.*?)```", page, re.DOTALL)
    assert match, "the migration page has no python snippet"
    code = match.group(1)
    assert "localhost:8500" in code
    scope: dict[str, Any] = {}
    exec(code.replace("localhost:8500", served_tiny.target), scope)
    assert scope["probabilities"].shape[1] == 10
    assert scope["classes"].dtype == np.int64
