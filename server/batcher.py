"""Dynamic batching with two priority classes: merge concurrent requests into one model
call, split the results back, and keep online callers ahead of batch jobs.

Each request (already a batch of N images) gets a future and joins the queue of its class,
`online` or `batch` (call_context.py). One task per batcher makes one model call at a time:
- The next call takes online work when there is any: the online requests at the queue
  front, merged up to max_batch_size images (a request bigger than that runs alone). They
  go when the merged batch is full, when the oldest has waited batch_timeout, or at once
  when batch_timeout is 0: under load, requests that arrive while the model is busy form
  the next batch by themselves, so light traffic pays no added latency.
- Batch-class requests run in chunks of at most batch_chunk_images images (a chunk may
  hold the ends and starts of several requests, in order), so that an online request
  never waits for more than one chunk's model time. A request's future resolves once its
  last chunk is done.
- Batch work is never starved: while online work keeps coming, at least one model call in
  batch_every runs a batch chunk.
Requests whose deadline has passed, or whose caller went away, are dropped before (the
rest of) their images reach the model. Each class's queue is bounded in images; beyond it,
new requests of that class are refused at once (load shedding), so a batch job that fills
its queue never takes the room online calls have.

A model that answers a few images in microseconds (LiteRT) may take them inline: when no
online request waits, the model is not running online work and batch_timeout is 0, an
online request of at most inline_max_images would form a batch by itself and run next
anyway, so it is predicted right there on the event loop, without the queue, the future and
the thread hop (which cost more than the call). Order is kept (no online request is waiting
that it could overtake), and so are deadlines, shedding and the metrics. While a batch
chunk is in the model, such a request runs beside it (a LiteRT model keeps an interpreter
per caller, and the chunk's call releases the GIL): an online call then waits for no batch
work at all. While the model runs online work, requests queue and merge as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import call_context, metrics, tracing
from .call_context import BATCH, ONLINE, PRIORITIES, Priority
from .errors import DeadlineExpired, Overloaded, ShuttingDown
from .runtimes.base import Prediction

logger = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], Prediction]


@dataclass(eq=False)
class _Request:
    images: np.ndarray
    deadline: float | None  # time.monotonic() value, or None for no deadline
    future: asyncio.Future[Prediction]
    priority: Priority
    enqueued: float = field(default_factory=time.monotonic)
    taken: int = 0  # images handed to the model so far (batch chunks)
    answered: list[Prediction] = field(default_factory=list)  # their rows, in order
    span: Any = None  # the call's server span, when tracing is on

    @property
    def left(self) -> int:
        return len(self.images) - self.taken


@dataclass(frozen=True)
class _Part:
    """A run of one request's images in a model call."""

    request: _Request
    start: int
    stop: int


class Batcher:
    def __init__(
        self,
        predict: Predict,
        executor: Executor,
        *,
        max_batch_size: int,
        timeout: float,
        max_queued_images: int,
        inline_max_images: int = 0,
        max_queued_batch_images: int | None = None,
        batch_chunk_images: int | None = None,
        batch_every: int = 4,
        batch_executor: Executor | None = None,
    ) -> None:
        self._predict = predict
        self._executors: dict[Priority, Executor] = {
            ONLINE: executor,
            BATCH: batch_executor or executor,  # a lower-priority thread (app.py)
        }
        self.max_batch_size = max_batch_size
        self.timeout = timeout
        self.limits: dict[Priority, int] = {
            ONLINE: max_queued_images,
            BATCH: max_queued_images
            if max_queued_batch_images is None
            else max_queued_batch_images,
        }
        self.chunk = min(batch_chunk_images or max_batch_size, max_batch_size)
        self.batch_every = max(1, batch_every)
        self.inline_max_images = min(inline_max_images, max_batch_size) if timeout == 0 else 0
        self._running: Priority | None = None  # the class of the work in the model
        self._queues: dict[Priority, deque[_Request]] = {p: deque() for p in PRIORITIES}
        self._queued: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)  # images
        self._online_streak = 0  # online model calls in a row while batch work waited
        self._waited = {p: metrics.QUEUE_WAIT.labels(p) for p in PRIORITIES}
        self._arrived = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(
        self, images: np.ndarray, deadline: float | None = None, priority: Priority = ONLINE
    ) -> Prediction:
        """Predict `images` as part of some model call; raises Overloaded when the queue
        of their class is full."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        count = len(images)
        queued, limit = self._queued[priority], self.limits[priority]
        if queued + count > limit:
            metrics.REQUESTS_SHED.labels(priority).inc()
            raise Overloaded(
                f"the server's {priority} queue is full ({queued} images waiting, "
                f"limit {limit}); retry with backoff"
            )
        online = self._queues[ONLINE]
        if (
            priority == ONLINE
            and count <= self.inline_max_images
            and self._running != ONLINE
            and not online
        ):
            check_deadline(deadline)
            self._waited[ONLINE].observe(0.0)  # every request has a wait sample
            return run_inline(self._predict, images, traced=True)
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        request = _Request(images, deadline, future, priority)
        if tracing.tracer is not None:
            request.span = call_context.current_call().span
        self._queues[priority].append(request)
        self._queued[priority] += count
        metrics.QUEUE_DEPTH.inc(count)
        self._arrived.set()
        self.start()
        return await future

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the task."""
        self._closed = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        call_context.detach()  # this task serves every call, not the one that started it
        while True:
            if not any(self._queues.values()):
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self._queues[ONLINE]:
                await self._wait_for_online()
            parts = self._take()
            if parts:
                await self._execute(parts)

    async def _wait_for_online(self) -> None:
        """Until the online queue holds a full batch or its oldest request has waited
        batch_timeout (recomputed after every arrival)."""
        online = self._queues[ONLINE]
        flush_at = online[0].enqueued + self.timeout
        while self._queued[ONLINE] < self.max_batch_size and not self._closed:
            remaining = flush_at - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Part]:
        """The next model call's work: online first, but a batch chunk when batch work has
        waited through batch_every - 1 online calls in a row."""
        waiting = bool(self._queues[BATCH])
        if self._queues[ONLINE] and not (waiting and self._online_streak >= self.batch_every - 1):
            parts = self._take_from(ONLINE, self.max_batch_size, whole=True)
            if parts:
                self._online_streak += 1 if waiting else 0
                return parts
        self._online_streak = 0
        return self._take_from(BATCH, self.chunk, whole=False)

    def _take_from(self, priority: Priority, size: int, *, whole: bool) -> list[_Part]:
        """Up to `size` images from the front of a class's queue: whole requests (online;
        the first may be bigger than `size` and then goes alone), or runs of them (batch)."""
        queue = self._queues[priority]
        parts: list[_Part] = []
        room = size
        now = time.monotonic()
        while queue and room > 0:
            head = queue[0]
            if head.future.done() or (head.deadline is not None and head.deadline <= now):
                queue.popleft()
                self._dequeued(priority, head.left)
                if not head.future.done():
                    metrics.DEADLINE_DROPS.inc()
                    head.future.set_exception(
                        DeadlineExpired("the deadline passed while the request was queued")
                    )
                continue  # the caller cancelled, or the deadline passed
            if whole and parts and head.left > room:
                break
            count = head.left if whole else min(head.left, room)
            if head.taken == 0:
                self._waited[priority].observe(now - head.enqueued)
                if head.span is not None and tracing.tracer is not None:
                    tracing.record_queue_wait(head.span, head.enqueued, now)
            parts.append(_Part(head, head.taken, head.taken + count))
            head.taken += count
            self._dequeued(priority, count)
            room -= count
            if head.left == 0:
                queue.popleft()
        return parts

    def _dequeued(self, priority: Priority, count: int) -> None:
        self._queued[priority] -= count
        metrics.QUEUE_DEPTH.dec(count)

    async def _execute(self, parts: list[_Part]) -> None:
        images = (
            parts[0].request.images[parts[0].start : parts[0].stop]
            if len(parts) == 1
            else np.concatenate([p.request.images[p.start : p.stop] for p in parts])
        )
        priority = self._running = parts[0].request.priority  # a call holds one class's work
        span = None
        if tracing.tracer is not None:  # one span, linked to every request it answers
            span = tracing.start_model_span((p.request.span for p in parts), len(images))
        try:
            result = await run_model(self._predict, self._executors[priority], images)
        except Exception as error:  # every caller of a failed call learns of it
            for part in parts:
                if not part.request.future.done():
                    part.request.future.set_exception(error)
            return
        finally:
            self._running = None
            if span is not None:
                span.end()
        start = 0
        for part in parts:
            request = part.request
            stop = start + part.stop - part.start
            if not request.future.done():
                rows = Prediction(result.probabilities[start:stop], result.classes[start:stop])
                if part.start == 0 and part.stop == len(request.images):
                    request.future.set_result(rows)  # the whole request in one call
                else:
                    request.answered.append(rows)
                    if part.stop == len(request.images):
                        request.future.set_result(_joined(request.answered))
            start = stop


def _joined(parts: list[Prediction]) -> Prediction:
    return Prediction(
        np.concatenate([p.probabilities for p in parts]),
        np.concatenate([p.classes for p in parts]),
    )


def check_deadline(deadline: float | None) -> None:
    """Refuse (and count) a request whose deadline has passed before the model runs."""
    if deadline is not None and deadline <= time.monotonic():
        metrics.DEADLINE_DROPS.inc()
        raise DeadlineExpired("the deadline passed before the model could run")


async def run_model(
    predict: Predict, executor: Executor, images: np.ndarray, *, traced: bool = False
) -> Prediction:
    """Call the model off the event loop, time it, and check it answered every image.
    `traced`: the call answers the current call alone, and gets a span as its child."""
    span = None
    if traced and tracing.tracer is not None:
        span = tracing.start_model_span((call_context.current_call().span,), len(images))
    started = time.perf_counter()
    try:
        result = await asyncio.get_running_loop().run_in_executor(executor, predict, images)
    finally:
        if span is not None:
            span.end()
    return _checked(images, result, started)


def run_inline(predict: Predict, images: np.ndarray, *, traced: bool = False) -> Prediction:
    """Call the model on this thread (the event loop's: only for microsecond calls)."""
    span = None
    if traced and tracing.tracer is not None:
        span = tracing.start_model_span((call_context.current_call().span,), len(images))
    started = time.perf_counter()
    try:
        result = predict(images)
    finally:
        if span is not None:
            span.end()
    return _checked(images, result, started)


def _checked(images: np.ndarray, result: Prediction, started: float) -> Prediction:
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    count = len(images)
    metrics.BATCH_SIZE.observe(count)
    if len(result.probabilities) != count or len(result.classes) != count:
        raise RuntimeError(f"the model answered {len(result.classes)} rows for {count} images")
    metrics.IMAGES_PREDICTED.inc(count)
    metrics.count_classes(result.classes)
    return result
