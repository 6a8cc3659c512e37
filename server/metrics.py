"""Every Prometheus object of the server, in one place.

Names follow <namespace>_<what>_<unit>; labels stay low-cardinality (API, method, status
code, version, class digit, and the caller: a name from the --auth-keys file, or anonymous).
Served at /metrics on the HTTP port (and, when asked, on a
port of their own) through exposition().

HTTP calls are counted like RPCs: `method` is the equivalent RPC's name (Predict,
ModelInfer...) and `code` the gRPC status name their HTTP status stands for (OK,
INVALID_ARGUMENT...), so that one error-ratio query covers every API.

With several workers (server/workers.py) every process writes its values to files in
PROMETHEUS_MULTIPROC_DIR, which the supervisor makes fresh before it starts any worker, and
one page shows the whole server: counters and histograms are summed over the workers (a
dead worker's counts stay in the sums, so they never go backwards), and each gauge says
how it combines the live workers' values in its `multiprocess_mode`: "livesum" (a total
over the server) or "livemax" (true of at least one worker). A worker's gauges leave the
page when it dies, and its counter and histogram files are folded into one archive file
per kind (`counter_archive.db`, `histogram_archive.db`) and removed, so that a worker that
keeps dying does not leave a file per life behind (each is 64 KiB or more, and every
scrape reads them all). Pages read the folder under a shared lock on `.lock` in it, the
fold holds it exclusively: no page sees a dead worker's counts twice, or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from mnist_serving.contract import NUM_CLASSES
from mnist_serving.contract.reference import (
    CONFIDENCE_EDGES,
    INK_FRACTION_EDGES,
    MEAN_INTENSITY_EDGES,
)

NAMESPACE = "mnist"
# The *_created series double what an operator scrapes and graph nothing useful here.
disable_created_metrics()
# Sub-millisecond (a warm single-image call) to seconds (a 4096-image batch under load).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

REQUESTS = Counter(
    "requests",
    "Calls handled (RPCs and HTTP), by API, method, gRPC status code, priority class and "
    "caller (the API key's name, or anonymous).",
    ["api", "method", "code", "priority", "caller"], namespace=NAMESPACE,
)  # fmt: skip
REQUEST_SECONDS = Histogram(
    "request_duration_seconds", "Time from receiving an RPC to answering it.",
    ["api", "method", "priority", "caller"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)  # fmt: skip
AUTH_FAILURES = Counter(
    "auth_failures",
    "Calls refused by --auth-keys, by reason: missing (no token), unknown (not a key's), "
    "forbidden (the key's role lacks the method), rate_limited (over the key's limit).",
    ["reason"], namespace=NAMESPACE,
)  # fmt: skip
RATE_LIMITED = Counter(
    "rate_limited",
    "Calls refused because their key was over its own limit (requests or images per "
    "second); apart from the queue's shedding (mnist_requests_shed_total).",
    ["caller", "limit"], namespace=NAMESPACE,
)  # fmt: skip
UNDECODABLE = Counter(
    "undecodable_requests", "Requests whose bytes were not a message of the method's type.",
    ["api", "method"], namespace=NAMESPACE,
)  # fmt: skip
IN_FLIGHT = Gauge(
    "requests_in_flight", "RPCs being handled right now.",
    namespace=NAMESPACE, multiprocess_mode="livesum",
)  # fmt: skip
QUEUE_WAIT = Histogram(
    "batch_queue_wait_seconds",
    "Time a request waited in the batch queue of its priority class (until its first images "
    "reached the model).",
    ["priority"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)  # fmt: skip
QUEUE_DEPTH = Gauge(
    "batch_queue_depth", "Images waiting in the batch queues.",
    namespace=NAMESPACE, multiprocess_mode="livesum",
)  # fmt: skip
REQUESTS_SHED = Counter(
    "requests_shed", "Requests refused because the queue of their priority class was full.",
    ["priority"], namespace=NAMESPACE,
)  # fmt: skip
DEADLINE_DROPS = Counter(
    "deadline_drops", "Requests dropped before the model because their deadline passed.",
    namespace=NAMESPACE,
)  # fmt: skip
INFERENCE_SECONDS = Histogram(
    "model_inference_seconds", "Time spent in one model call.",
    namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)  # fmt: skip
BATCH_SIZE = Histogram(
    "batch_size_images", "Images per model call (the effective batch size).",
    namespace=NAMESPACE, buckets=BATCH_BUCKETS,
)  # fmt: skip
IMAGES_PREDICTED = Counter(
    "images_predicted", "Images the model classified; rate() is the throughput.",
    namespace=NAMESPACE,
)  # fmt: skip
PREDICTED_CLASS = Counter(
    "predicted_class", "Predictions per class, to watch for drift.", ["class"],
    namespace=NAMESPACE,
)  # fmt: skip


class SeriesGauge(Gauge):  # type: ignore[misc]
    """A gauge whose series come and go (one per loaded version), in every process.

    In multiprocess mode prometheus_client's remove() only forgets the series in the
    calling process (with a warning): its value stays in the process's file, so the page
    would show an unloaded version for ever. Here it is set to 0 first, and exposition()
    leaves zeros of these gauges off the page; their real values are never 0.
    """

    def remove(self, *labelvalues: Any) -> None:
        if not multiprocess_dir():
            super().remove(*labelvalues)
            return
        self.labels(*labelvalues).set(0)
        with self._lock:
            self._metrics.pop(tuple(str(value) for value in labelvalues), None)


MODEL_VERSION = SeriesGauge(
    "model_version_info",
    "1 for each loaded model version, with the runtime that serves it (in at least one worker).",
    ["name", "version", "runtime"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
MODEL_LOAD_SECONDS = SeriesGauge(
    "model_load_seconds", "Time it took to load and warm up a version (the slowest worker's).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
MODEL_LOAD_FAILURES = Counter(
    "model_load_failures", "Model versions that failed to load.", namespace=NAMESPACE
)

WORKER_RESTARTS = Counter(
    "worker_restarts", "Worker processes started again after one died.", namespace=NAMESPACE
)
ACCESS_LOG_DROPPED = Counter(
    "access_log_dropped",
    "Access log lines dropped because the writer's queue was full (the calls went on).",
    namespace=NAMESPACE,
)
PREDICTION_LOG_RECORDS = Counter(
    "prediction_log_records",
    "Prediction log rows written to a sink (one per image, and one per feedback label); for "
    "the url sink, rows whose CloudEvent the receiver accepted.",
    ["sink"], namespace=NAMESPACE,
)  # fmt: skip
PREDICTION_LOG_DROPPED = Counter(
    "prediction_log_dropped",
    "Prediction log rows dropped because the sink's queue was full, or not delivered by "
    "the end of a shutdown (the calls went on).",
    ["sink"], namespace=NAMESPACE,
)  # fmt: skip
PREDICTION_LOG_ERRORS = Counter(
    "prediction_log_errors",
    "Failed prediction log writes (dir) or POSTs (url); the url sink retries with backoff.",
    ["sink"], namespace=NAMESPACE,
)  # fmt: skip

HTTP_CONNECTIONS = Gauge(
    "http_connections", "Connections open on the HTTP port.",
    namespace=NAMESPACE, multiprocess_mode="livesum",
)  # fmt: skip
HTTP_CONNECTIONS_CLOSED = Counter(
    "http_connections_closed",
    "HTTP connections the server closed to protect itself: beyond --max-connections "
    "(limit), or headers slower than --http-header-timeout (header_timeout).",
    ["reason"], namespace=NAMESPACE,
)  # fmt: skip


# Model quality (server/quality.py, server/feedback.py; docs/operations/model-quality.md).
# The histograms count every observed image since start-up (rate() over them is a window);
# the gauges compare each worker's sliding window of recent images with the version's
# training reference. Buckets are the reference's edges (contract/reference.py).
PREDICTION_CONFIDENCE = Histogram(
    "prediction_confidence", "Top probability of each prediction, by model version.",
    ["version"], namespace=NAMESPACE, buckets=CONFIDENCE_EDGES[1:-1],
)  # fmt: skip
INPUT_MEAN_INTENSITY = Histogram(
    "input_mean_intensity", "Mean pixel of input images in [0, 1] (an even sample of at most "
    "1,024 per drift flush), by model version.",
    ["version"], namespace=NAMESPACE, buckets=MEAN_INTENSITY_EDGES[1:-1],
)  # fmt: skip
INPUT_INK_FRACTION = Histogram(
    "input_ink_fraction", "Share of input images' pixels above 0.5 (an even sample of at most "
    "1,024 per drift flush), by model version.",
    ["version"], namespace=NAMESPACE, buckets=INK_FRACTION_EDGES[1:-1],
)  # fmt: skip


class DriftGauge(SeriesGauge):
    """A drift gauge: per version, present only once a window holds enough images.

    Its real values are >= 0 (and 0 is a real value: no low-confidence answer at all), so
    in multiprocess mode a removed or not-yet-known series is set to ABSENT (-1) instead of
    SeriesGauge's 0: "livemax" picks any worker's real value over it, and exposition()
    leaves a series that no live worker knows off the page.
    """

    ABSENT = -1.0

    def remove(self, *labelvalues: Any) -> None:
        if not multiprocess_dir():
            super().remove(*labelvalues)
            return
        self.labels(*labelvalues).set(self.ABSENT)
        with self._lock:
            self._metrics.pop(tuple(str(value) for value in labelvalues), None)


CLASS_MIX_DIVERGENCE = DriftGauge(
    "class_mix_divergence",
    "Jensen-Shannon divergence (bits, 0..1) of the predicted class mix in the recent window "
    "from the version's predicted mix on the test set (the largest over the workers).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
CONFIDENCE_DIVERGENCE = DriftGauge(
    "confidence_divergence",
    "Jensen-Shannon divergence (bits, 0..1) of the recent window's top-probability histogram "
    "from the test set's (the largest over the workers).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
LOW_CONFIDENCE_RATE = DriftGauge(
    "low_confidence_rate",
    "Share of the recent window's predictions whose top probability is below the "
    "reference's threshold (0.5) (the largest over the workers).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
INPUT_MEAN_INTENSITY_DIVERGENCE = DriftGauge(
    "input_mean_intensity_divergence",
    "Jensen-Shannon divergence (bits, 0..1) of the recent window's mean-intensity histogram "
    "from the training images' (the largest over the workers).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
INPUT_INK_FRACTION_DIVERGENCE = DriftGauge(
    "input_ink_fraction_divergence",
    "Jensen-Shannon divergence (bits, 0..1) of the recent window's ink-fraction histogram "
    "from the training images' (the largest over the workers).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livemax",
)  # fmt: skip
DRIFT_WINDOW_IMAGES = SeriesGauge(
    "drift_window_images",
    "Images in the recent windows the drift gauges are computed over (summed over workers).",
    ["version"], namespace=NAMESPACE, multiprocess_mode="livesum",
)  # fmt: skip
DRIFT_GAUGES = (
    CLASS_MIX_DIVERGENCE,
    CONFIDENCE_DIVERGENCE,
    LOW_CONFIDENCE_RATE,
    INPUT_MEAN_INTENSITY_DIVERGENCE,
    INPUT_INK_FRACTION_DIVERGENCE,
)
FEEDBACK_LABELS = Counter(
    "feedback_labels",
    "Feedback labels received, by result: accepted (joined to a remembered prediction), "
    "unknown (an unknown or forgotten request ID or index), duplicate (already labelled).",
    ["result"], namespace=NAMESPACE,
)  # fmt: skip
for _result in ("accepted", "unknown", "duplicate"):
    FEEDBACK_LABELS.labels(_result)  # every result on the page from the start, at 0
FEEDBACK = Counter(
    "feedback", "Accepted feedback labels, by the model version that made the prediction.",
    ["version"], namespace=NAMESPACE,
)  # fmt: skip
FEEDBACK_CORRECT = Counter(
    "feedback_correct",
    "Accepted feedback labels that the prediction got right; live accuracy is "
    "rate(mnist_feedback_correct_total) / rate(mnist_feedback_total).",
    ["version"], namespace=NAMESPACE,
)  # fmt: skip


def add_to_histogram(child: Any, bucket_counts: np.ndarray, total: float) -> None:
    """Add many observations to one histogram series at once: per-bucket counts (one per
    bucket, +Inf last) and the sum of the values. prometheus_client observes one value at a
    time; the drift signals count thousands per second, so they add counts in bulk to the
    same values (single process or multiprocess files) observe() would."""
    buckets = child._buckets
    if len(bucket_counts) != len(buckets):
        raise ValueError(f"{len(bucket_counts)} bucket counts for {len(buckets)} buckets")
    for value, count in zip(buckets, bucket_counts.tolist(), strict=True):
        if count:
            value.inc(count)
    child._sum.inc(total)


_CLASS_LABELS = [str(digit) for digit in range(NUM_CLASSES)]
_CLASS_CHILDREN = [PREDICTED_CLASS.labels(label) for label in _CLASS_LABELS]


def count_classes(classes: np.ndarray) -> None:
    if len(classes) == 1:  # the common single-image call: no bincount
        _CLASS_CHILDREN[int(classes[0])].inc()
        return
    for child, count in zip(
        _CLASS_CHILDREN, np.bincount(classes, minlength=NUM_CLASSES), strict=False
    ):
        if count:
            child.inc(int(count))


def multiprocess_dir() -> str | None:
    """Where the processes of a multi-worker server write their values; None in a lone one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _WholeServer:
    """Every process's values from the multiprocess files, minus removed series."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._files = MultiProcessCollector(None, path)
        self._series_gauges = {
            gauge._name for gauge in (MODEL_VERSION, MODEL_LOAD_SECONDS, DRIFT_WINDOW_IMAGES)
        }
        self._drift_gauges = {gauge._name for gauge in DRIFT_GAUGES}

    def collect(self) -> Iterator[Any]:
        with folder_lock(self._path, fcntl.LOCK_SH):
            families = list(self._files.collect())
        for family in families:
            if family.name in self._series_gauges:
                family.samples = [s for s in family.samples if s.value != 0]
                if not family.samples:
                    continue
            elif family.name in self._drift_gauges:
                family.samples = [s for s in family.samples if s.value >= 0]
                if not family.samples:
                    continue
            yield family


def exposition() -> tuple[bytes, str]:
    """The /metrics page and its content type: this process's metrics, or the whole
    server's when it runs several workers."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WholeServer(path))
    return generate_latest(registry), CONTENT_TYPE_LATEST


# Per process, the kinds whose values outlive it (summed into the page), by file prefix.
_KEPT_KINDS = ("counter", "histogram")
ARCHIVE = "archive"  # <kind>_archive.db: the dead processes' values, summed key by key
_LOCK_FILE = ".lock"


@contextlib.contextmanager
def folder_lock(path: str, kind: int) -> Iterator[None]:
    """flock() on the multiprocess folder's lock file: LOCK_SH to read, LOCK_EX to fold."""
    with open(os.path.join(path, _LOCK_FILE), "a") as lock:
        fcntl.flock(lock, kind)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def process_gone(pid: int) -> None:
    """Take a dead worker's gauges off the page, and fold its counts into the archive."""
    path = multiprocess_dir()
    if not path:
        return
    with folder_lock(path, fcntl.LOCK_EX):
        mark_process_dead(pid, path)
        for kind in _KEPT_KINDS:
            dead = os.path.join(path, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            # Within a kind every key is summed over the files (histogram files hold
            # per-bucket counts, not cumulative ones), so adding key by key keeps the page.
            archive = MmapedDict(os.path.join(path, f"{kind}_{ARCHIVE}.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):
                    kept, _ = archive.read_value(key)
                    archive.write_value(key, kept + value, timestamp)
            finally:
                archive.close()
            os.remove(dead)
