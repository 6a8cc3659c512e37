"""The access log (opt-in, --access-log PATH or -): one JSON line per call, sampled.

Written off the request path: the per-call path (api/calls.py) puts a small record on a
bounded queue with put_nowait, and one thread formats and writes the lines. A call never
waits for the log: when the queue is full (a slow disk, a pipe nobody reads) the record is
dropped and counted in mnist_access_log_dropped_total. The file is opened by that thread
in append mode, so several workers may share one file (each line is one write).
"""

from __future__ import annotations

import json
import logging
import queue
import random
import sys
import threading
from datetime import datetime, timezone
from typing import IO, NamedTuple

from . import metrics

logger = logging.getLogger(__name__)

STDOUT = "-"
# How long close() waits for the writer to write what is queued.
CLOSE_TIMEOUT = 5.0


class Record(NamedTuple):
    """One call, as the access log line tells it (formatted by the writer thread)."""

    time: float  # time.time() when the call arrived
    request_id: str
    caller: str
    api: str
    method: str
    status: str  # the gRPC status name the caller got (HTTP calls too)
    http_status: int  # 0 for gRPC calls
    duration: float  # seconds
    images: int
    model_version: int
    priority: str
    trace_id: str
    peer: str


def line_of(record: Record) -> str:
    stamp = datetime.fromtimestamp(record.time, timezone.utc).isoformat(timespec="milliseconds")
    fields: dict[str, object] = {
        "time": stamp.replace("+00:00", "Z"),
        "request_id": record.request_id,
        "caller": record.caller,
        "api": record.api,
        "method": record.method,
        "status": record.status,
    }
    if record.http_status:
        fields["http_status"] = record.http_status
    fields.update(
        duration_ms=round(record.duration * 1000, 3),
        images=record.images,
        model_version=record.model_version,
        priority=record.priority,
        trace_id=record.trace_id,
        peer=record.peer,
    )
    return json.dumps(fields, separators=(",", ":")) + "\n"


class AccessLog:
    """A bounded queue and the thread that writes it to `target` (a path, or - for stdout)."""

    _STOP = object()

    def __init__(self, target: str, sample_rate: float, queue_size: int) -> None:
        self.target = target
        self.sample_rate = sample_rate
        self._queue: queue.Queue[object] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._write, name="access-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        """Whether this call gets a line."""
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def put(self, record: Record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            metrics.ACCESS_LOG_DROPPED.inc()

    def close(self) -> None:
        """Write what is queued (waiting at most CLOSE_TIMEOUT), then stop the thread."""
        try:
            self._queue.put(self._STOP, timeout=CLOSE_TIMEOUT)
        except queue.Full:
            return  # the writer is stuck (a pipe nobody reads): it is a daemon thread
        self._thread.join(CLOSE_TIMEOUT)

    def _open(self) -> IO[str]:
        if self.target == STDOUT:
            return sys.stdout
        return open(self.target, "a", encoding="utf-8")

    def _write(self) -> None:
        try:
            out = self._open()
        except OSError as error:
            logger.error("cannot open the access log", extra={"path": self.target, "error": error})
            return
        get = self._queue.get
        try:
            while True:
                item = get()
                if item is self._STOP:
                    return
                if isinstance(item, Record):
                    out.write(line_of(item))
                if self._queue.empty():
                    out.flush()
        except OSError as error:
            logger.error("cannot write the access log", extra={"path": self.target, "error": error})
        finally:
            out.flush()
            if out is not sys.stdout:
                out.close()
