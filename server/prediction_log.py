"""The prediction log (opt-in, --prediction-log DIR and/or --prediction-log-url URL): what
was asked and answered, one row per image, for drift reports and audits.

An observer (server/observers.py): `InferenceCore` hands it every inference call on the
event loop. `observe` decides whether the call is sampled (a sampled call logs all its
images), keeps references to what it needs (the request's images are a read-only view of
the request's bytes, the probabilities a slice of the model call's own output: neither is
written again) and puts one record on each sink's bounded queue without waiting. When a
sink's queue is full the record is dropped and its rows counted in
mnist_prediction_log_dropped_total{sink}; a call never waits for the log and never fails
because of it.

Each sink has a thread of its own, so a slow receiver never holds the files back:
- `dir`: rotating Parquet files, per the drift contract (docs/operations/prediction-log.md):
  predictions-<UTC time>-<pid>-<seq>.parquet and feedback-...parquet, written as
  `.parquet.tmp` and renamed when complete (by rows, by age, and at shutdown), plus
  reference-v<version>.json, the training reference of each version that answered.
- `url`: CloudEvents, as KServe's payload logger sends them (binary mode: ce-* headers,
  the body a v2 inference response; with --log-inputs also the request event), or several
  per POST in CloudEvents' batched JSON mode. A failing receiver is retried with
  exponential backoff and logged once per interval; what waits meanwhile stays bounded by
  the queue.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import metrics
from .call_context import Call
from .errors import StartupError
from .observers import Labelled
from .runtimes.base import Prediction
from .settings import Settings

logger = logging.getLogger(__name__)

PIXELS = 784
# How long close() waits for a sink to write or send what is queued.
CLOSE_TIMEOUT = 10.0
# A writer takes what is queued at least this often (sooner once a row group's worth waits).
IDLE_WAIT = 1.0
# The URL sink's writer wakes once this many rows wait (or after IDLE_WAIT).
URL_WAKE_ROWS = 1024
# Rows per Parquet row group (and per Arrow table built at once).
ROW_GROUP_ROWS = 16384
# A failing URL sink: the first retry after this long, doubling up to the most.
RETRY_FIRST = 0.05
RETRY_MOST = 5.0
# A failing sink says so in the log at most once per this many seconds.
LOG_INTERVAL = 30.0
# How long one POST to the URL sink may take.
POST_TIMEOUT = 10.0
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
REQUEST_TYPE = "org.kubeflow.serving.inference.request"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# Answers after which the same POST is tried again (with 5xx); other errors drop the events.
RETRIED = (408, 425, 429)

# Where a version's training reference is looked up (the version's metrics.json key).
ReferenceOf = Callable[[int], Mapping[str, Any] | None]


class CallRecord(NamedTuple):
    """One sampled call: what the writers turn into rows (one per image)."""

    time: float  # time.time() when the answer was ready
    request_id: str
    caller: str
    api: str
    priority: str
    model_version: int
    probabilities: np.ndarray  # float32 [N, 10]
    classes: np.ndarray  # [N]
    images: np.ndarray | None  # [N, 28, 28] uint8 or float32 in [0, 1], with --log-inputs


class FeedbackRecord(NamedTuple):
    time: float
    labels: Sequence[Labelled]


class ReferenceRecord(NamedTuple):
    version: int
    reference: Mapping[str, Any]


Record = CallRecord | FeedbackRecord | ReferenceRecord


def rows_of(record: Record) -> int:
    if isinstance(record, CallRecord):
        return len(record.classes)
    if isinstance(record, FeedbackRecord):
        return len(record.labels)
    return 0


def pixels_of(images: np.ndarray) -> np.ndarray:
    """The images as uint8 [N, 784]: as sent, or float32 scaled back to 0..255."""
    flat = images.reshape(len(images), PIXELS)
    if flat.dtype == np.uint8:
        return flat
    scaled: np.ndarray = np.rint(np.clip(flat, 0.0, 1.0) * 255.0).astype(np.uint8)
    return scaled


class RecordQueue:
    """A queue bounded in rows (images), not records: a 4096-image call weighs 4096.

    The writer is woken only once `wake_rows` rows wait (or by its own timer): woken per
    record, it would build a table and a row group per call, and contend for the GIL with
    the event loop thousands of times a second."""

    def __init__(self, capacity: int, wake_rows: int) -> None:
        self.capacity = capacity
        self.wake_rows = max(1, min(wake_rows, capacity // 2))
        self._items: deque[Record] = deque()
        self._rows = 0
        self._stopped = False
        self._ready = threading.Condition(threading.Lock())

    def offer(self, record: Record, rows: int) -> bool:
        """Queue the record unless that would pass the capacity (rows 0: always)."""
        with self._ready:
            before = self._rows
            if rows and before + rows > self.capacity:
                return False
            self._items.append(record)
            self._rows = before + rows
            if before < self.wake_rows <= self._rows:
                self._ready.notify()
        return True

    def take(self, timeout: float, most_rows: int) -> list[Record]:
        """What is queued, up to about `most_rows` rows (at least one record), once
        `wake_rows` rows wait, or after `timeout` seconds, or at once when stopped."""
        with self._ready:
            if self._rows < self.wake_rows and not self._stopped and timeout > 0:
                self._ready.wait(timeout)
            taken: list[Record] = []
            rows = 0
            while self._items and (not taken or rows < most_rows):
                record = self._items.popleft()
                weight = rows_of(record)
                self._rows -= weight
                rows += weight
                taken.append(record)
            return taken

    def stop(self) -> None:
        """From now on take() returns at once."""
        with self._ready:
            self._stopped = True
            self._ready.notify_all()

    @property
    def rows(self) -> int:
        return self._rows


class Sink:
    """One destination: its queue, and the thread that empties it."""

    name = ""

    def __init__(self, queue_rows: int, wake_rows: int) -> None:
        self.queue = RecordQueue(queue_rows, wake_rows)
        self.written = metrics.PREDICTION_LOG_RECORDS.labels(self.name)
        self.dropped = metrics.PREDICTION_LOG_DROPPED.labels(self.name)
        self.errors = metrics.PREDICTION_LOG_ERRORS.labels(self.name)
        self._stopping = threading.Event()
        self._deadline = 0.0  # monotonic time by which close() gives up
        self._thread = threading.Thread(target=self._run, name=f"prediction-log-{self.name}")
        self._thread.daemon = True
        self._last_complaint = -LOG_INTERVAL
        self._failures = 0

    def start(self) -> None:
        self._thread.start()

    def put(self, record: Record, rows: int) -> None:
        if not self.queue.offer(record, rows):
            self.dropped.inc(rows)

    def begin_close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write or send what is queued (for at most `timeout`), then stop: see join()."""
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        self.queue.stop()

    def join(self) -> None:
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1.0)

    def _run(self) -> None:
        raise NotImplementedError

    def complain(self, what: str, error: BaseException) -> None:
        """Log a sink's failure, at most once per LOG_INTERVAL (with how many since)."""
        self._failures += 1
        self.errors.inc()
        now = time.monotonic()
        if now - self._last_complaint >= LOG_INTERVAL:
            logger.error(
                what,
                extra={"sink": self.name, "error": f"{type(error).__name__}: {error}",
                       "failures": self._failures},
            )  # fmt: skip
            self._last_complaint = now
            self._failures = 0


# The Parquet layout (DRIFT-CONTRACT.md): one row per image, one per feedback label.
def _schemas() -> tuple[Any, Any]:
    import pyarrow as pa

    utc = pa.timestamp("us", tz="UTC")
    predictions = pa.schema(
        [
            ("time", utc),
            ("request_id", pa.string()),
            ("index", pa.int32()),
            ("caller", pa.string()),
            ("api", pa.string()),
            ("model_version", pa.int64()),
            ("priority", pa.string()),
            ("predicted", pa.int8()),
            ("confidence", pa.float32()),
            ("probabilities", pa.list_(pa.float32(), 10)),
            ("input", pa.binary()),
        ]
    )
    feedback = pa.schema(
        [
            ("time", utc),
            ("request_id", pa.string()),
            ("index", pa.int32()),
            ("label", pa.int8()),
            ("model_version", pa.int64()),
            ("predicted", pa.int8()),
        ]
    )
    return predictions, feedback


def predictions_table(records: Sequence[CallRecord], schema: Any) -> Any:
    """The rows of `records` as one Arrow table of the predictions schema.

    Per-call values (strings, time, version) are converted once per call and spread over
    the call's rows by Arrow's `take`: converting them per row costs the writer thread (and
    the GIL the event loop needs) several times more at 256 images a call."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = np.fromiter((len(r.classes) for r in records), np.int64, len(records))
    rows = int(counts.sum())
    owner = pa.array(np.repeat(np.arange(len(records), dtype=np.int32), counts))
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    index = (np.arange(rows, dtype=np.int64) - starts).astype(np.int32)

    def spread(values: list[Any], kind: Any) -> Any:
        return pc.take(pa.array(values, kind), owner)

    probabilities = np.concatenate([r.probabilities for r in records]).astype(
        np.float32, copy=False
    )
    if any(r.images is not None for r in records):
        pixels = np.concatenate(
            [
                np.zeros((len(r.classes), PIXELS), np.uint8)
                if r.images is None
                else pixels_of(r.images)
                for r in records
            ]
        )
        offsets = np.arange(0, rows * PIXELS + 1, PIXELS, dtype=np.int32)
        inputs = pa.Array.from_buffers(
            pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(pixels)]
        )
    else:
        inputs = pa.nulls(rows, pa.binary())
    columns = [
        spread([int(r.time * 1e6) for r in records], pa.timestamp("us", tz="UTC")),
        spread([r.request_id for r in records], pa.string()),
        pa.array(index),
        spread([r.caller for r in records], pa.string()),
        spread([r.api for r in records], pa.string()),
        spread([r.model_version for r in records], pa.int64()),
        spread([r.priority for r in records], pa.string()),
        pa.array(np.concatenate([r.classes for r in records]).astype(np.int8)),
        pa.array(probabilities.max(axis=1)),
        pa.FixedSizeListArray.from_arrays(pa.array(probabilities.ravel()), 10),
        inputs,
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def feedback_table(records: Sequence[FeedbackRecord], schema: Any) -> Any:
    import pyarrow as pa

    labels = [(r.time, label) for r in records for label in r.labels]
    return pa.Table.from_pydict(
        {
            "time": [int(t * 1e6) for t, _ in labels],
            "request_id": [label.request_id for _, label in labels],
            "index": [label.index for _, label in labels],
            "label": [label.label for _, label in labels],
            "model_version": [label.model_version for _, label in labels],
            "predicted": [label.predicted for _, label in labels],
        },
        schema=schema,
    )


class ParquetSeries:
    """One kind of file (predictions or feedback): the open `.parquet.tmp` file, its rows,
    and the rename that publishes it."""

    def __init__(self, folder: Path, kind: str, schema: Any, max_rows: int, max_age: float):
        self.folder, self.kind, self.schema = folder, kind, schema
        self.max_rows, self.max_age = max_rows, max_age
        self._writer: Any = None
        self._path = Path()
        self._opened = 0.0
        self._seq = 0
        self.rows = 0

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            now = time.time()
            stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            name = f"{self.kind}-{stamp}-{os.getpid()}-{self._seq}.parquet"
            self._seq += 1
            self._path = self.folder / name
            self._writer = pq.ParquetWriter(
                self._path.with_suffix(".parquet.tmp"),
                self.schema,
                # Dictionaries only where values repeat: hashing every probability costs
                # the writer about three times the rest of the write.
                use_dictionary=[
                    n for n in ("request_id", "caller", "api", "priority") if n in self.schema.names
                ],
            )
            self._opened = time.monotonic()
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows
        if self.rows >= self.max_rows:
            self.publish()

    def due_in(self) -> float | None:
        """Seconds until the open file is old enough to publish (None: no file open)."""
        if self._writer is None:
            return None
        return max(0.0, self._opened + self.max_age - time.monotonic())

    def abandon(self) -> None:
        """Give up the open file after a failed write: it stays `*.tmp`, which readers
        skip (its rows were counted as written, the failed batch's as dropped)."""
        writer, self._writer = self._writer, None
        self.rows = 0
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def publish(self) -> None:
        """Close the open file and rename it to `*.parquet`: now readers take it."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        self.rows = 0
        writer.close()
        os.replace(self._path.with_suffix(".parquet.tmp"), self._path)


def warm_up(schema: Any) -> None:
    """Write an empty Parquet file in memory: the first ParquetWriter imports some 400
    modules (0.4 s of CPU), which belongs to start-up, not to the writer's first rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(pa.BufferOutputStream(), schema) as writer:
        writer.write_table(schema.empty_table())


class DirSink(Sink):
    name = "dir"

    def __init__(self, settings: Settings, folder: Path) -> None:
        super().__init__(settings.prediction_log_queue_size, ROW_GROUP_ROWS)
        try:  # here, not on the writer's first rows: importing takes a second of CPU
            import pyarrow.compute
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise StartupError(
                "--prediction-log DIR writes Parquet and needs pyarrow: "
                "pip install 'mnist-serving[server,monitoring]'"
            ) from None
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StartupError(f"--prediction-log {folder}: cannot create it ({error})") from None
        if not os.access(folder, os.W_OK):
            raise StartupError(f"--prediction-log {folder}: this process cannot write there")
        self.folder = folder
        predictions, feedback = _schemas()
        rows, age = settings.prediction_log_max_rows, settings.prediction_log_max_seconds
        self.predictions = ParquetSeries(folder, "predictions", predictions, rows, age)
        self.feedback = ParquetSeries(folder, "feedback", feedback, rows, age)
        warm_up(predictions)

    def _run(self) -> None:
        series = (self.predictions, self.feedback)
        while True:
            waits = [d for d in (s.due_in() for s in series) if d is not None]
            timeout = min(waits) if waits else None
            stopping = self._stopping.is_set()
            wait = IDLE_WAIT if timeout is None else min(timeout, IDLE_WAIT)
            # At most what the open file still takes: a file passes --prediction-log-max-rows
            # by less than one call's rows.
            room = max(1, min(ROW_GROUP_ROWS, self.predictions.max_rows - self.predictions.rows))
            batch = self.queue.take(0 if stopping else wait, room)
            try:
                self._write(batch)
            except Exception as error:  # a full disk: count, say so, carry on
                self.dropped.inc(sum(rows_of(record) for record in batch))
                for s in series:
                    s.abandon()
                self.complain("cannot write the prediction log", error)
            try:
                for s in series:
                    due = s.due_in()
                    if due is not None and due <= 0:
                        s.publish()
            except Exception as error:
                self.complain("cannot write the prediction log", error)
            if stopping and not batch:
                for s in series:
                    try:
                        s.publish()
                    except Exception as error:
                        self.complain("cannot write the prediction log", error)
                return

    def _write(self, batch: list[Record]) -> None:
        calls = [r for r in batch if isinstance(r, CallRecord)]
        labels = [r for r in batch if isinstance(r, FeedbackRecord)]
        for record in batch:
            if isinstance(record, ReferenceRecord):
                self._write_reference(record)
        if calls:
            table = predictions_table(calls, self.predictions.schema)
            self.predictions.write(table)
            self.written.inc(table.num_rows)
        if labels:
            table = feedback_table(labels, self.feedback.schema)
            self.feedback.write(table)
            self.written.inc(table.num_rows)

    def _write_reference(self, record: ReferenceRecord) -> None:
        path = self.folder / f"reference-v{record.version}.json"
        if path.exists():  # another worker, or an earlier run, wrote it: the same version
            return
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record.reference, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)


def _time_text(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


class Event(NamedTuple):
    """One CloudEvent: its attributes (ce-* without the prefix) and its JSON data."""

    attributes: dict[str, str]
    data: dict[str, Any]
    rows: int  # predicted rows it carries (0 for a request event)


class UrlSink(Sink):
    """CloudEvents to an HTTP receiver: each call's response event (and request event
    with --log-inputs), one per POST in binary mode or `batch` per POST in batched mode."""

    name = "url"

    def __init__(self, settings: Settings, url: str) -> None:
        super().__init__(settings.prediction_log_queue_size, URL_WAKE_ROWS)
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.batch = settings.prediction_log_url_batch
        self.model_name = settings.model_name
        self.source = f"urn:mnist-serving:{socket.gethostname()}:{os.getpid()}"
        self._connection: http.client.HTTPConnection | None = None
        self._pending: deque[Event] = deque()  # taken from the queue, not yet delivered

    def events_of(self, record: CallRecord) -> list[Event]:
        n = len(record.classes)
        common = {
            "specversion": "1.0",
            "id": record.request_id,
            "source": self.source,
            "time": _time_text(record.time),
            "inferenceservicename": self.model_name,
            "component": "predictor",
            "endpoint": self.model_name,
        }
        events = []
        if record.images is not None:
            request = {
                "id": record.request_id,
                "inputs": [
                    {"name": "images", "datatype": "UINT8", "shape": [n, PIXELS],
                     "data": pixels_of(record.images).ravel().tolist()},
                ],
            }  # fmt: skip
            events.append(Event({**common, "type": REQUEST_TYPE}, request, 0))
        response = {
            "model_name": self.model_name,
            "model_version": str(record.model_version),
            "id": record.request_id,
            "parameters": {"api": record.api, "caller": record.caller,
                           "priority": record.priority},
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [n, 10],
                 "data": record.probabilities.ravel().tolist()},
                {"name": "classes", "datatype": "INT64", "shape": [n],
                 "data": record.classes.tolist()},
            ],
        }  # fmt: skip
        events.append(Event({**common, "type": RESPONSE_TYPE}, response, n))
        return events

    def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            stopping = self._stopping.is_set()
            if not self._pending:
                batch = self.queue.take(0 if stopping else IDLE_WAIT, ROW_GROUP_ROWS)
                for record in batch:
                    if isinstance(record, CallRecord):
                        self._pending.extend(self.events_of(record))
                        # Let the event loop have the GIL between calls' conversions: it
                        # would otherwise wait up to the 5 ms switch interval for it.
                        time.sleep(0)
                if stopping and not self._pending and not self.queue.rows:
                    self._disconnect()
                    return
                if not self._pending:
                    continue
            try:
                self._send_some()
                delay = RETRY_FIRST
            except (OSError, http.client.HTTPException, SinkRefused) as error:
                self._disconnect()
                self.complain("cannot send the prediction log", error)
                if stopping and time.monotonic() >= self._deadline:
                    lost = sum(e.rows for e in self._pending) + self.queue.rows
                    logger.error("prediction log events not delivered at shutdown",
                                 extra={"sink": self.name, "rows": lost})  # fmt: skip
                    self.dropped.inc(lost)
                    return
                # Back off (with jitter); a stop wakes the wait, not the sleep that follows it.
                pause = delay * (0.5 + random.random() / 2)
                if stopping:
                    time.sleep(min(pause, max(0.0, self._deadline - time.monotonic())))
                else:
                    self._stopping.wait(pause)
                delay = min(delay * 2, RETRY_MOST)

    def _send_some(self) -> None:
        """POST the first pending event (binary mode) or up to `batch` of them (batched)."""
        count = 1 if self.batch == 1 else min(self.batch, len(self._pending))
        events = [self._pending[i] for i in range(count)]
        if self.batch == 1:
            (event,) = events
            headers = {f"ce-{key}": value for key, value in event.attributes.items()}
            headers["Content-Type"] = "application/json"
            body = json.dumps(event.data, separators=(",", ":")).encode()
        else:
            headers = {"Content-Type": BATCH_CONTENT_TYPE}
            body = json.dumps(
                [{**e.attributes, "datacontenttype": "application/json", "data": e.data}
                 for e in events],
                separators=(",", ":"),
            ).encode()  # fmt: skip
        time.sleep(0)  # the GIL, to the event loop, after the encoding
        try:
            self._post(body, headers)
        except EventsRejected as error:
            self.dropped.inc(sum(e.rows for e in events))
            self.complain("the receiver rejects prediction log events", error)
        else:
            self.written.inc(sum(e.rows for e in events))
        for _ in range(count):
            self._pending.popleft()

    def _post(self, body: bytes, headers: dict[str, str]) -> None:
        if self._connection is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self._connection = kind(self.host, self.port, timeout=POST_TIMEOUT)
        self._connection.request("POST", self.path, body, headers)
        answer = self._connection.getresponse()
        answer.read()
        if answer.status in RETRIED or answer.status >= 500:
            raise SinkRefused(f"HTTP {answer.status} {answer.reason}")
        if answer.status >= 300:  # the receiver rejects these events: retrying cannot help
            raise EventsRejected(f"HTTP {answer.status} {answer.reason}")

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class SinkRefused(Exception):
    """The receiver cannot take events now (5xx, 408, 429): they are sent again."""


class EventsRejected(Exception):
    """The receiver refuses these events (another 3xx or 4xx): they are dropped."""


class PredictionLog:
    """The observer: samples calls and hands records to the sinks (see the module doc)."""

    def __init__(self, settings: Settings, reference_of: ReferenceOf) -> None:
        self.sample_rate = settings.prediction_log_sample
        self.log_inputs = settings.log_inputs
        self.reference_of = reference_of
        sinks: list[Sink] = []
        if settings.prediction_log is not None:
            sinks.append(DirSink(settings, settings.prediction_log))
        if settings.prediction_log_url is not None:
            sinks.append(UrlSink(settings, settings.prediction_log_url))
        self.sinks = tuple(sinks)
        self._files = tuple(s for s in sinks if isinstance(s, DirSink))
        self._versions_seen: set[int] = set()
        for sink in self.sinks:
            sink.start()

    @classmethod
    def from_settings(cls, settings: Settings, reference_of: ReferenceOf) -> PredictionLog | None:
        if settings.prediction_log is None and settings.prediction_log_url is None:
            return None
        return cls(settings, reference_of)

    def sampled(self) -> bool:
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def observe(self, call: Call, images: np.ndarray, prediction: Prediction, version: int) -> None:
        if not self.sampled():
            return
        try:
            if version not in self._versions_seen:
                self._first_seen(version)
            record = CallRecord(
                time.time(),
                call.request_id,
                getattr(call, "caller", "anonymous"),
                call.api,
                call.priority,
                version,
                prediction.probabilities,
                prediction.classes,
                images if self.log_inputs else None,
            )
            rows = len(prediction.classes)
            for sink in self.sinks:
                sink.put(record, rows)
        except Exception:  # never into the call
            logger.exception("prediction log: cannot queue a record")

    def _first_seen(self, version: int) -> None:
        self._versions_seen.add(version)
        if not self._files:
            return
        reference = self.reference_of(version)
        if reference is None:
            return  # a version trained before the reference existed: nothing to compare
        for sink in self._files:
            sink.put(ReferenceRecord(version, reference), 0)

    def feedback(self, labelled: Sequence[Labelled]) -> None:
        if not labelled or not self._files:
            return
        record = FeedbackRecord(time.time(), tuple(labelled))
        for sink in self._files:
            sink.put(record, len(labelled))

    def close(self) -> None:
        """Write and send what is queued (for at most CLOSE_TIMEOUT), then stop."""
        for sink in self.sinks:
            sink.begin_close()
        for sink in self.sinks:
            sink.join()
