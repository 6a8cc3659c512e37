"""Model quality: the training reference, drift signals and feedback (live accuracy).

Unit tests for the pieces (contract/reference.py, the window, the feedback join), then a
real server on the real trained model: normal test-set traffic stays under every alert
threshold of deploy/ (read from the rule file itself), drifted traffic crosses them,
feedback for the whole test set gives exactly the offline accuracy, and a version exported
without a reference still serves.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from mnist_serving.contract import REPORT
from mnist_serving.contract.reference import (
    CONFIDENCE_EDGES,
    INPUT_EDGES,
    bin_counts,
    build_reference,
    check_reference,
    input_statistics,
    js_divergence,
)
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server import metrics
from mnist_serving.server.call_context import Call
from mnist_serving.server.errors import InvalidInput
from mnist_serving.server.feedback import (
    MAX_LABELS,
    FeedbackLabel,
    RecentPredictions,
    check_labels,
)
from mnist_serving.server.quality import VersionWindow, as_pixels
from mnist_serving.server.runtimes.base import Prediction

from .support import Samples, ServerProcess

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
WINDOW = 1000  # the test server's window: each scenario of 1000 images replaces the last
CALL_IMAGES = 100
TIMEOUT = 120.0  # a safety net for waits on events, on a loaded 2-core machine


def thresholds() -> dict[str, float]:
    """Each drift gauge's alert threshold, from the PrometheusRule in deploy/."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    found = {}
    for group in document["spec"]["groups"]:
        for rule in group["rules"]:
            match = re.fullmatch(
                r"max by \(version\) \((mnist_\w+)\) > ([\d.]+)", rule["expr"].strip()
            )
            if match:
                found[match.group(1)] = float(match.group(2))
    return found


SIGNALS = tuple(gauge._name for gauge in metrics.DRIFT_GAUGES)


def test_every_drift_gauge_has_an_alert() -> None:
    assert set(thresholds()) == set(SIGNALS)


# ---------------------------------------------------------------------------------------------
# Units: the reference's functions, the window, the feedback join


def test_js_divergence_is_bounded_and_finite_on_empty_classes() -> None:
    uniform = np.full(10, 0.1)
    assert js_divergence(uniform, uniform) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    only_sevens = np.eye(10)[7]
    value = js_divergence(only_sevens * 1000, uniform)  # counts are normalised
    assert 0.5 < value < 1.0
    assert js_divergence(uniform, only_sevens) == pytest.approx(value)


def test_input_statistics_of_uint8_and_float_images_agree() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    mean, ink = input_statistics(images)
    flat = images.reshape(50, -1)
    np.testing.assert_allclose(mean, flat.mean(axis=1) / 255, rtol=1e-6)
    np.testing.assert_allclose(ink, (flat > 127).mean(axis=1), rtol=1e-6)
    mean_f, ink_f = input_statistics(images.astype(np.float32) / 255)
    np.testing.assert_allclose(mean_f, mean, rtol=1e-5)
    np.testing.assert_array_equal(ink_f, ink)
    # A strided view takes the plain path and gives the same numbers.
    np.testing.assert_array_equal(input_statistics(images[:, :, ::-1])[1], ink)


def test_bins_are_prometheus_le_buckets() -> None:
    edges = (0.0, 0.5, 1.0)
    assert bin_counts(np.array([0.0, 0.5, 0.50001, 1.0]), edges).tolist() == [2, 2]


def _prediction(rng: np.random.Generator, count: int) -> Prediction:
    probabilities = rng.dirichlet(np.ones(10), count).astype(np.float32)
    return Prediction(probabilities, probabilities.argmax(axis=1))


def test_window_keeps_the_last_images_and_counts_every_one() -> None:
    """Calls of every size (wrapping, one larger than the window): the window holds exactly
    the last `size` images, and the histograms counted each image once."""
    rng = np.random.default_rng(1)
    reference = build_reference(
        rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 100),
        rng.dirichlet(np.ones(10), 100),
    )
    version = 987654  # a series of its own in this process's registry
    histogram = metrics.PREDICTION_CONFIDENCE.labels(str(version))
    window = VersionWindow(version, reference, 1000, 10, input_sample=None)
    sent: list[np.ndarray] = []
    top: list[np.ndarray] = []
    for count in (1, 5, 300, 999, 17, 1000, 2500, 3, 700, 450, 1):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        prediction = _prediction(rng, count)
        window.add(as_pixels(images), prediction.probabilities, prediction.classes)
        sent.append(images)
        top.append(prediction.probabilities.max(axis=1))
        if count == 17:
            window.refresh()  # a refresh in between changes nothing of the outcome
    window.refresh()
    last_images = np.concatenate(sent)[-1000:]
    last_top = np.concatenate(top)[-1000:]
    assert window.images == 1000
    np.testing.assert_allclose(np.sort(window.confidence), np.sort(last_top))
    np.testing.assert_allclose(np.sort(window.intensity), np.sort(input_statistics(last_images)[0]))
    assert sum(bucket.get() for bucket in histogram._buckets) == sum(len(s) for s in sent)
    bucket_counts = [bucket.get() for bucket in histogram._buckets]
    expected = bin_counts(np.concatenate(top), CONFIDENCE_EDGES)
    assert bucket_counts == expected.tolist()


def test_recent_predictions_join_accept_unknown_duplicate_and_forget() -> None:
    recent = RecentPredictions(capacity=5)
    classes = np.array([3, 1, 4])
    prediction = Prediction(np.eye(10, dtype=np.float32)[classes], classes)
    recent.observe(Call("native", "Predict", request_id="a"), np.zeros((3, 28, 28)), prediction, 2)
    outcome = recent.join(
        [
            FeedbackLabel("a", 0, 3),  # right
            FeedbackLabel("a", 1, 7),  # wrong
            FeedbackLabel("a", 1, 1),  # a second label for the same image
            FeedbackLabel("a", 3, 1),  # past the call's images
            FeedbackLabel("b", 0, 1),  # never seen
        ]
    )
    assert (outcome.accepted, outcome.unknown, outcome.duplicate) == (2, 2, 1)
    assert outcome.unknown_indices == [3, 4]
    assert [(x.index, x.label, x.predicted, x.model_version) for x in outcome.labelled] == [
        (0, 3, 3, 2),
        (1, 7, 1, 2),
    ]
    # Three more images push the window past 5: the oldest call is forgotten.
    recent.observe(Call("native", "Predict", request_id="c"), np.zeros((3, 28, 28)), prediction, 2)
    assert recent.images == 3
    assert recent.join([FeedbackLabel("a", 2, 4)]).unknown == 1
    assert recent.join([FeedbackLabel("c", 2, 4)]).accepted == 1


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "no labels"),
        ([FeedbackLabel("", 0, 1)], "request_id is empty"),
        ([FeedbackLabel("x" * 129, 0, 1)], "longer than 128"),
        ([FeedbackLabel("a", -1, 1)], "negative"),
        ([FeedbackLabel("a", 0, 10)], "not a class"),
        ([FeedbackLabel("a", 0, -1)], "not a class"),
        ([FeedbackLabel("a", 0, 1)] * (MAX_LABELS + 1), "at most 10000"),
    ],
)
def test_malformed_labels_are_refused(labels: list[FeedbackLabel], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_labels(labels)


def test_a_malformed_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="class_distribution"):
        check_reference({"class_distribution": [1.0]})


# ---------------------------------------------------------------------------------------------
# The trainer's reference


def test_the_trained_version_carries_its_reference(
    trained_model_dir: Path, mnist_path: Path
) -> None:
    report = json.loads((trained_model_dir / "1" / REPORT).read_text())
    reference = check_reference(report["reference"])
    data = np.load(mnist_path)
    expected = np.bincount(data["y_train"], minlength=10) / len(data["y_train"])
    np.testing.assert_allclose(reference["class_distribution"], expected)
    assert sum(reference["predicted_distribution"]) == pytest.approx(1.0)
    confidence = reference["confidence"]
    assert confidence["edges"] == list(CONFIDENCE_EDGES)
    edges, fractions = confidence["edges"][1:], confidence["fractions"]
    below = sum(f for e, f in zip(edges, fractions, strict=True) if e <= 0.5)
    assert reference["low_confidence_rate"] == pytest.approx(below, abs=1e-3)
    for key in ("mean_intensity", "ink_fraction"):
        assert reference[key]["edges"] == list(INPUT_EDGES)
        assert sum(reference[key]["fractions"]) == pytest.approx(1.0)
    assert reference["mean_intensity"]["mean"] == pytest.approx(
        data["x_train"].mean() / 255, rel=1e-4
    )


# ---------------------------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def quality_server(trained_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        trained_model_dir,
        "--poll-interval", "0",
        "--drift-window", str(WINDOW),
        "--drift-min-images", str(WINDOW),
        "--drift-interval", "0.1",
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log


def predict(target: str, images: np.ndarray, version: int = 0) -> list[tuple[str, int]]:
    """Send `images` in calls of CALL_IMAGES; the (request ID, size) of each call."""
    calls = []
    with grpc.insecure_channel(target) as channel:
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        for start in range(0, len(images), CALL_IMAGES):
            chunk = np.ascontiguousarray(images[start : start + CALL_IMAGES])
            _, call = stub.Predict.with_call(
                pb.PredictRequest(
                    model_spec=pb.ModelSpec(version=version),
                    images=pb.Tensor(
                        dtype=pb.DATA_TYPE_UINT8, shape=chunk.shape, content=chunk.tobytes()
                    ),
                )
            )
            request_id = dict(call.trailing_metadata())["x-request-id"]
            calls.append((request_id, len(chunk)))
    return calls


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(
    server: ServerProcess, name: str, at_least: float, version: str = "1"
) -> dict[str, float]:
    """Scrape until `name`{version} reaches `at_least`; then the drift gauges of `version`."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = server.scrape()
        if value(samples, name, version=version) >= at_least:
            return {s: value(samples, s, version=version) for s in SIGNALS if
                    (s, (("version", version),)) in samples}  # fmt: skip
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        time.sleep(0.05)


def signals_of(server: ServerProcess, images: np.ndarray) -> dict[str, float]:
    """The drift gauges once the window holds exactly `images` (WINDOW of them)."""
    assert len(images) == WINDOW
    counted = "mnist_prediction_confidence_count"
    before = value(server.scrape(), counted, version="1")
    predict(server.target, images)
    # The refresh that counts the last image also sets the gauges from the same window.
    return wait_for(server, counted, before + WINDOW)


def test_normal_test_set_traffic_stays_under_every_threshold(
    quality_server: ServerProcess, mnist_path: Path
) -> None:
    limits = thresholds()
    x_test = np.load(mnist_path)["x_test"]
    worst = dict.fromkeys(SIGNALS, 0.0)
    for start in range(0, len(x_test), WINDOW):
        signals = signals_of(quality_server, x_test[start : start + WINDOW])
        assert set(signals) == set(SIGNALS)
        for name, measured in signals.items():
            worst[name] = max(worst[name], measured)
    print("worst over the test set's windows:", worst)
    for name, measured in worst.items():
        assert measured < limits[name] / 2, f"{name}: {measured} is not well below {limits[name]}"


@pytest.mark.parametrize(
    ("drift", "crossed"),
    [
        (
            "inverted",
            {
                "mnist_class_mix_divergence",
                "mnist_confidence_divergence",
                "mnist_input_mean_intensity_divergence",
                "mnist_input_ink_fraction_divergence",
            },
        ),
        ("only sevens", {"mnist_class_mix_divergence"}),
        ("noise", set(SIGNALS)),
    ],
)
def test_drifted_traffic_crosses_the_thresholds(
    quality_server: ServerProcess, mnist_path: Path, drift: str, crossed: set[str]
) -> None:
    data = np.load(mnist_path)
    x_test, y_test = data["x_test"], data["y_test"]
    if drift == "inverted":
        images = 255 - x_test[:WINDOW]
    elif drift == "only sevens":
        images = x_test[y_test == 7][:WINDOW]
    else:
        images = np.random.default_rng(0).integers(0, 256, (WINDOW, 28, 28), dtype=np.uint8)
    limits = thresholds()
    signals = signals_of(quality_server, images)
    above = {name for name, measured in signals.items() if measured > limits[name]}
    assert above == crossed, signals


def feedback_rpc(target: str, labels: list[tuple[str, int, int]]) -> pb.FeedbackResponse:
    with grpc.insecure_channel(target) as channel:
        answer: pb.FeedbackResponse = predict_pb2_grpc.MnistServiceStub(channel).Feedback(
            pb.FeedbackRequest(
                labels=[pb.FeedbackLabel(request_id=r, index=i, label=y) for r, i, y in labels]
            )
        )
        return answer


def post_feedback(server: ServerProcess, body: object) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.http_url + "/v1/feedback",
        data=data,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_feedback_for_the_test_set_gives_the_offline_accuracy(
    quality_server: ServerProcess, trained_model_dir: Path, mnist_path: Path
) -> None:
    data = np.load(mnist_path)
    y_test = data["y_test"]
    offline = json.loads((trained_model_dir / "1" / REPORT).read_text())["test_accuracy"]
    before = quality_server.scrape()
    calls = predict(quality_server.target, data["x_test"])
    labels = []
    for call, (request_id, size) in enumerate(calls):
        for index in range(size):
            labels.append((request_id, index, int(y_test[call * CALL_IMAGES + index])))
    answer = feedback_rpc(quality_server.target, labels)
    assert (answer.accepted, answer.unknown, answer.duplicate) == (len(y_test), 0, 0)
    after = quality_server.scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    total = delta("mnist_feedback_total", version="1")
    correct = delta("mnist_feedback_correct_total", version="1")
    assert total == len(y_test)
    assert correct == round(offline * len(y_test))  # the twin answers as the SavedModel
    assert delta("mnist_feedback_labels_total", result="accepted") == len(y_test)

    # The same labels again, over HTTP: every one a duplicate, nothing counted twice.
    status, body = post_feedback(
        quality_server,
        {"labels": [{"request_id": r, "index": i, "label": y} for r, i, y in labels[:50]]},
    )
    assert status == 200, body
    assert body == {"accepted": 0, "unknown": 0, "duplicate": 50, "unknown_indices": []}
    assert value(quality_server.scrape(), "mnist_feedback_total", version="1") == value(
        after, "mnist_feedback_total", version="1"
    )


def test_unknown_ids_are_answered_and_counted(quality_server: ServerProcess) -> None:
    ((request_id, size),) = predict(quality_server.target, np.zeros((1, 28, 28), np.uint8))
    before = value(quality_server.scrape(), "mnist_feedback_labels_total", result="unknown")
    answer = feedback_rpc(
        quality_server.target,
        [("never-issued", 0, 3), (request_id, 0, 0), (request_id, size, 1)],
    )
    assert (answer.accepted, answer.unknown, answer.duplicate) == (1, 2, 0)
    assert list(answer.unknown_indices) == [0, 2]
    status, body = post_feedback(
        quality_server, {"labels": [{"request_id": "also-unknown", "index": 0, "label": 1}]}
    )
    assert (status, body["unknown"], body["unknown_indices"]) == (200, 1, [0])
    after = value(quality_server.scrape(), "mnist_feedback_labels_total", result="unknown")
    assert after - before == 3


@pytest.mark.parametrize(
    "labels",
    [
        [("", 0, 1)],
        [("some-id", 0, 10)],
        [("some-id", -1, 1)],
        [("some-id", 0, 1)] * (MAX_LABELS + 1),
    ],
)
def test_bad_feedback_is_invalid_argument_over_grpc(
    quality_server: ServerProcess, labels: list[tuple[str, int, int]]
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        feedback_rpc(quality_server.target, labels)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        [],
        {"labels": "7"},
        {"labels": [{"request_id": "a", "index": 0, "label": "7"}]},
        {"labels": [{"request_id": "a", "index": 0, "label": True}]},
        {"labels": [{"request_id": "a", "index": 0.5, "label": 7}]},
        {"labels": [{"request_id": "a", "index": 0, "label": 12}]},
        {"labels": [{"request_id": "", "label": 1}]},
        {"labels": [{"request_id": 5, "label": 1}]},
        {"labels": [{"request_id": "a", "label": 1, "extra": 1}]},
        {"labels": [], "more": 1},
        {"labels": [{"request_id": "a", "label": 1}] * (MAX_LABELS + 1)},
    ],
)
def test_bad_feedback_is_400_over_http(quality_server: ServerProcess, body: object) -> None:
    status, answer = post_feedback(quality_server, body)
    assert status == 400, answer
    assert answer["error"]
    # ...and the server goes on answering.
    assert len(predict(quality_server.target, np.zeros((1, 28, 28), np.uint8))) == 1


def test_a_version_without_reference_serves_without_drift_gauges(
    trained_model_dir: Path, mnist_path: Path, tmp_path: Path
) -> None:
    """Version 1 exported before the reference existed, version 2 with one, both served:
    version 1 answers and takes feedback, and only version 2 gets drift gauges."""
    model_dir = tmp_path / "mnist"
    for version in ("1", "2"):
        shutil.copytree(trained_model_dir / "1", model_dir / version)
    old = model_dir / "1" / REPORT
    report = json.loads(old.read_text())
    del report["reference"]
    old.write_text(json.dumps(report))
    x_test = np.load(mnist_path)["x_test"][:WINDOW]
    with ServerProcess(
        model_dir,
        "--poll-interval", "0",
        "--version-policy", "all",
        "--drift-window", str(WINDOW),
        "--drift-min-images", str(WINDOW),
        "--drift-interval", "0.1",
    ) as server:  # fmt: skip
        calls = predict(server.target, x_test, version=1)
        predict(server.target, x_test, version=2)
        # Version 2's window fills after version 1's calls were observed.
        signals = wait_for(server, "mnist_drift_window_images", WINDOW, version="2")
        assert set(signals) == set(SIGNALS)
        samples = server.scrape()
        assert not [key for key in samples if dict(key[1]).get("version") == "1"
                    and key[0] in (*SIGNALS, "mnist_drift_window_images")]  # fmt: skip
        answer = feedback_rpc(server.target, [(calls[0][0], 0, 7)])
        assert answer.accepted == 1
        assert value(server.scrape(), "mnist_feedback_total", version="1") == 1


def test_workers_show_drift_and_join_feedback_sent_on_the_same_channel(
    trained_model_dir: Path, mnist_path: Path
) -> None:
    """--workers 2: the worker that answered a channel's calls fills its window (the page
    shows its gauges) and joins the labels sent on that channel; the page sums the counts."""
    data = np.load(mnist_path)
    images, labels = data["x_test"][:WINDOW], data["y_test"][:WINDOW]
    with ServerProcess(
        trained_model_dir,
        "--poll-interval", "0",
        "--workers", "2",
        "--drift-window", str(WINDOW),
        "--drift-min-images", str(WINDOW),
        "--drift-interval", "0.1",
    ) as server, grpc.insecure_channel(server.target) as channel:  # fmt: skip
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        feedback = []
        for start in range(0, WINDOW, CALL_IMAGES):
            chunk = np.ascontiguousarray(images[start : start + CALL_IMAGES])
            _, call = stub.Predict.with_call(
                pb.PredictRequest(
                    images=pb.Tensor(
                        dtype=pb.DATA_TYPE_UINT8, shape=chunk.shape, content=chunk.tobytes()
                    )
                )
            )
            request_id = dict(call.trailing_metadata())["x-request-id"]
            feedback += [
                pb.FeedbackLabel(request_id=request_id, index=i, label=int(labels[start + i]))
                for i in range(len(chunk))
            ]
        signals = wait_for(server, "mnist_drift_window_images", WINDOW)
        assert set(signals) == set(SIGNALS)
        limits = thresholds()
        assert all(signals[name] < limits[name] for name in SIGNALS), signals
        answer = stub.Feedback(pb.FeedbackRequest(labels=feedback))
        assert (answer.accepted, answer.unknown) == (WINDOW, 0)
        samples = server.scrape()
        assert value(samples, "mnist_feedback_total", version="1") == WINDOW
        correct = value(samples, "mnist_feedback_correct_total", version="1")
        assert correct >= 0.95 * WINDOW


class StandInRegistry:
    """What Quality reads of a ModelRegistry: the served versions and their reports."""

    def __init__(self, served: list[Any]) -> None:
        self.served = served

    def report_of(self, version: int) -> dict[str, Any]:
        return next((s.model.report for s in self.served if s.version == version), {})


def test_drift_sample_rate_leaves_unsampled_calls_out() -> None:
    """--drift-sample-rate: a call not drawn never reaches a window; at 1.0 every one does."""
    from types import SimpleNamespace

    from mnist_serving.server.quality import Quality
    from mnist_serving.server.settings import Settings

    rng = np.random.default_rng(2)
    reference = build_reference(
        rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 100),
        rng.dirichlet(np.ones(10), 100),
    )
    version = 987655
    served = SimpleNamespace(
        version=version, model=SimpleNamespace(report={"reference": reference})
    )
    registry: Any = StandInRegistry([served])
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    prediction = _prediction(rng, 3)
    call = Call("native", "Predict", request_id="r")
    for rate, held in ((1e-12, 0), (1.0, 60)):
        quality = Quality(Settings.model_validate({"drift_sample_rate": rate}), registry)
        for _ in range(20):
            quality.observe(call, images, prediction, version)
        window = quality._windows.get(version)
        assert (0 if window is None else window.images) == held


def test_an_unloaded_version_leaves_the_page() -> None:
    """Gauges appear at --drift-min-images; once the version is no longer served, the next
    refresh takes them off (and a version without reference never gets any)."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from mnist_serving.server.quality import Quality
    from mnist_serving.server.settings import Settings

    rng = np.random.default_rng(3)
    reference = build_reference(
        rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 100),
        rng.dirichlet(np.ones(10), 100),
    )
    with_reference, without = 987656, 987657
    registry: Any = StandInRegistry(
        [
            SimpleNamespace(
                version=with_reference, model=SimpleNamespace(report={"reference": reference})
            ),
            SimpleNamespace(version=without, model=SimpleNamespace(report={})),
        ]
    )
    quality = Quality(
        Settings.model_validate({"drift_window": 100, "drift_min_images": 100}), registry
    )
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    prediction = _prediction(rng, 50)
    call = Call("native", "Predict", request_id="r")

    def gauge(version: int) -> float | None:
        found: float | None = REGISTRY.get_sample_value(
            "mnist_class_mix_divergence", {"version": str(version)}
        )
        return found

    for version in (with_reference, without):
        quality.observe(call, images, prediction, version)
    quality.refresh()
    assert gauge(with_reference) is None  # 50 images: fewer than --drift-min-images
    for version in (with_reference, without):
        quality.observe(call, images, prediction, version)
    quality.refresh()
    assert gauge(with_reference) is not None
    assert gauge(without) is None
    registry.served = registry.served[1:]
    quality.refresh()
    assert gauge(with_reference) is None


def test_input_statistics_of_a_large_flush_come_from_an_even_sample() -> None:
    """A flush of more than `input_sample` images derives the input statistics of about
    that many, evenly spaced (NaN for the rest); the confidence still counts every image."""
    rng = np.random.default_rng(2)
    reference = build_reference(
        rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 100),
        rng.dirichlet(np.ones(10), 100),
    )
    version = 987658  # a series of its own
    window = VersionWindow(version, reference, 4000, 10, input_sample=100)
    images = rng.integers(0, 256, (3000, 28, 28), dtype=np.uint8)
    prediction = _prediction(rng, 3000)
    window.add(as_pixels(images), prediction.probabilities, prediction.classes)
    window.refresh()
    derived = ~np.isnan(window.intensity[:3000])
    assert np.count_nonzero(derived) == 100
    np.testing.assert_array_equal(np.flatnonzero(derived), np.arange(0, 3000, 30))
    np.testing.assert_allclose(
        window.intensity[:3000][derived], input_statistics(images[::30])[0], rtol=1e-6
    )
    intensity = metrics.INPUT_MEAN_INTENSITY.labels(str(version))
    assert sum(bucket.get() for bucket in intensity._buckets) == 100
    confidence = metrics.PREDICTION_CONFIDENCE.labels(str(version))
    assert sum(bucket.get() for bucket in confidence._buckets) == 3000
    signals = window.signals()
    assert all(np.isfinite(value) for value in signals.values())
