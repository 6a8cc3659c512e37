"""The real server in its own process, a real SavedModel, a real channel."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

from .support import ServerProcess

DTYPES = {np.dtype("u1"): pb.DATA_TYPE_UINT8, np.dtype("<f4"): pb.DATA_TYPE_FLOAT32}


def images_request(images: np.ndarray, **spec: object) -> pb.PredictRequest:
    return pb.PredictRequest(
        model_spec=pb.ModelSpec(**spec),  # type: ignore[arg-type]
        images=pb.Tensor(dtype=DTYPES[images.dtype], shape=images.shape, content=images.tobytes()),
    )


def decode(tensor: pb.Tensor) -> np.ndarray:
    dtype = {pb.DATA_TYPE_FLOAT32: "<f4", pb.DATA_TYPE_INT64: "<i8"}[tensor.dtype]
    return np.frombuffer(tensor.content, dtype=dtype).reshape(tuple(tensor.shape))


@pytest.fixture(scope="module")
def stub(served_tiny: ServerProcess) -> predict_pb2_grpc.MnistServiceStub:
    channel = grpc.insecure_channel(
        served_tiny.target, options=[("grpc.max_send_message_length", 64 << 20)]
    )
    return predict_pb2_grpc.MnistServiceStub(channel)


@pytest.fixture(scope="module")
def test_images(mnist_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(mnist_path) as data:
        return data["x_test"], data["y_test"]


def in_process_predictions(model_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the SavedModel itself answers, loaded in this process."""
    from mnist_serving.contract.tfquiet import import_tensorflow

    tf = import_tensorflow()
    signature = tf.saved_model.load(str(model_dir / "1")).signatures["serving_default"]
    outputs = signature(images=tf.constant(images))
    return outputs["probabilities"].numpy(), outputs["classes"].numpy()


def test_real_images_match_the_savedmodel_in_process(
    served_trained: ServerProcess, trained_model_dir: Path, test_images: tuple[np.ndarray, ...]
) -> None:
    images = test_images[0][:512]
    channel = grpc.insecure_channel(served_trained.target)
    response = predict_pb2_grpc.MnistServiceStub(channel).Predict(images_request(images))
    probabilities, classes = decode(response.probabilities), decode(response.classes)
    expected_probabilities, expected_classes = in_process_predictions(trained_model_dir, images)
    assert probabilities.shape == (512, 10)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(classes, np.argmax(probabilities, axis=1))
    np.testing.assert_array_equal(classes, expected_classes)
    assert response.model_spec.name == "mnist"
    assert response.model_spec.version == 1


def test_served_accuracy_on_the_test_set_matches_the_trainer_report(
    served_trained: ServerProcess, trained_model_dir: Path, test_images: tuple[np.ndarray, ...]
) -> None:
    images, labels = test_images
    stub = predict_pb2_grpc.MnistServiceStub(grpc.insecure_channel(served_trained.target))
    classes = np.concatenate(
        [
            decode(stub.Predict(images_request(images[start : start + 2500])).classes)
            for start in range(0, len(images), 2500)
        ]
    )
    report = json.loads((trained_model_dir / "1" / "assets.extra" / "metrics.json").read_text())
    assert len(classes) == 10_000
    assert float(np.mean(classes == labels)) == pytest.approx(report["test_accuracy"], abs=1e-4)


def test_float_and_uint8_requests_agree(stub: predict_pb2_grpc.MnistServiceStub) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    as_uint8 = stub.Predict(images_request(pixels))
    as_float = stub.Predict(images_request((pixels / np.float32(255)).astype(np.float32)))
    np.testing.assert_allclose(
        decode(as_uint8.probabilities), decode(as_float.probabilities), atol=1e-6
    )
    flat = stub.Predict(images_request(pixels.reshape(16, 784)))
    np.testing.assert_array_equal(decode(flat.probabilities), decode(as_uint8.probabilities))


def test_order_is_kept_under_concurrent_calls(stub: predict_pb2_grpc.MnistServiceStub) -> None:
    rng = np.random.default_rng(2)
    batches = [
        rng.integers(0, 256, size=(int(rng.integers(1, 40)), 28, 28), dtype=np.uint8)
        for _ in range(64)
    ]
    alone = [decode(stub.Predict(images_request(b)).probabilities) for b in batches]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: stub.Predict(images_request(b)), batches))
    for expected, response in zip(alone, together, strict=True):
        np.testing.assert_allclose(decode(response.probabilities), expected, atol=1e-6)


def test_a_4096_image_batch_fits(stub: predict_pb2_grpc.MnistServiceStub) -> None:
    images = np.zeros((4096, 28, 28), dtype=np.float32)
    response = stub.Predict(images_request(images))
    assert decode(response.classes).shape == (4096,)


GOOD = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2, 28, 28], content=bytes(2 * 784))


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.PredictRequest(), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        (
            pb.PredictRequest(
                images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2, 28, 28], content=bytes(784))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs 1568",
        ),
        (
            pb.PredictRequest(
                images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[0, 28, 28], content=b"")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at least one image",
        ),
        (
            pb.PredictRequest(
                images=pb.Tensor(
                    dtype=pb.DATA_TYPE_UINT8, shape=[4097, 784], content=bytes(4097 * 784)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 4096",
        ),
        (
            pb.PredictRequest(
                images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2, 27, 29], content=bytes(1566))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "[N, 28, 28] or [N, 784]",
        ),
        (
            pb.PredictRequest(
                images=pb.Tensor(dtype=pb.DATA_TYPE_INT64, shape=[2, 784], content=bytes(2 * 6272))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "uint8 or float32",
        ),
        (
            pb.PredictRequest(model_spec=pb.ModelSpec(name="cifar"), images=GOOD),
            grpc.StatusCode.NOT_FOUND,
            "'mnist'",
        ),
        (
            pb.PredictRequest(model_spec=pb.ModelSpec(version=7), images=GOOD),
            grpc.StatusCode.NOT_FOUND,
            "loaded: 1",
        ),
    ],
)
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(
    stub: predict_pb2_grpc.MnistServiceStub,
    request_: pb.PredictRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request_)
    assert raised.value.code() == code
    assert words in (raised.value.details() or "")
    assert decode(stub.Predict(pb.PredictRequest(images=GOOD)).classes).shape == (2,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5, 1.5])
def test_floats_outside_zero_one_are_refused(
    stub: predict_pb2_grpc.MnistServiceStub, bad: float
) -> None:
    images = np.full((3, 28, 28), 0.5, dtype=np.float32)
    images[1, 5, 5] = bad
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(images_request(images))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "[0, 1]" in (raised.value.details() or "")


def test_metadata_lists_versions_spec_labels_and_training_figures(
    served_trained: ServerProcess, trained_model_dir: Path
) -> None:
    stub = predict_pb2_grpc.MnistServiceStub(grpc.insecure_channel(served_trained.target))
    metadata = stub.GetModelMetadata(pb.GetModelMetadataRequest())
    report = json.loads((trained_model_dir / "1" / "assets.extra" / "metrics.json").read_text())
    assert metadata.name == "mnist"
    assert [v.version for v in metadata.versions] == [1]
    assert metadata.versions[0].test_accuracy == pytest.approx(report["test_accuracy"])
    assert metadata.versions[0].trained_at == report["trained_at"]
    assert list(metadata.class_labels) == [str(d) for d in range(10)]
    assert {(s.name, s.dtype, tuple(s.shape)) for s in metadata.outputs} == {
        ("probabilities", pb.DATA_TYPE_FLOAT32, (-1, 10)),
        ("classes", pb.DATA_TYPE_INT64, (-1,)),
    }
    assert (pb.DATA_TYPE_UINT8, (-1, 28, 28)) in {
        (s.dtype, tuple(s.shape)) for s in metadata.inputs
    }
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetModelMetadata(pb.GetModelMetadataRequest(name="other"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_says_serving_and_reflection_lists_the_services(served_tiny: ServerProcess) -> None:
    channel = grpc.insecure_channel(served_tiny.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mnist.v1.MnistService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"mnist.v1.MnistService", "grpc.health.v1.Health"} <= names
