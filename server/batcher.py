"""Dynamic batching: merge concurrent requests into one model call, split the results back.

Each request (already a batch of N images) gets a future and joins a queue. One task per
batcher takes requests from the queue front and runs the model on them together when
- the merged batch holds max_batch_size images, or
- the oldest request has waited batch_timeout, or
- at once, when batch_timeout is 0: under load, requests that arrive while the model is
  busy form the next batch by themselves, so light traffic pays no added latency.
A request bigger than max_batch_size runs alone. Requests whose deadline has passed, or
whose caller went away, are dropped before they reach the model. The queue is bounded in
images; beyond it, new requests are refused at once (load shedding).

A model that answers a few images in microseconds (LiteRT) may take them inline: when
nothing is queued or running and batch_timeout is 0, a request of at most
inline_max_images would form a batch by itself and run at once anyway, so it is predicted
right there on the event loop, without the queue, the future and the thread hop (which
cost more than the call). Order is kept (nothing is waiting that it could overtake), and
so are deadlines, shedding and the metrics; a request that finds the queue or the model
busy joins the queue as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .errors import DeadlineExpired, Overloaded, ShuttingDown
from .runtimes.base import Prediction

logger = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], Prediction]


@dataclass
class _Request:
    images: np.ndarray
    deadline: float | None  # time.monotonic() value, or None for no deadline
    future: asyncio.Future[Prediction]
    enqueued: float = field(default_factory=time.monotonic)


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
    ) -> None:
        self._predict = predict
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.timeout = timeout
        self.max_queued_images = max_queued_images
        self.inline_max_images = min(inline_max_images, max_batch_size) if timeout == 0 else 0
        self._busy = False  # a batch is in the model
        self._queue: deque[_Request] = deque()
        self._queued_images = 0
        self._arrived = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> Prediction:
        """Predict `images` as part of some batch; raises Overloaded when the queue is full."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        count = len(images)
        if self._queued_images + count > self.max_queued_images:
            metrics.REQUESTS_SHED.inc()
            raise Overloaded(
                f"the server's queue is full ({self._queued_images} images waiting, "
                f"limit {self.max_queued_images}); retry with backoff"
            )
        if count <= self.inline_max_images and not self._busy and not self._queue:
            check_deadline(deadline)
            metrics.QUEUE_WAIT.observe(0.0)  # every batched request has a wait sample
            return run_inline(self._predict, images)
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(images, deadline, future))
        self._queued_images += count
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
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    async def _wait_for_batch(self) -> None:
        flush_at = self._queue[0].enqueued + self.timeout
        while self._queued_images < self.max_batch_size and not self._closed:
            remaining = flush_at - time.monotonic()  # recomputed after every arrival
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        now = time.monotonic()
        while self._queue:
            head = self._queue[0]
            if batch and size + len(head.images) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_images -= len(head.images)
            metrics.QUEUE_DEPTH.dec(len(head.images))
            if head.future.done():  # the caller cancelled
                continue
            if head.deadline is not None and head.deadline <= now:
                metrics.DEADLINE_DROPS.inc()
                head.future.set_exception(
                    DeadlineExpired("the deadline passed while the request was queued")
                )
                continue
            metrics.QUEUE_WAIT.observe(now - head.enqueued)
            batch.append(head)
            size += len(head.images)
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        images = (
            batch[0].images
            if len(batch) == 1
            else np.concatenate([request.images for request in batch])
        )
        self._busy = True
        try:
            result = await run_model(self._predict, self._executor, images)
        except Exception as error:  # every caller of a failed batch learns of it
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        finally:
            self._busy = False
        start = 0
        for request in batch:
            stop = start + len(request.images)
            if not request.future.done():
                request.future.set_result(
                    Prediction(result.probabilities[start:stop], result.classes[start:stop])
                )
            start = stop


def check_deadline(deadline: float | None) -> None:
    """Refuse (and count) a request whose deadline has passed before the model runs."""
    if deadline is not None and deadline <= time.monotonic():
        metrics.DEADLINE_DROPS.inc()
        raise DeadlineExpired("the deadline passed before the model could run")


async def run_model(predict: Predict, executor: Executor, images: np.ndarray) -> Prediction:
    """Call the model off the event loop, time it, and check it answered every image."""
    started = time.perf_counter()
    result = await asyncio.get_running_loop().run_in_executor(executor, predict, images)
    return _checked(images, result, started)


def run_inline(predict: Predict, images: np.ndarray) -> Prediction:
    """Call the model on this thread (the event loop's: only for microsecond calls)."""
    started = time.perf_counter()
    return _checked(images, predict(images), started)


def _checked(images: np.ndarray, result: Prediction, started: float) -> Prediction:
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    count = len(images)
    metrics.BATCH_SIZE.observe(count)
    if len(result.probabilities) != count or len(result.classes) != count:
        raise RuntimeError(f"the model answered {len(result.classes)} rows for {count} images")
    metrics.IMAGES_PREDICTED.inc(count)
    metrics.count_classes(result.classes)
    return result
