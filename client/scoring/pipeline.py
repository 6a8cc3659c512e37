"""The plain engine: push one source through the server, many requests in flight, and write
one row per input, in input order, to CSV or JSON Lines.

Requests run concurrently over one grpc.aio channel with a sliding window: up to
`concurrency` batches are in flight, and results are written as soon as the oldest one is
done, so the output grows in order and a killed job leaves a prefix of complete rows.
`--resume` keeps that prefix (truncating a half-written last line), re-scores rows that
had failed, and goes on from there.

`score()` is the same pipeline for callers holding an array (the benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
import numpy.typing as npt

from mnist_serving.contract import NUM_CLASSES

from ..aio import AsyncMnistClient
from ..client import (
    BATCH,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    Priority,
    RetryPolicy,
    check_priority,
)
from ..codec import Prediction
from ..errors import InputFileError, MnistError
from ..inputs import ArraySource, Source
from .outputs import BatchResult, RowFormat
from .resume import Existing, read_existing, replace_rows

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1024
DEFAULT_CONCURRENCY = 4


class Predictor(Protocol):
    """What `scored_batches` needs of a client: AsyncMnistClient (over one server or
    several)."""

    async def predict(self, images: npt.ArrayLike, *, model_version: int = 0) -> Prediction: ...


@dataclass
class ScoreStats:
    """What a run did. `classes` holds every row's class (-1 where it failed); `probabilities`
    is filled only by `score()`."""

    images: int  # rows scored (or attempted) in this run
    seconds: float
    model_version: int
    failed_ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, stop)
    errors: list[str] = field(default_factory=list)  # one message per failed range
    classes: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    probabilities: npt.NDArray[np.float32] | None = None

    @property
    def failed(self) -> int:
        return sum(stop - start for start, stop in self.failed_ranges)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def batch_ranges(rows: Iterable[int], batch_size: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs of `rows` (sorted), cut into [start, stop) of at most batch_size."""
    start = stop = -1
    for row in rows:
        if row == stop and stop - start < batch_size:
            stop += 1
            continue
        if start >= 0:
            yield start, stop
        start, stop = row, row + 1
    if start >= 0:
        yield start, stop


async def scored_batches(
    client: Predictor,
    source: Source,
    ranges: Iterable[tuple[int, int]],
    concurrency: int,
    model_version: int = 0,
) -> AsyncGenerator[BatchResult, None]:
    """Score `ranges` of `source`, `concurrency` batches in flight, yielding in order.

    Unpinned, the first batch goes alone and the rest are pinned to the version that
    answered it, so a version loaded mid-job never mixes into the output.
    """

    async def one(start: int, stop: int, version: int) -> BatchResult:
        try:
            images, errors = await asyncio.to_thread(source.load, start, stop)
        except InputFileError as error:
            return BatchResult(start, stop, None, dict.fromkeys(range(start, stop), str(error)))
        if len(images) == 0:
            return BatchResult(start, stop, None, errors)
        try:
            prediction = await client.predict(images, model_version=version)
        except MnistError as error:
            failed = dict.fromkeys(range(start, stop), str(error))
            return BatchResult(start, stop, None, failed | errors)
        return BatchResult(start, stop, prediction, errors)

    pending: deque[asyncio.Task[BatchResult]] = deque()
    remaining = iter(ranges)
    version, answered = model_version, model_version != 0
    try:
        while True:
            while len(pending) < (concurrency if answered else 1):
                batch = next(remaining, None)
                if batch is None:
                    break
                pending.append(asyncio.create_task(one(*batch, version)))
            if not pending:
                return
            result = await pending.popleft()
            if not answered and result.prediction is not None:
                version, answered = result.prediction.model_version, True
            yield result
    finally:
        for task in pending:
            task.cancel()


# --- the job ------------------------------------------------------------------------------


@dataclass
class JobSettings:
    target: str
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    model_version: int = 0
    timeout: float | None = DEFAULT_TIMEOUT
    credentials: grpc.ChannelCredentials | None = None
    retry: RetryPolicy = DEFAULT_RETRY
    connections: int = 4  # spread over a server's --workers; costs ~nothing against one
    # Consecutive failed batches after which the job stops (the server is likely gone):
    # what was written stays valid and `--resume` goes on from there.
    give_up_after: int = 0  # 0: 2 * concurrency + 2
    # The class every call declares: a scoring job is bulk work, which the server keeps
    # behind online callers ("online" to compete with them; None to declare none).
    priority: Priority | None = BATCH
    # Write each row's request ID and its position in that call (request_id, request_index),
    # so that the job's true labels can be sent back as feedback.
    request_ids: bool = False
    # The server's API key (mnist-serve --auth-keys), sent with every call; kept out of repr.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("batch size and concurrency must be at least 1")
        check_priority(self.priority)


@dataclass
class JobReport:
    stats: ScoreStats
    resumed_rows: int  # complete rows kept from an earlier run
    rescored_rows: int  # rows that had failed in an earlier run and were tried again
    classes: npt.NDArray[np.int64]  # every row of the output, -1 = failed
    stopped_early: bool
    batch_size: int


def _open_client(settings: JobSettings, batch_size: int) -> AsyncMnistClient:
    return AsyncMnistClient(
        settings.target,
        credentials=settings.credentials,
        timeout=settings.timeout,
        max_images_per_request=batch_size,
        retry=settings.retry,
        connections=settings.connections,
        priority=settings.priority,
        token=settings.token,
    )


async def _batch_size_for(client: AsyncMnistClient, wanted: int) -> int:
    """`wanted`, clamped to what the server accepts. Also fails fast when it is unreachable."""
    limit = (await client.metadata()).max_images_per_request
    if 0 < limit < wanted:
        logger.warning("batch size %d is over the server's limit; using %d", wanted, limit)
        return limit
    return wanted


def _failure_ranges(
    errors: dict[int, str], ranges: list[tuple[int, int]], messages: list[str]
) -> None:
    """Append failed rows as ranges, merging runs that share a message."""
    for index in sorted(errors):
        message = errors[index]
        if ranges and ranges[-1][1] == index and messages[-1] == message:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
            messages.append(message)


def run_job(
    settings: JobSettings,
    source: Source,
    output: Path,
    *,
    resume: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> JobReport:
    """Score `source` into `output` (CSV or JSON Lines by extension), in input order.

    Without `resume`, an existing `output` is replaced. `on_start(rows already done)` is
    called once before scoring, `on_rows(n)` after each batch is written (a progress bar).
    """
    fmt = RowFormat.for_path(output, source.key_name, settings.request_ids)
    existing = Existing(0, [], 0)
    if resume and output.exists():
        existing = read_existing(output, fmt, source)
        if existing.truncated_bytes:
            logger.info("cut %d bytes of a half-written row", existing.truncated_bytes)
    return asyncio.run(
        _run_job(settings, source, output, fmt, existing, not resume, on_start, on_rows)
    )


class _Tally:
    """Counts and failures of a job, updated batch by batch."""

    def __init__(self, classes: npt.NDArray[np.int64], on_rows: Callable[[int], None] | None):
        self.classes = classes
        self.on_rows = on_rows
        self.rows = 0
        self.failed_ranges: list[tuple[int, int]] = []
        self.messages: list[str] = []

    def add(self, result: BatchResult) -> None:
        self.rows += result.stop - result.start
        self.classes[result.start : result.stop] = -1
        if result.prediction is not None:
            answered = [i for i in range(result.start, result.stop) if i not in result.errors]
            self.classes[answered] = result.prediction.classes
        _failure_ranges(result.errors, self.failed_ranges, self.messages)
        if self.on_rows is not None:
            self.on_rows(result.stop - result.start)


class _AppendOnly:
    """The output file, opened for appending; writes are flushed batch by batch so that a
    killed job leaves complete rows (and at most one partial line) behind."""

    def __init__(self, path: Path, fmt: RowFormat, start_over: bool) -> None:
        self.stream = path.open("w" if start_over else "a", encoding="utf-8", newline="")
        if self.stream.tell() == 0:
            self.stream.write(fmt.header())

    def write(self, lines: list[str]) -> None:
        self.stream.writelines(lines)
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


async def _run_job(
    settings: JobSettings,
    source: Source,
    output: Path,
    fmt: RowFormat,
    existing: Existing,
    start_over: bool,
    on_start: Callable[[int], None] | None,
    on_rows: Callable[[int], None] | None,
) -> JobReport:
    async with _open_client(settings, settings.batch_size) as probe:
        batch_size = await _batch_size_for(probe, settings.batch_size)
    classes = np.full(len(source), -1, np.int64)
    classes[: existing.rows] = existing.classes
    earlier_failures = [i for i, c in enumerate(existing.classes) if c < 0]
    tally = _Tally(classes, on_rows)
    give_up_after = settings.give_up_after or 2 * settings.concurrency + 2
    version = settings.model_version
    stopped_early = False
    if on_start is not None:
        on_start(existing.rows - len(earlier_failures))
    started = time.perf_counter()
    async with _open_client(settings, batch_size) as client:
        out = _AppendOnly(output, fmt, start_over)
        try:
            consecutive_failures = 0
            ranges = batch_ranges(range(existing.rows, len(source)), batch_size)
            batches = scored_batches(client, source, ranges, settings.concurrency, version)
            async with aclosing(batches):
                async for result in batches:
                    out.write(fmt.rows(source, result))
                    tally.add(result)
                    if result.prediction is None:
                        consecutive_failures += 1
                    else:
                        version = version or result.prediction.model_version
                        consecutive_failures = 0
                    if consecutive_failures >= give_up_after:
                        stopped_early = True
                        break
        finally:
            out.close()

        if earlier_failures and not stopped_early:
            # Rows that failed in an earlier run: score them again and splice them in.
            new_rows: dict[int, str] = {}
            ranges = batch_ranges(earlier_failures, batch_size)
            batches = scored_batches(client, source, ranges, settings.concurrency, version)
            async with aclosing(batches):
                async for result in batches:
                    lines = fmt.rows(source, result)
                    new_rows.update(zip(range(result.start, result.stop), lines, strict=True))
                    tally.add(result)
            replace_rows(output, fmt, new_rows)
    elapsed = time.perf_counter() - started
    ranges_and_messages = sorted(zip(tally.failed_ranges, tally.messages, strict=True))
    stats = ScoreStats(
        tally.rows,
        elapsed,
        version,
        [r for r, _ in ranges_and_messages],
        [m for _, m in ranges_and_messages],
        classes,
    )
    rescored = 0 if stopped_early else len(earlier_failures)
    return JobReport(stats, existing.rows, rescored, classes, stopped_early, batch_size)


# --- for callers holding an array (bench) ---------------------------------------------------


async def score_async(
    target: str,
    images: npt.ArrayLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    model_version: int = 0,
    timeout: float | None = DEFAULT_TIMEOUT,
    credentials: grpc.ChannelCredentials | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    priority: Priority | None = BATCH,
    token: str | None = None,
) -> ScoreStats:
    """Score `images` through the server at `target`; see `score`."""
    source = ArraySource("images", images)
    settings = JobSettings(
        target,
        batch_size,
        concurrency,
        model_version,
        timeout,
        credentials,
        retry,
        priority=priority,
        token=token,
    )
    probabilities = np.full((len(source), NUM_CLASSES), np.nan, np.float32)
    classes = np.full(len(source), -1, np.int64)
    failed_ranges: list[tuple[int, int]] = []
    messages: list[str] = []
    version = model_version
    async with _open_client(settings, batch_size) as client:
        started = time.perf_counter()
        ranges = batch_ranges(range(len(source)), batch_size)
        async for result in scored_batches(client, source, ranges, concurrency, model_version):
            _failure_ranges(result.errors, failed_ranges, messages)
            if result.prediction is not None:
                probabilities[result.start : result.stop] = result.prediction.probabilities
                classes[result.start : result.stop] = result.prediction.classes
                version = version or result.prediction.model_version
        elapsed = time.perf_counter() - started
    return ScoreStats(
        len(source), elapsed, version, failed_ranges, messages, classes, probabilities
    )


def score(
    target: str,
    images: npt.ArrayLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    concurrency: int = DEFAULT_CONCURRENCY,
    **options: Any,
) -> ScoreStats:
    """Classify every image through the server at `target`, `concurrency` requests of
    `batch_size` images in flight; failed batches are listed in `failed_ranges`, their
    rows are -1 in `classes` and NaN in `probabilities`. Timing covers the RPCs only
    (not channel set-up). Options: model_version, timeout, credentials, retry, priority
    (the calls' class, "batch" unless told), token (the server's API key)."""
    return asyncio.run(
        score_async(target, images, batch_size=batch_size, concurrency=concurrency, **options)
    )
