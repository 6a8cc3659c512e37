"""Every Prometheus object of the server, in one place.

Names follow <namespace>_<what>_<unit>; labels stay low-cardinality (API, method, status
code, version, class digit). Served on their own port by app.py.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

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
    "requests", "RPCs handled, by API, method and gRPC status code.",
    ["api", "method", "code"], namespace=NAMESPACE,
)  # fmt: skip
REQUEST_SECONDS = Histogram(
    "request_duration_seconds", "Time from receiving an RPC to answering it.",
    ["api", "method"], namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)  # fmt: skip
UNDECODABLE = Counter(
    "undecodable_requests", "Requests whose bytes were not a message of the method's type.",
    ["api", "method"], namespace=NAMESPACE,
)  # fmt: skip
IN_FLIGHT = Gauge("requests_in_flight", "RPCs being handled right now.", namespace=NAMESPACE)
QUEUE_WAIT = Histogram(
    "batch_queue_wait_seconds", "Time a request waited in the batch queue.",
    namespace=NAMESPACE, buckets=LATENCY_BUCKETS,
)  # fmt: skip
QUEUE_DEPTH = Gauge("batch_queue_depth", "Images waiting in the batch queue.", namespace=NAMESPACE)
REQUESTS_SHED = Counter(
    "requests_shed", "Requests refused because the batch queue was full.", namespace=NAMESPACE
)
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
MODEL_VERSION = Gauge(
    "model_version_info", "1 for each loaded model version, with the runtime that serves it.",
    ["name", "version", "runtime"], namespace=NAMESPACE,
)  # fmt: skip
MODEL_LOAD_SECONDS = Gauge(
    "model_load_seconds", "Time it took to load and warm up a version.", ["version"],
    namespace=NAMESPACE,
)  # fmt: skip
MODEL_LOAD_FAILURES = Counter(
    "model_load_failures", "Model versions that failed to load.", namespace=NAMESPACE
)

_CLASS_LABELS = [str(digit) for digit in range(10)]
_CLASS_CHILDREN = [PREDICTED_CLASS.labels(label) for label in _CLASS_LABELS]


def count_classes(classes: np.ndarray) -> None:
    if len(classes) == 1:  # the common single-image call: no bincount
        _CLASS_CHILDREN[int(classes[0])].inc()
        return
    for child, count in zip(_CLASS_CHILDREN, np.bincount(classes, minlength=10), strict=False):
        if count:
            child.inc(int(count))
