"""The client library against a real gRPC server (tests/fake_server.py) on a loopback port."""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from mnist_serving.client import (
    NO_RETRY,
    AsyncMnistClient,
    DeadlineExceeded,
    InvalidInput,
    MnistClient,
    MnistError,
    NotFound,
    Overloaded,
    RetryPolicy,
    Unavailable,
)

from .fake_server import FakeServer, expected, free_port, running_fake_server

FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with running_fake_server() as server:
        yield server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[MnistClient]:
    with MnistClient(fake.target, retry=FAST_RETRY, timeout=10) as client:
        yield client


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def test_predict_uint8_batch(client: MnistClient) -> None:
    images = random_images(37)
    prediction = client.predict(images)
    probabilities, classes = expected(images)
    assert prediction.probabilities.dtype == np.float32
    assert prediction.classes.dtype == np.int64
    np.testing.assert_array_equal(prediction.classes, classes)
    np.testing.assert_array_equal(prediction.probabilities, probabilities)
    np.testing.assert_array_equal(prediction.confidence, np.full(37, 0.91, np.float32))
    assert prediction.model_version == 2
    assert len(prediction) == 37


@pytest.mark.parametrize(
    ("transform", "count"),
    [
        (lambda x: x[0], 1),  # one [28, 28] image
        (lambda x: x.reshape(len(x), 784), 5),
        (lambda x: x.reshape(784 * len(x))[:784], 1),  # one flat image
        (lambda x: x[..., None], 5),  # Keras' channel axis
        (lambda x: x.astype(np.float32) / 255, 5),
        (lambda x: x.astype(np.float64) / 255, 5),
        (lambda x: x.astype(np.int64), 5),
        (lambda x: x.tolist(), 5),
    ],
)
def test_predict_accepted_layouts(
    client: MnistClient, transform: Callable[[np.ndarray], Any], count: int
) -> None:
    images = random_images(5)
    prediction = client.predict(transform(images))
    np.testing.assert_array_equal(prediction.classes, expected(images[:count])[1])


def test_float_requests_are_sent_as_float32(client: MnistClient, fake: FakeServer) -> None:
    images = random_images(3)
    client.predict(images.astype(np.float64) / 255)
    # Out-of-range floats are the server's to reject, which proves they went as floats.
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        client.predict(images.astype(np.float32))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((3, 28, 27), np.uint8), "shape"),
        (np.zeros((28,), np.uint8), "shape"),
        (np.zeros((0, 28, 28), np.uint8), "N = 0"),
        (np.full((2, 784), 256, np.int64), "0..255"),
        (np.full((2, 784), "a"), "dtype"),
    ],
)
def test_bad_input_is_rejected_before_sending(
    client: MnistClient, fake: FakeServer, images: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        client.predict(images)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.service.predict_calls() == []


def test_big_batches_are_split_in_order_and_pinned(fake: FakeServer) -> None:
    images = random_images(2500, seed=1)
    with MnistClient(fake.target, max_images_per_request=1000) as client:
        prediction = client.predict(images)
    np.testing.assert_array_equal(prediction.classes, expected(images)[1])
    np.testing.assert_array_equal(prediction.probabilities, expected(images)[0])
    calls = fake.service.predict_calls()
    assert [c.images for c in calls] == [1000, 1000, 500]
    # The first part asks for the newest version; the rest are pinned to the one that answered.
    assert [c.version for c in calls] == [0, 2, 2]


def test_largest_requests_fit_the_message_limits(client: MnistClient) -> None:
    # 4096 float32 images are 12.8 MB: over gRPC's default 4 MiB.
    images = random_images(4096, seed=2)
    with MnistClient(client.target, max_images_per_request=4096) as big:
        prediction = big.predict(images.astype(np.float32) / 255)
    np.testing.assert_array_equal(prediction.classes, expected(images)[1])


def test_model_version_pin_and_not_found(client: MnistClient) -> None:
    images = random_images(2)
    assert client.predict(images, model_version=1).model_version == 1
    with pytest.raises(NotFound) as caught:
        client.predict(images, model_version=7)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.details == "version 7 is not loaded"
    with (
        MnistClient(client.target, model_name="other") as other,
        pytest.raises(NotFound, match="other"),
    ):
        other.predict(images)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retryable_failures_are_retried(
    client: MnistClient, fake: FakeServer, code: grpc.StatusCode
) -> None:
    fake.service.fail_next(code, times=2)
    images = random_images(4)
    prediction = client.predict(images)
    np.testing.assert_array_equal(prediction.classes, expected(images)[1])
    assert len(fake.service.predict_calls()) == 3


def test_big_requests_are_retried_too(fake: FakeServer) -> None:
    # gRPC drops a request from its retry buffer (256 KiB by default) and then gives up
    # retrying it; the client raises the buffer so a 12.8 MB request is still retried.
    fake.service.fail_next(grpc.StatusCode.UNAVAILABLE, times=2)
    images = random_images(4096, seed=3).astype(np.float32) / 255
    with MnistClient(fake.target, retry=FAST_RETRY, max_images_per_request=4096) as client:
        client.predict(images)
    assert len(fake.service.predict_calls()) == 3


def test_invalid_argument_is_never_retried(client: MnistClient, fake: FakeServer) -> None:
    fake.service.fail_next(grpc.StatusCode.INVALID_ARGUMENT, details="pixels are wrong")
    with pytest.raises(InvalidInput) as caught:
        client.predict(random_images(1))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == "pixels are wrong"
    assert "INVALID_ARGUMENT: pixels are wrong" in str(caught.value)
    assert len(fake.service.predict_calls()) == 1


@pytest.mark.parametrize(
    ("code", "error"),
    [(grpc.StatusCode.UNAVAILABLE, Unavailable), (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded)],
)
def test_retries_give_up_with_the_servers_message(
    fake: FakeServer, code: grpc.StatusCode, error: type[MnistError]
) -> None:
    fake.service.fail_next(code, times=10, details="queue is full")
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    with MnistClient(fake.target, retry=retry) as client, pytest.raises(error) as caught:
        client.predict(random_images(1))
    assert caught.value.code == code
    assert caught.value.details == "queue is full"
    assert len(fake.service.predict_calls()) == 3


def test_backoff_waits_between_attempts(fake: FakeServer) -> None:
    fake.service.fail_next(grpc.StatusCode.UNAVAILABLE, times=10)
    # Jitter draws each wait from [0, backoff]; four waits of up to 0.4 s sum to ~0.8 s on
    # average, so over 0.15 s fails only if backoff were skipped (a chance below 1e-4).
    retry = RetryPolicy(max_attempts=5, initial_backoff=0.4, max_backoff=0.4)
    started = time.monotonic()
    with MnistClient(fake.target, retry=retry) as client, pytest.raises(Unavailable):
        client.predict(random_images(1))
    assert time.monotonic() - started > 0.15
    assert len(fake.service.predict_calls()) == 5


def test_no_retry_policy(fake: FakeServer) -> None:
    fake.service.fail_next(grpc.StatusCode.UNAVAILABLE)
    with MnistClient(fake.target, retry=NO_RETRY) as client, pytest.raises(Unavailable):
        client.predict(random_images(1))
    assert len(fake.service.predict_calls()) == 1


def test_retry_policy_limits() -> None:
    with pytest.raises(ValueError, match=r"1\.\.5"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="positive"):
        RetryPolicy(initial_backoff=0)


def test_deadline_exceeded(fake: FakeServer) -> None:
    fake.service.delay = 1.0
    with MnistClient(fake.target, timeout=0.2) as client, pytest.raises(DeadlineExceeded) as e:
        client.predict(random_images(1))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unreachable_server_is_unavailable() -> None:
    with MnistClient(f"127.0.0.1:{free_port()}", retry=FAST_RETRY, timeout=10) as client:
        with pytest.raises(Unavailable):
            client.predict(random_images(1))
        with pytest.raises(Unavailable):
            client.health()


def test_metadata(client: MnistClient) -> None:
    metadata = client.metadata()
    assert metadata.name == "mnist"
    assert [v.version for v in metadata.versions] == [2, 1]
    assert metadata.newest_version == 2
    assert metadata.versions[0].test_accuracy == pytest.approx(0.92)
    assert metadata.inputs[0].dtype == "uint8"
    assert metadata.inputs[0].shape == (-1, 28, 28)
    assert [o.name for o in metadata.outputs] == ["probabilities", "classes"]
    assert metadata.class_labels == tuple("0123456789")
    assert metadata.max_images_per_request == 4096
    assert metadata.to_dict()["versions"][1]["version"] == 1


def test_health(client: MnistClient, fake: FakeServer) -> None:
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    fake.set_serving(False)
    assert client.health() == "NOT_SERVING"
    with pytest.raises(NotFound):
        client.health("no.such.Service")
    # Health probes are never retried: they report what they see.
    fake.service.fail_next(grpc.StatusCode.UNAVAILABLE)
    assert client.health() == "NOT_SERVING"


def test_context_manager_closes_the_channel(fake: FakeServer) -> None:
    with MnistClient(fake.target) as client:
        client.predict(random_images(1))
    with pytest.raises(ValueError, match="closed channel"):
        client.predict(random_images(1))


def test_async_client(fake: FakeServer) -> None:
    images = random_images(300, seed=4)

    async def run() -> None:
        async with AsyncMnistClient(
            fake.target, max_images_per_request=64, retry=FAST_RETRY
        ) as client:
            assert await client.health() == "SERVING"
            assert (await client.metadata()).max_images_per_request == 4096
            fake.service.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2)
            results = await asyncio.gather(
                *(client.predict(images[i : i + 100]) for i in range(0, 300, 100))
            )
            classes = np.concatenate([r.classes for r in results])
            np.testing.assert_array_equal(classes, expected(images)[1])
            with pytest.raises(NotFound):
                await client.predict(images[:1], model_version=9)
            with pytest.raises(InvalidInput):
                await client.predict(images.astype(np.float32))

    asyncio.run(run())
    # 3 calls x 2 parts of 64 (plus one of 100 - 64) = 6 answered, 2 shed and retried,
    # then one NOT_FOUND and one INVALID_ARGUMENT, neither retried.
    assert len(fake.service.predict_calls()) == 6 + 2 + 2


def test_client_dependencies_have_no_tensorflow() -> None:
    requirements = importlib.metadata.requires("mnist-serving") or []
    base = [r for r in requirements if "extra ==" not in r]
    assert base, requirements
    assert not [r for r in base if "tensorflow" in r.lower()]
    # ...and the extras that do pull TensorFlow are not the client's.
    images = [r for r in requirements if 'extra == "images"' in r]
    assert images
    assert not [r for r in images if "tensorflow" in r.lower()]


def test_importing_the_client_does_not_import_tensorflow() -> None:
    code = (
        "import sys, mnist_serving.client, mnist_serving.client.__main__;"
        "from mnist_serving.client import inputs, images, scoring;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'));"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
