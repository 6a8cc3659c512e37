"""Which model versions are served: load them, switch between them, unload them.

The model dir follows TensorFlow Serving's layout, <model_dir>/<version>/, version a
positive integer. Names that are not integers (the trainer's hidden temporary folders)
are never looked at. A scan loads the versions the policy wants in the background, warms
them up, and only then makes them visible, in one assignment; a version that fails to
load is logged, counted and kept out while the others keep serving. A version that leaves
the policy is first hidden from new requests, then unloaded once its queue has drained.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .batcher import Batcher, run_model
from .errors import DeadlineExpired, ModelNotFound
from .model import SIGNATURES, LoadedModel, Prediction, load_model
from .settings import Settings

logger = logging.getLogger(__name__)
_VERSION = re.compile(r"^[1-9][0-9]*$")


@dataclass
class ServedVersion:
    """A loaded version and the way requests reach it (a batcher per input dtype, or none)."""

    model: LoadedModel
    executor: Executor
    batchers: dict[str, Batcher] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.model.version

    async def predict(self, images: np.ndarray, deadline: float | None) -> Prediction:
        batcher = self.batchers.get(images.dtype.name)
        if batcher is not None:
            return await batcher.submit(images, deadline)
        if deadline is not None and deadline <= time.monotonic():
            metrics.DEADLINE_DROPS.inc()
            raise DeadlineExpired("the deadline passed before the model could run")
        return await run_model(self.model.predict, self.executor, images)

    async def close(self) -> None:
        await asyncio.gather(*(batcher.close() for batcher in self.batchers.values()))


def versions_on_disk(model_dir: Path) -> dict[int, Path]:
    if not model_dir.is_dir():
        return {}
    return {int(p.name): p for p in model_dir.iterdir() if _VERSION.match(p.name) and p.is_dir()}


class ModelRegistry:
    def __init__(self, settings: Settings, inference: Executor) -> None:
        self.settings = settings
        self.name = settings.model_name
        self._inference = inference
        # Loading runs beside inference, never in its way.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self._served: dict[int, ServedVersion] = {}
        self._failed: dict[int, float] = {}  # version -> folder mtime when it failed
        self._refresh_lock = asyncio.Lock()

    @property
    def served(self) -> list[ServedVersion]:
        """Loaded versions, newest first."""
        return [self._served[v] for v in sorted(self._served, reverse=True)]

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
            on_disk = versions_on_disk(self.settings.model_dir)
            candidates = sorted(
                (v for v, path in on_disk.items() if self._failed.get(v) != _mtime(path)),
                reverse=True,
            )
            policy = self.settings.version_policy
            if policy == "specific":
                candidates = [v for v in candidates if v in self.settings.versions]
            limit = self.settings.num_latest if policy == "latest" else len(candidates)
            current = self._served
            chosen: dict[int, ServedVersion] = {}
            for version in candidates:  # newest first: a failed one makes room for an older one
                if len(chosen) >= limit:
                    break
                served = current.get(version) or await self._load(version, on_disk[version])
                if served is not None:
                    chosen[version] = served
            if chosen.keys() == current.keys():
                return
            self._served = chosen  # the switch: one assignment, seen whole by every request
            logger.info("serving versions", extra={"versions": sorted(chosen, reverse=True)})
            for version in current.keys() - chosen.keys():
                await self._unload(version, current[version])

    async def _load(self, version: int, path: Path) -> ServedVersion | None:
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                self._loader,
                lambda: load_model(path, self.name, version, self.settings.verbose_tensorflow),
            )
        except Exception as error:
            self._failed[version] = _mtime(path)
            metrics.MODEL_LOAD_FAILURES.inc()
            logger.error(
                "version failed to load; kept out",
                extra={"version": version, "path": str(path), "error": _one_line(error)},
            )
            return None
        served = ServedVersion(model, self._inference)
        if self.settings.batching:
            for dtype in SIGNATURES:
                served.batchers[dtype] = Batcher(
                    model.predict,
                    self._inference,
                    max_batch_size=self.settings.max_batch_size,
                    timeout=self.settings.batch_timeout_ms / 1000,
                    max_queued_images=self.settings.max_queued_images,
                )
        metrics.MODEL_VERSION.labels(self.name, str(version)).set(1)
        metrics.MODEL_LOAD_SECONDS.labels(str(version)).set(model.load_seconds)
        logger.info(
            "version loaded",
            extra={"version": version, "load_seconds": round(model.load_seconds, 3)},
        )
        return served

    async def _unload(self, version: int, served: ServedVersion) -> None:
        await served.close()
        metrics.MODEL_VERSION.remove(self.name, str(version))
        metrics.MODEL_LOAD_SECONDS.remove(str(version))
        logger.info("version unloaded", extra={"version": version})

    async def poll(self) -> None:
        """Rescan every poll_interval seconds until cancelled."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.refresh()
            except Exception:
                logger.exception("scanning the model dir failed")

    async def close(self) -> None:
        served, self._served = self._served, {}
        await asyncio.gather(*(s.close() for s in served.values()))
        self._loader.shutdown(wait=False)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
