"""The Ray Data engine: the scoring job over many shards, many servers and a Ray cluster.

    shards (Parquet, .npy, .npz, image folders; local, s3://, gs://, ...)
      -> a Ray Data dataset with one row per shard still to do
      -> map_batches on an actor pool: each actor reads its shard, scores it through the
         servers (one async client over every target, `concurrency` requests in flight), writes
         the shard's Parquet output beside its final name and renames it there
      -> one status row per shard back to the driver -> the summary

Exactly once: the unit of work is the shard, and a shard's output appears whole under a
deterministic name or not at all. A rerun lists the output folder and skips the shards
already there, so a driver killed at any point and started again ends with every input
row exactly once. Ray Data restarts a dead actor and retries its shard; the retry writes
the same rows under the same name. A job pins one model version (`_job.json`, written at
the first start), so its output never mixes versions, reruns included.

Ray is imported only inside `run_ray_job` and the actor: the client library never needs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    tls_credentials,
)
from ..errors import InputFileError, NotFound, Unavailable
from ..inputs import ArraySource
from ..tracing import attached, trace_metadata
from .outputs import RequestIds, prediction_table
from .pipeline import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, batch_ranges, scored_batches
from .report import confusion_matrix
from .resume import is_temporary, write_atomically
from .shards import DEFAULT_IMAGES_PER_SHARD, ReadOptions, Shard, list_shards, read_shard, resolve

if TYPE_CHECKING:
    import pyarrow.fs

logger = logging.getLogger(__name__)

MANIFEST = "_job.json"  # pyarrow and Ray Data skip files starting with "_" or "."
METADATA_KEY = b"mnist_serving"  # a shard's counts, in its Parquet footer


@dataclass(frozen=True)
class RayJobSettings:
    targets: tuple[str, ...]  # host:port addresses, or one dns:///name:port
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY  # requests in flight per actor
    actors: int = 0  # 0: one per CPU of the cluster, at most one per shard to do
    model_version: int = 0  # 0: the newest at the job's first start
    timeout: float | None = DEFAULT_TIMEOUT
    retry: RetryPolicy = DEFAULT_RETRY
    tls: bool = False
    root_certificates: bytes | None = None  # PEM; implies TLS
    # PEM, for a server that requires client certificates (mutual TLS); implies TLS. The
    # bytes travel to every actor with the job's settings, so workers need no files.
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    read: ReadOptions = field(default_factory=ReadOptions)
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    address: str | None = None  # an existing cluster; None: a local instance
    num_cpus: int | None = None  # of the local instance (None: all cores)
    progress: bool = True  # Ray Data's progress bars
    priority: Priority | None = BATCH  # the class every call declares (see JobSettings)
    request_ids: bool = False  # columns request_id, request_index (see JobSettings)
    # The server's API key: its value travels to every actor with the job's settings (no
    # token file needed on the workers); kept out of repr, so out of logs and tracebacks.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_priority(self.priority)
        if not self.targets:
            raise ValueError("at least one target is needed")
        if min(self.batch_size, self.concurrency, self.images_per_shard) < 1 or self.actors < 0:
            raise ValueError("batch size, concurrency and images per shard must be at least 1")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")


@dataclass
class ShardOutcome:
    index: int
    output: str
    rows: int  # rows written (0 when the shard failed)
    failed_rows: int  # rows written with an error (unreadable images)
    error: str  # why the shard has no output; "" when it has
    confusion: npt.NDArray[np.int64] | None  # when the shard has labels
    kept: bool = False  # written by an earlier run of the job
    key_type: str = ""  # of its output's key column ("int64", "string"); "" when it has none
    # When its actor began and finished it (time.time(), on the actor's host).
    started: float = 0.0
    finished: float = 0.0


@dataclass
class RayJobReport:
    outcomes: list[ShardOutcome]  # one per shard, in input order
    seconds: float
    model_version: int
    actors: int
    batch_size: int
    output: str

    @property
    def scored(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if not o.kept and not o.error]

    @property
    def kept(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.kept]

    @property
    def failed_shards(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if o.error]

    @property
    def rows(self) -> int:
        """Rows written by this run."""
        return sum(o.rows for o in self.scored)

    @property
    def total_rows(self) -> int:
        return sum(o.rows for o in self.outcomes)

    @property
    def failed_rows(self) -> int:
        return sum(o.failed_rows for o in self.outcomes)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def busy_seconds(self) -> float:
        """From the first shard begun to the last one finished: the job without Ray's
        start-up (the cluster, the actors' processes and imports)."""
        done = [o for o in self.outcomes if not o.kept and o.finished]
        if not done:
            return 0.0
        return max(o.finished for o in done) - min(o.started for o in done)

    @property
    def key_types(self) -> dict[str, int]:
        """Shards written (this run and earlier ones) by the type of their key column."""
        return dict(Counter(o.key_type for o in self.outcomes if o.key_type))

    @property
    def confusion(self) -> npt.NDArray[np.int64] | None:
        """Over every shard written (this run and earlier ones) that has labels."""
        matrices = [o.confusion for o in self.outcomes if o.confusion is not None]
        return np.sum(matrices, axis=0) if matrices else None


# --- the driver ------------------------------------------------------------------------------


def run_ray_job(
    settings: RayJobSettings,
    inputs: Sequence[str],
    output: str,
    *,
    on_start: Callable[[int, int], None] | None = None,
) -> RayJobReport:
    """Score the shards of `inputs` into Parquet shards in the folder `output` (a path or
    a URI); skip those an earlier run of the same job wrote. `on_start(shards to do,
    shards kept)` is called before Ray starts. Shards that fail are reported, not raised."""
    shards = list_shards(inputs, images_per_shard=settings.images_per_shard)
    shown = output
    if "://" not in output:
        output = os.path.abspath(output)  # the actors' working folder may be another
    filesystem, folder = resolve(output)
    filesystem.create_dir(folder, recursive=True)
    wanted = _pinned_version(
        filesystem, folder, shards, settings.model_version, settings.request_ids
    )
    version, batch_size = asyncio.run(_probe(settings, wanted))
    _write_manifest(filesystem, folder, shards, version, inputs, settings.request_ids)

    present = _committed(filesystem, folder)
    kept = [_kept(filesystem, folder, s) for s in shards if s.output in present]
    todo = [s for s in shards if s.output not in present]
    if on_start is not None:
        on_start(len(todo), len(kept))
    started = time.perf_counter()
    outcomes: list[ShardOutcome] = []
    actors = 0
    if todo:
        worker = WorkerSettings(
            targets=settings.targets,
            model_version=version,
            batch_size=batch_size,
            concurrency=settings.concurrency,
            timeout=settings.timeout,
            retry=settings.retry,
            tls=settings.tls,
            root_certificates=settings.root_certificates,
            client_certificate=settings.client_certificate,
            client_key=settings.client_key,
            read=settings.read,
            output=output,
            priority=settings.priority,
            trace_context=trace_metadata(),
            request_ids=settings.request_ids,
            token=settings.token,
        )
        outcomes, actors = _run_on_ray(settings, worker, todo)
    elapsed = time.perf_counter() - started
    everything = sorted(kept + outcomes, key=lambda o: o.index)
    report = RayJobReport(everything, elapsed, version, actors, batch_size, shown)
    if len(report.key_types) > 1:
        # Each shard keeps its input's key type; a reader of the whole folder needs one.
        counts = ", ".join(f"{kind} in {n}" for kind, n in sorted(report.key_types.items()))
        logger.warning(
            "the output's shards have key columns of different types (%s), so %s cannot be "
            "read as one table; score inputs with integer keys into a folder of their own",
            counts,
            shown,
        )
    return report


def _run_on_ray(
    settings: RayJobSettings, worker: WorkerSettings, todo: list[Shard]
) -> tuple[list[ShardOutcome], int]:
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=settings.address,
            num_cpus=settings.num_cpus if settings.address is None else None,
            include_dashboard=False,
            log_to_driver=False,  # workers report through their status rows
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = settings.progress
        context.print_on_execution_start = False
        context.enable_auto_log_stats = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = min(len(todo), settings.actors or max(1, cpus))
        items = [{"shard": json.dumps(s.to_dict())} for s in todo]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardScorer,
            batch_size=1,
            fn_constructor_kwargs={"settings": worker},
            compute=ray.data.ActorPoolStrategy(size=actors),
            # The actors mostly wait on the servers: half a CPU each lets a small
            # machine run one per core beside Ray's own processes.
            num_cpus=0.5,
        )
        outcomes = [_outcome(row) for row in dataset.iter_rows()]
    finally:
        if started_here:
            ray.shutdown()
    return outcomes, actors


async def _probe(settings: RayJobSettings, wanted: int) -> tuple[int, int]:
    """(the version to pin, the batch size) from the first target that answers. Fails fast
    when none is reachable or the version is not served."""
    errors: list[str] = []
    for target in settings.targets:
        async with _client(settings, target, settings.batch_size) as client:
            try:
                metadata = await client.metadata()
            except Unavailable as error:
                errors.append(f"{target}: {error}")
                continue
        served = [v.version for v in metadata.versions]
        version = wanted or metadata.newest_version
        if version not in served:
            raise NotFound(
                f"model version {version} is not served by {target} (it serves "
                f"{', '.join(map(str, served)) or 'none'})",
                grpc.StatusCode.NOT_FOUND,
            )
        limit = metadata.max_images_per_request
        batch_size = settings.batch_size
        if 0 < limit < batch_size:
            logger.warning("batch size %d is over the server's limit; using %d", batch_size, limit)
            batch_size = limit
        return version, batch_size
    raise Unavailable("no target answered: " + "; ".join(errors), grpc.StatusCode.UNAVAILABLE)


def _client(
    settings: RayJobSettings | WorkerSettings, target: str | tuple[str, ...], batch_size: int
) -> AsyncMnistClient:
    credentials = None
    if settings.tls or settings.root_certificates is not None or settings.client_key is not None:
        credentials = tls_credentials(
            settings.root_certificates, settings.client_certificate, settings.client_key
        )
    return AsyncMnistClient(
        target,
        credentials=credentials,
        timeout=settings.timeout,
        max_images_per_request=batch_size,
        retry=settings.retry,
        load_balancing="round_robin" if "".join(target).startswith("dns:") else None,
        priority=settings.priority,
        token=settings.token,
    )


def _pinned_version(
    filesystem: pyarrow.fs.FileSystem,
    folder: str,
    shards: list[Shard],
    wanted: int,
    request_ids: bool = False,
) -> int:
    """The version an earlier start of this job pinned (0 if none); refuses another job's
    folder, a --model-version that differs from the pinned one, or a --request-ids that
    differs from the first start's (one job's shards all have the same columns)."""
    path = f"{folder}/{MANIFEST}"
    try:
        with filesystem.open_input_stream(path) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        return wanted
    except (OSError, ValueError) as error:
        raise InputFileError(f"{path}: unreadable ({error}); score into a new folder") from None
    outputs = [(s["uri"], s["output"]) for s in manifest.get("shards", [])]
    if outputs != [(s.uri, s.output) for s in shards]:
        raise InputFileError(
            f"{folder} holds the output of another job (other inputs); "
            "score into a new folder, or delete it to start over"
        )
    pinned = int(manifest["model_version"])
    if bool(manifest.get("request_ids", False)) != request_ids:
        flag = "with" if manifest.get("request_ids") else "without"
        raise InputFileError(
            f"{folder} was started {flag} --request-ids: rerun it the same way (one job's "
            "shards all have the same columns), or score into a new folder"
        )
    if wanted and wanted != pinned:
        raise InputFileError(
            f"{folder} was started with model version {pinned}, not {wanted}: one job "
            "never mixes versions; score into a new folder"
        )
    return pinned


def _write_manifest(
    filesystem: pyarrow.fs.FileSystem,
    folder: str,
    shards: list[Shard],
    version: int,
    inputs: Sequence[str],
    request_ids: bool = False,
) -> None:
    manifest = {
        "model_version": version,
        "request_ids": request_ids,
        "inputs": list(inputs),
        "shards": [{"uri": s.uri, "output": s.output} for s in shards],
    }
    path = f"{folder}/{MANIFEST}"
    temporary = f"{folder}/.{MANIFEST}.partial"
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(json.dumps(manifest, indent=1).encode())
    filesystem.move(temporary, path)


def _committed(filesystem: pyarrow.fs.FileSystem, folder: str) -> set[str]:
    """Names of the shards already written; removes what killed attempts left half-done."""
    import pyarrow.fs

    names = set()
    for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(folder)):
        name = entry.base_name
        if is_temporary(name):
            filesystem.delete_file(entry.path)
        elif entry.is_file and name.endswith(".parquet"):
            names.add(name)
    return names


def _kept(filesystem: pyarrow.fs.FileSystem, folder: str, shard: Shard) -> ShardOutcome:
    """An earlier run's shard, from the counts in its footer (the rows are not read)."""
    import pyarrow.parquet as pq

    path = f"{folder}/{shard.output}"
    footer = pq.read_metadata(path, filesystem=filesystem)
    counts = json.loads((footer.metadata or {}).get(METADATA_KEY, b"{}"))
    confusion = counts.get("confusion")
    return ShardOutcome(
        shard.index,
        shard.output,
        int(counts.get("rows", 0)),
        int(counts.get("failed_rows", 0)),
        "",
        None if confusion is None else np.array(confusion, np.int64),
        kept=True,
        key_type=str(footer.schema.to_arrow_schema().field("key").type),
    )


def _outcome(row: dict[str, Any]) -> ShardOutcome:
    confusion = np.asarray(row["confusion"], np.int64).reshape(NUM_CLASSES, NUM_CLASSES)
    return ShardOutcome(
        int(row["index"]),
        str(row["output"]),
        int(row["rows"]),
        int(row["failed_rows"]),
        str(row["error"]),
        confusion if bool(row["has_labels"]) else None,
        key_type=str(row["key_type"]),
        started=float(row["started"]),
        finished=float(row["finished"]),
    )


# --- the workers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What each actor needs (plain data: it travels to the cluster pickled)."""

    targets: tuple[str, ...]
    model_version: int
    batch_size: int
    concurrency: int
    timeout: float | None
    retry: RetryPolicy
    tls: bool
    root_certificates: bytes | None
    client_certificate: bytes | None
    client_key: bytes | None
    read: ReadOptions
    output: str
    priority: Priority | None
    # The driver's trace context (OpenTelemetry): the actors' calls join the driver's trace.
    trace_context: tuple[tuple[str, str], ...] = ()
    request_ids: bool = False
    token: str | None = field(default=None, repr=False)  # the server's API key


class ShardFailed(Exception):
    """A shard that could not be scored whole: it gets no output, and a rerun redoes it."""


class ShardScorer:
    """The Ray Data actor: one event loop and one client per target, for the actor's life."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.filesystem, self.folder = resolve(settings.output)
        self.loop = asyncio.new_event_loop()
        self.clients = self.loop.run_until_complete(self._connect())

    async def _connect(self) -> AsyncMnistClient:
        # One client over every target: calls go where the fewest are in flight, and a call
        # that fails on one server is sent to another (see client/routing.py).
        return _client(self.settings, self.settings.targets, self.settings.batch_size)

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        outcomes = [self.score(Shard.from_dict(json.loads(str(text)))) for text in batch["shard"]]
        empty = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        return {
            "index": np.array([o.index for o in outcomes], np.int64),
            "output": np.array([o.output for o in outcomes], object),
            "rows": np.array([o.rows for o in outcomes], np.int64),
            "failed_rows": np.array([o.failed_rows for o in outcomes], np.int64),
            "error": np.array([o.error for o in outcomes], object),
            "has_labels": np.array([o.confusion is not None for o in outcomes]),
            "key_type": np.array([o.key_type for o in outcomes], object),
            "started": np.array([o.started for o in outcomes], np.float64),
            "finished": np.array([o.finished for o in outcomes], np.float64),
            "confusion": np.stack(
                [(empty if o.confusion is None else o.confusion).reshape(-1) for o in outcomes]
            ),
        }

    def score(self, shard: Shard) -> ShardOutcome:
        started = time.time()
        try:
            outcome = self._score(shard)
        except (InputFileError, ShardFailed) as error:
            outcome = ShardOutcome(shard.index, shard.output, 0, 0, str(error), None)
        except Exception as error:  # one shard's surprise must not stop a 100M-row job
            logger.exception("shard %s failed", shard.uri)
            message = f"{shard.uri}: {type(error).__name__}: {error}"
            outcome = ShardOutcome(shard.index, shard.output, 0, 0, message, None)
        outcome.started, outcome.finished = started, time.time()
        return outcome

    def _score(self, shard: Shard) -> ShardOutcome:
        import pyarrow.fs

        path = f"{self.folder}/{shard.output}"
        if self.filesystem.get_file_info(path).type == pyarrow.fs.FileType.File:
            # A retry of a shard whose first attempt was written before its actor died.
            outcome = _kept(self.filesystem, self.folder, shard)
            outcome.kept = False
            return outcome
        data = read_shard(shard, self.settings.read)
        count = len(data.keys)
        classes = np.full(count, -1, np.int64)
        probabilities = np.full((count, NUM_CLASSES), np.nan, np.float32)
        calls = RequestIds(count) if self.settings.request_ids else None
        answered = np.array([i for i in range(count) if i not in data.errors], np.int64)
        if len(answered):
            with attached(self.settings.trace_context):
                found = self.loop.run_until_complete(self._predict(shard, data.images))
            classes[answered], probabilities[answered] = found[:2]
            if calls is not None:
                calls.fill(answered, found[2])
        version = self.settings.model_version
        table = prediction_table(
            data.keys, classes, probabilities, version, data.labels, data.errors, calls
        )
        confusion = None if data.labels is None else confusion_matrix(data.labels, classes)
        counts = {
            "rows": count,
            "failed_rows": len(data.errors),
            "model_version": version,
            "confusion": None if confusion is None else confusion.tolist(),
            "worker": f"{socket.gethostname()}:{os.getpid()}",  # who wrote it, for debugging
        }
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(counts)})
        write_atomically(table, self.filesystem, path)
        key_type = str(table.schema.field("key").type)
        return ShardOutcome(
            shard.index, shard.output, count, len(data.errors), "", confusion, key_type=key_type
        )

    async def _predict(
        self, shard: Shard, images: npt.NDArray[np.uint8] | npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], RequestIds]:
        classes = np.empty(len(images), np.int64)
        probabilities = np.empty((len(images), NUM_CLASSES), np.float32)
        calls = RequestIds(len(images))
        source = ArraySource(shard.uri, images)
        ranges = batch_ranges(range(len(images)), self.settings.batch_size)
        version = self.settings.model_version
        batches = scored_batches(self.clients, source, ranges, self.settings.concurrency, version)
        async with aclosing(batches):
            async for result in batches:
                if result.prediction is None:
                    first = min(result.errors)
                    raise ShardFailed(
                        f"{shard.uri}: rows {result.start}-{result.stop - 1}: "
                        f"{result.errors[first]}; the shard was not written, rerun the job "
                        "to redo it"
                    )
                classes[result.start : result.stop] = result.prediction.classes
                probabilities[result.start : result.stop] = result.prediction.probabilities
                calls.put(result.start, result.prediction)
        return classes, probabilities, calls


def summary_lines(report: RayJobReport) -> list[str]:
    """The summary's stdout lines (the CLI adds the accuracy and the confusion matrix)."""
    lines = []
    if report.kept:
        kept_rows = sum(o.rows for o in report.kept)
        lines.append(f"kept {len(report.kept)} shards ({kept_rows} rows) from an earlier run")
    if not report.scored and not report.failed_shards:
        lines.append(f"nothing left to score: {report.output} has every shard")
    else:
        rate = report.images_per_second
        busy = report.rows / report.busy_seconds if report.busy_seconds > 0 else 0.0
        lines.append(
            f"scored {report.rows} images in {len(report.scored)} shards in "
            f"{report.seconds:.2f} s ({rate:.0f} images/s; {busy:.0f} after Ray's start-up; "
            f"{report.actors} actors, batches of {report.batch_size}), model version "
            f"{report.model_version}; "
            f"{report.failed_rows} failed rows, {len(report.failed_shards)} failed shards "
            f"-> {report.output}"
        )
    return lines
