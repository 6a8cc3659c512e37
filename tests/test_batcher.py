"""The batcher on its own, with a numpy model that records every call it gets."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mnist_serving.server.batcher import Batcher
from mnist_serving.server.errors import DeadlineExpired, Overloaded, ShuttingDown
from mnist_serving.server.runtimes import Prediction


class RecordingModel:
    """Answers each image with a one-hot row at (first pixel % 10); remembers batch sizes."""

    def __init__(self, delay: float = 0.0, fail: bool = False, drop_one: bool = False) -> None:
        self.calls: list[int] = []
        self.delay = delay
        self.fail = fail
        self.drop_one = drop_one
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set once the model has been called

    def __call__(self, images: np.ndarray) -> Prediction:
        self.entered.set()
        self.release.wait(60)
        self.calls.append(len(images))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        classes = images.reshape(len(images), -1)[:, 0].astype(np.int64) % 10
        if self.drop_one:
            classes = classes[:-1]
        return Prediction(np.eye(10, dtype=np.float32)[classes], classes)


def tagged(tag: int, count: int = 1) -> np.ndarray:
    """`count` images whose first pixel says which request they belong to."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = tag
    return images


async def holding(model: RecordingModel) -> None:
    """Until the model has been called (and, with release cleared, is holding its thread)."""
    assert await asyncio.to_thread(model.entered.wait, 60), "the model was never called"


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1)


def make(model: RecordingModel, executor: ThreadPoolExecutor, **kw: float) -> Batcher:
    settings: dict[str, float] = {"max_batch_size": 8, "timeout": 0.0, "max_queued_images": 64}
    settings.update(kw)
    return Batcher(
        model,
        executor,
        max_batch_size=int(settings["max_batch_size"]),
        timeout=settings["timeout"],
        max_queued_images=int(settings["max_queued_images"]),
    )


async def test_requests_queued_while_the_model_is_busy_run_together(
    executor: ThreadPoolExecutor,
) -> None:
    model = RecordingModel()
    batcher = make(model, executor)
    model.release.clear()
    first = asyncio.ensure_future(batcher.submit(tagged(1)))
    await holding(model)
    rest = [asyncio.ensure_future(batcher.submit(tagged(t))) for t in range(2, 7)]
    await asyncio.sleep(0)  # each of them runs up to its wait: all five are queued
    model.release.set()
    results = await asyncio.gather(first, *rest)
    assert model.calls == [1, 5]
    assert [int(r.classes[0]) for r in results] == [1, 2, 3, 4, 5, 6]
    await batcher.close()


async def test_a_full_batch_flushes_before_the_timeout(executor: ThreadPoolExecutor) -> None:
    model = RecordingModel()
    batcher = make(model, executor, timeout=3600.0)  # only a full batch can end the wait
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(tagged(t, 2)) for t in range(4))), 60
    )
    assert model.calls == [8]
    assert [r.classes.tolist() for r in results] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    await batcher.close()


async def test_the_timeout_flushes_a_partial_batch(executor: ThreadPoolExecutor) -> None:
    model = RecordingModel()
    batcher = make(model, executor, timeout=0.2)
    started = time.monotonic()
    first = asyncio.ensure_future(batcher.submit(tagged(1)))
    second = asyncio.ensure_future(batcher.submit(tagged(2)))
    await asyncio.gather(first, second)
    waited = time.monotonic() - started
    assert model.calls == [2]  # both queued before the batcher looked: one partial batch
    assert waited >= 0.2  # which waited for the timeout, as it was not full
    await batcher.close()


async def test_splitting_keeps_every_request_its_own_rows(executor: ThreadPoolExecutor) -> None:
    model = RecordingModel()
    batcher = make(model, executor, max_batch_size=16, timeout=0.05)
    sizes = [3, 1, 5, 2, 4]
    results = await asyncio.gather(*(batcher.submit(tagged(t, n)) for t, n in enumerate(sizes)))
    for tag, (size, result) in enumerate(zip(sizes, results, strict=True)):
        assert result.classes.tolist() == [tag] * size
        assert result.probabilities.shape == (size, 10)
    await batcher.close()


async def test_a_request_bigger_than_max_batch_size_runs_alone(
    executor: ThreadPoolExecutor,
) -> None:
    model = RecordingModel()
    batcher = make(model, executor, max_batch_size=4, timeout=0.05)
    big, small = await asyncio.gather(batcher.submit(tagged(7, 10)), batcher.submit(tagged(3)))
    assert sorted(model.calls) == [1, 10]
    assert big.classes.tolist() == [7] * 10
    assert small.classes.tolist() == [3]
    await batcher.close()


async def test_a_failed_model_call_fails_every_request_of_the_batch(
    executor: ThreadPoolExecutor,
) -> None:
    batcher = make(RecordingModel(fail=True), executor, timeout=0.05)
    results = await asyncio.gather(
        *(batcher.submit(tagged(t)) for t in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    healthy = make(RecordingModel(), executor)
    assert (await healthy.submit(tagged(4))).classes.tolist() == [4]
    await batcher.close()
    await healthy.close()


async def test_a_model_that_answers_too_few_rows_fails_the_batch(
    executor: ThreadPoolExecutor,
) -> None:
    batcher = make(RecordingModel(drop_one=True), executor)
    with pytest.raises(RuntimeError, match="answered 2 rows for 3 images"):
        await batcher.submit(tagged(1, 3))
    await batcher.close()


async def test_expired_requests_never_reach_the_model(executor: ThreadPoolExecutor) -> None:
    model = RecordingModel()
    batcher = make(model, executor, timeout=0.1)
    expired = batcher.submit(tagged(1), deadline=time.monotonic() + 0.01)
    alive = batcher.submit(tagged(2), deadline=time.monotonic() + 30)
    results = await asyncio.gather(expired, alive, return_exceptions=True)
    assert isinstance(results[0], DeadlineExpired)
    assert isinstance(results[1], Prediction)
    assert model.calls == [1]
    await batcher.close()


async def test_a_full_queue_sheds_new_requests_at_once(executor: ThreadPoolExecutor) -> None:
    model = RecordingModel()
    batcher = make(model, executor, max_batch_size=4, max_queued_images=6)
    model.release.clear()
    running = asyncio.ensure_future(batcher.submit(tagged(0, 4)))
    await holding(model)  # taken off the queue, holding the model
    queued = asyncio.ensure_future(batcher.submit(tagged(1, 5)))
    await asyncio.sleep(0)  # queued now
    with pytest.raises(Overloaded, match="queue is full"):
        await batcher.submit(tagged(2, 2))
    model.release.set()
    assert (await queued).classes.tolist() == [1] * 5
    await running
    assert (await batcher.submit(tagged(3, 2))).classes.tolist() == [3, 3]
    await batcher.close()


async def test_close_finishes_queued_requests_and_refuses_new_ones(
    executor: ThreadPoolExecutor,
) -> None:
    model = RecordingModel()
    batcher = make(model, executor, timeout=0.2)
    pending = asyncio.ensure_future(batcher.submit(tagged(5)))
    await asyncio.sleep(0.01)
    await batcher.close()
    assert (await pending).classes.tolist() == [5]
    with pytest.raises(ShuttingDown):
        await batcher.submit(tagged(6))


async def test_a_cancelled_caller_is_skipped(executor: ThreadPoolExecutor) -> None:
    model = RecordingModel()
    batcher = make(model, executor, timeout=3600.0)  # only a full batch is taken
    gone = asyncio.ensure_future(batcher.submit(tagged(1)))
    await asyncio.sleep(0)  # queued now
    gone.cancel()
    assert (await batcher.submit(tagged(2, 8))).classes.tolist() == [2] * 8
    assert model.calls == [8]
    await batcher.close()


# --- inline calls (a microsecond model, such as a LiteRT twin) ----------------------------


class ThreadRecordingModel(RecordingModel):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, images: np.ndarray) -> Prediction:
        self.threads.append(threading.get_ident())
        return super().__call__(images)


def make_inline(
    model: RecordingModel, executor: ThreadPoolExecutor, timeout: float = 0.0
) -> Batcher:
    return Batcher(
        model,
        executor,
        max_batch_size=8,
        timeout=timeout,
        max_queued_images=64,
        inline_max_images=4,
    )


async def test_a_small_request_to_an_idle_batcher_runs_inline(
    executor: ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()
    batcher = make_inline(model, executor)
    small, big = await batcher.submit(tagged(3, 4)), await batcher.submit(tagged(4, 5))
    assert [int(c) for c in small.classes] == [3] * 4
    assert [int(c) for c in big.classes] == [4] * 5
    # The small one on the event loop's own thread, the big one on the executor's.
    assert model.threads[0] == threading.get_ident()
    assert model.threads[1] != threading.get_ident()
    await batcher.close()


async def test_a_small_request_joins_the_queue_while_a_batch_runs_and_keeps_its_place(
    executor: ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()
    batcher = make_inline(model, executor)
    model.release.clear()
    big = asyncio.ensure_future(batcher.submit(tagged(1, 5)))
    await asyncio.sleep(0.05)  # the big request holds the model on the executor
    small = [asyncio.ensure_future(batcher.submit(tagged(t))) for t in (2, 3, 4)]
    await asyncio.sleep(0.05)
    assert len(model.threads) == 1  # only the big request reached the model: none overtook it
    model.release.set()
    results = await asyncio.gather(big, *small)
    assert model.calls == [5, 3]  # the small ones merged behind it
    assert [int(r.classes[0]) for r in results] == [1, 2, 3, 4]
    assert threading.get_ident() not in model.threads
    await batcher.close()


async def test_an_inline_request_whose_deadline_passed_is_refused(
    executor: ThreadPoolExecutor,
) -> None:
    model = RecordingModel()
    batcher = make_inline(model, executor)
    with pytest.raises(DeadlineExpired):
        await batcher.submit(tagged(1), deadline=time.monotonic() - 1)
    assert model.calls == []
    await batcher.close()


async def test_no_inline_calls_when_requests_wait_for_each_other(
    executor: ThreadPoolExecutor,
) -> None:
    """With a batch timeout, a lone request waits for company: it must not run at once."""
    model = ThreadRecordingModel()
    batcher = make_inline(model, executor, timeout=0.05)
    results = await asyncio.gather(*(batcher.submit(tagged(t)) for t in (1, 2)))
    assert [int(r.classes[0]) for r in results] == [1, 2]
    assert model.calls == [2]
    assert threading.get_ident() not in model.threads
    await batcher.close()
