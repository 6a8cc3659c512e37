"""Which model versions are served: load them, switch between them, unload them.

The model dir follows TensorFlow Serving's layout, <model_dir>/<version>/, version a
positive integer. Names that are not integers (the trainer's hidden temporary folders)
are never looked at. A scan loads the versions the policy wants on the loader thread,
warms them up, and only then makes them visible, in one assignment; a version that fails
to load is logged, counted and kept out while the others keep serving, and is tried again
only once something in its folder changes. A version that leaves the policy is first
hidden from new requests, then unloaded once the requests that already hold it are done.

When the dir holds no loadable version at all (every folder removed, or only broken
ones), the newest version already loaded keeps serving and a warning is logged:
availability over mirroring the disk. TensorFlow Serving would go empty instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.contract import SIGNATURES, version_dirs

from . import metrics
from .batcher import Batcher, check_deadline, run_inline, run_model
from .call_context import ONLINE, Priority
from .errors import ModelNotFound
from .runtimes import Model, Prediction, RuntimeUnavailable, import_runtime, load_model
from .settings import Settings

logger = logging.getLogger(__name__)
Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(eq=False)
class ServedVersion:
    """A loaded version and the way requests reach it (a batcher per input dtype, or none)."""

    model: Model
    executor: Executor
    # Keyed by np.dtype, not its name: dtype.name is computed in Python on every access.
    batchers: dict[np.dtype, Batcher] = field(default_factory=dict)
    _in_flight: int = field(default=0, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def predict(
        self, images: np.ndarray, deadline: float | None, priority: Priority = ONLINE
    ) -> Prediction:
        # Counted so that an unload waits for every request that already holds this
        # version, batched or not, before the model is released.
        self._in_flight += 1
        self._idle.clear()
        try:
            batcher = self.batchers.get(images.dtype)
            if batcher is not None:
                return await batcher.submit(images, deadline, priority)
            check_deadline(deadline)
            if len(images) <= self.model.inline_max_images:
                return run_inline(self.model.predict, images, traced=True)
            return await run_model(self.model.predict, self.executor, images, traced=True)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def drain(self) -> None:
        """Wait for the requests in flight on this version, then stop its batchers."""
        await self._idle.wait()
        await asyncio.gather(*(batcher.close() for batcher in self.batchers.values()))

    def release(self) -> None:
        """Drop the references to the model (batchers hold its predict method), after drain."""
        self.batchers.clear()
        self.model.release()


def wanted(available: Iterable[int], settings: Settings) -> tuple[list[int], int]:
    """The versions the policy admits, newest first, and how many of them to serve.

    Versions are tried in this order until that many have loaded, so a version that
    fails to load makes room for the next older one.
    """
    candidates = sorted(set(available), reverse=True)
    if settings.version_policy == "specific":
        candidates = [v for v in candidates if v in settings.versions]
    if settings.version_policy == "latest":
        return candidates, settings.num_latest
    return candidates, len(candidates)


def admits(version: int, settings: Settings) -> bool:
    return settings.version_policy != "specific" or version in settings.versions


class ModelRegistry:
    def __init__(
        self, settings: Settings, inference: Executor, batch_inference: Executor | None = None
    ) -> None:
        self.settings = settings
        self.name = settings.model_name
        self._inference = inference
        self._batch_inference = batch_inference or inference  # batch-class chunks
        # Loading runs beside inference, never in its way.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._loading: Path | None = None  # set by the loader thread itself
        self._served: dict[int, ServedVersion] = {}
        self._failed: dict[int, Fingerprint | None] = {}  # version -> its folder when it failed
        self._kept: int | None = None  # the version kept although its folder is gone
        self._retiring: set[asyncio.Task[None]] = set()
        self._refresh_lock = asyncio.Lock()
        self._runtime_ready = False
        self._closed = False

    @property
    def served(self) -> list[ServedVersion]:
        """Loaded versions, newest first."""
        return [self._served[v] for v in sorted(self._served, reverse=True)]

    @property
    def loaded_any(self) -> bool:
        """Whether any version is loaded (per request: no list is built)."""
        return bool(self._served)

    @property
    def loading(self) -> bool:
        """A load is running on the loader thread (possibly one nobody waits for any more)."""
        return self._loading is not None

    def report_of(self, version: int) -> dict[str, Any]:
        """A loaded version's training report (its metrics.json); {} when it is not loaded."""
        served = self._served.get(version)
        return {} if served is None else served.model.report or {}

    def resolve(self, name: str, version: int) -> ServedVersion:
        """The version a request addresses: `version` 0 means the newest loaded one."""
        if name and name != self.name:
            raise ModelNotFound(f"no model named {name!r}; this server serves {self.name!r}")
        served = self._served  # one read: a concurrent switch cannot tear it
        if version == 0 and served:
            return served[max(served)]
        if version in served:
            return served[version]
        loaded = ", ".join(str(v) for v in sorted(served, reverse=True)) or "none"
        raise ModelNotFound(f"version {version} of {self.name!r} is not loaded (loaded: {loaded})")

    async def refresh(self) -> None:
        """Scan the model dir once and bring the served set in line with the policy."""
        async with self._refresh_lock:
            if self._closed:
                return
            await self._prepare_runtime()
            on_disk = version_dirs(self.settings.model_dir)
            for version in self._failed.keys() - on_disk.keys():
                del self._failed[version]  # a folder that comes back is a new folder
            candidates, limit = wanted(
                (v for v, p in on_disk.items() if not self._failed_unchanged(v, p)),
                self.settings,
            )
            current = self._served
            chosen: dict[int, ServedVersion] = {}
            for version in candidates:
                if len(chosen) >= limit:
                    break
                if version in current:
                    chosen[version] = current[version]
                    continue
                loaded = await self._load(version, on_disk[version])
                if self._closed:  # shut down meanwhile: nobody will serve it
                    if loaded is not None:
                        loaded.release()
                    return
                if loaded is not None:
                    chosen[version] = loaded
            if not chosen:
                chosen = self._keep_last(current)
            else:
                self._kept = None
            if chosen.keys() == current.keys():
                return
            self._switch(current, chosen)

    def _failed_unchanged(self, version: int, path: Path) -> bool:
        return version in self._failed and self._failed[version] == _fingerprint(path)

    def _keep_last(self, current: dict[int, ServedVersion]) -> dict[int, ServedVersion]:
        """Nothing loadable on disk: keep the newest loaded version the policy admits."""
        keep = max((v for v in current if admits(v, self.settings)), default=None)
        if keep is None:
            return {}
        if self._kept != keep:
            self._kept = keep
            logger.warning(
                "no loadable version in the model dir; still serving the last loaded one",
                extra={"version": keep, "model_dir": str(self.settings.model_dir)},
            )
        return {keep: current[keep]}

    def _switch(self, current: dict[int, ServedVersion], chosen: dict[int, ServedVersion]) -> None:
        self._served = chosen  # the switch: one assignment, seen whole by every request
        for version in chosen.keys() - current.keys():
            runtime = chosen[version].model.runtime
            metrics.MODEL_VERSION.labels(self.name, str(version), runtime).set(1)
            metrics.MODEL_LOAD_SECONDS.labels(str(version)).set(chosen[version].model.load_seconds)
        for version in current.keys() - chosen.keys():
            _remove_series(current[version], self.name)
            task = asyncio.get_running_loop().create_task(
                self._retire(current[version]), name=f"retire-{version}"
            )
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        logger.info(
            "serving versions",
            extra={
                "versions": sorted(chosen, reverse=True),
                "previous": sorted(current, reverse=True),
            },
        )

    async def _retire(self, served: ServedVersion) -> None:
        """Unload a version no request can reach any more, once its last request is done."""
        started = time.perf_counter()
        version = served.version
        await served.drain()
        served.release()
        del served
        # TensorFlow's objects hold reference cycles: without a collection, an unloaded
        # model's graph and weights wait for the next full collection, which may be many
        # reloads away. The heap frozen at start-up keeps this pass to milliseconds.
        collect_started = time.perf_counter()
        gc.collect()
        logger.info(
            "version unloaded",
            extra={
                "version": version,
                "drain_seconds": round(collect_started - started, 3),
                "gc_seconds": round(time.perf_counter() - collect_started, 3),
            },
        )

    async def _prepare_runtime(self) -> None:
        if self._runtime_ready:
            return
        await asyncio.get_running_loop().run_in_executor(
            self._loader, import_runtime, self.settings.runtime, self.settings.verbose_tensorflow
        )
        # What exists now (grpc, TensorFlow when --runtime tensorflow imported it: ~300k
        # objects) lives as long as the process.
        # Freezing it takes it out of every later collection: a full gc.collect() after an
        # unload then takes milliseconds instead of ~0.4 s that stalls every request. The
        # models are loaded after this point, so their memory can still be collected.
        gc.collect()
        gc.freeze()
        self._runtime_ready = True

    async def _load(self, version: int, path: Path) -> ServedVersion | None:
        logger.info("loading version", extra={"version": version, "path": str(path)})
        model: Model | None = None
        try:
            model = await asyncio.get_running_loop().run_in_executor(
                self._loader, self._load_on_thread, version, path
            )
        except RuntimeUnavailable as error:
            self._failed[version] = _fingerprint(path)
            metrics.MODEL_LOAD_FAILURES.inc()
            logger.error(
                "version not served: this server cannot run it; kept out until its folder changes",
                extra={"version": version, "path": str(path), "reason": str(error)},
            )
        except Exception as error:
            self._failed[version] = _fingerprint(path)
            metrics.MODEL_LOAD_FAILURES.inc()
            logger.error(
                "version failed to load; kept out until its folder changes",
                extra={"version": version, "path": str(path), "error": _one_line(error)},
            )
        if model is None:
            gc.collect()  # the error's traceback held what was loaded before it failed
            return None
        served = ServedVersion(model, self._inference)
        if self.settings.batching:
            for dtype in SIGNATURES:
                served.batchers[np.dtype(dtype)] = Batcher(
                    model.predict,
                    self._inference,
                    max_batch_size=self.settings.max_batch_size,
                    timeout=self.settings.batch_timeout_ms / 1000,
                    max_queued_images=self.settings.max_queued_images,
                    inline_max_images=model.inline_max_images,
                    max_queued_batch_images=self.settings.max_queued_batch_images,
                    batch_chunk_images=self.settings.batch_chunk_images,
                    batch_every=self.settings.batch_every,
                    batch_executor=self._batch_inference,
                )
        logger.info(
            "version loaded",
            extra={
                "version": version,
                "runtime": model.runtime,
                "load_seconds": round(model.load_seconds, 3),
            },
        )
        return served

    def _load_on_thread(self, version: int, path: Path) -> Model:
        self._loading = path
        try:
            return load_model(
                path, self.name, version, self.settings.runtime, self.settings.verbose_tensorflow
            )
        finally:
            self._loading = None

    async def poll(self) -> None:
        """Rescan every poll_interval seconds until cancelled."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.refresh()
            except Exception:
                logger.exception("scanning the model dir failed")

    async def close(self) -> None:
        """Stop serving: finish the requests in flight, unload everything, never wait for
        a load in progress (it cannot be interrupted; see `loading`)."""
        self._closed = True
        served, self._served = self._served, {}
        for unserved in served.values():
            _remove_series(unserved, self.name)
        await asyncio.gather(*(s.drain() for s in served.values()), *self._retiring)
        for unloaded in served.values():
            unloaded.release()
        self._loader.shutdown(wait=False, cancel_futures=True)


def _remove_series(served: ServedVersion, name: str) -> None:
    version = str(served.version)
    for gauge, labels in (
        (metrics.MODEL_VERSION, (name, version, served.model.runtime)),
        (metrics.MODEL_LOAD_SECONDS, (version,)),
    ):
        with contextlib.suppress(KeyError):  # never set, or removed already
            gauge.remove(*labels)


def _fingerprint(path: Path) -> Fingerprint | None:
    """What changes when anything in a version folder is rewritten, added or replaced.

    The folder's own mtime misses a file rewritten in place (variables/, saved_model.pb).
    """
    try:
        entries = [path, *sorted(path.rglob("*"))]
        return tuple(
            (str(p.relative_to(path)), s.st_ino, s.st_mtime_ns, s.st_size)
            for p, s in ((p, p.stat()) for p in entries)
        )
    except OSError:
        return None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
