"""The version registry on its own: a fake loader instead of TensorFlow, folders in tmp_path."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from prometheus_client import REGISTRY

from mnist_serving.contract import version_dirs
from mnist_serving.server import versions
from mnist_serving.server.errors import ModelNotFound
from mnist_serving.server.runtimes.tensorflow import LoadedModel
from mnist_serving.server.settings import Settings
from mnist_serving.server.versions import ModelRegistry, wanted


class FakeLoader:
    """Loads any folder holding `model.txt`; the answer of every image is the version."""

    def __init__(self) -> None:
        self.loads: list[int] = []
        self.gate = threading.Event()  # cleared: loads block until it is set
        self.gate.set()
        self.slow_predict = threading.Event()  # cleared: predictions block until set
        self.slow_predict.set()

    def __call__(
        self, path: Path, name: str, version: int, runtime: str = "auto", verbose: bool = False
    ) -> LoadedModel:
        self.gate.wait(10)
        self.loads.append(version)
        if (path / "model.txt").read_text() != "ok":
            raise ValueError(f"{path} is broken")

        def function(images: np.ndarray) -> dict[str, Any]:
            self.slow_predict.wait(10)
            classes = np.full(len(images), version, dtype=np.int64)
            return {
                "probabilities": _Eager(np.eye(10, dtype=np.float32)[classes]),
                "classes": _Eager(classes),
            }

        functions = {"uint8": function, "float32": function}
        return LoadedModel(name, version, path, 0.01, {}, _functions=functions, _saved=object())


class _Eager:
    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def numpy(self) -> np.ndarray:
        return self.value


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
    fake = FakeLoader()
    monkeypatch.setattr(versions, "load_model", fake)
    # No TensorFlow to import, and the test process's heap is not ours to freeze.
    monkeypatch.setattr(versions, "import_runtime", lambda runtime, verbose: None)
    monkeypatch.setattr(gc, "freeze", lambda: None)
    return fake


@pytest.fixture
def inference() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1)
    yield executor
    executor.shutdown(wait=False)


def write_version(model_dir: Path, version: int, content: str = "ok") -> Path:
    folder = model_dir / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.txt").write_text(content)
    return folder


def make_registry(
    model_dir: Path, inference: ThreadPoolExecutor, **overrides: Any
) -> ModelRegistry:
    settings = Settings(model_dir=model_dir, **{"poll_interval": 0, **overrides})
    return ModelRegistry(settings, inference)


def served_versions(registry: ModelRegistry) -> list[int]:
    return [s.version for s in registry.served]


def failures() -> float:
    return REGISTRY.get_sample_value("mnist_model_load_failures_total") or 0.0


def version_info(version: int) -> float | None:
    labels = {"name": "mnist", "version": str(version), "runtime": "tensorflow"}
    value: float | None = REGISTRY.get_sample_value("mnist_model_version_info", labels)
    return value


async def predict(registry: ModelRegistry, version: int = 0) -> int:
    served = registry.resolve("", version)
    result = await served.predict(np.zeros((2, 28, 28), dtype=np.uint8), None)
    return int(result.classes[0])


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, ([5, 3, 2, 1], 1)),
        ({"num_latest": 2}, ([5, 3, 2, 1], 2)),
        ({"version_policy": "all"}, ([5, 3, 2, 1], 4)),
        ({"version_policy": "specific", "versions": [1, 3, 9]}, ([3, 1], 2)),
    ],
)
def test_the_policy_orders_and_limits_the_versions(
    tmp_path: Path, policy: dict[str, Any], expected: tuple[list[int], int]
) -> None:
    settings = Settings(model_dir=tmp_path, **policy)
    assert wanted([2, 5, 1, 3, 3], settings) == expected


def test_only_positive_integer_folders_are_versions(tmp_path: Path) -> None:
    for name in ("1", "12", ".tmp-4-xyz", "0", "03", "4.tmp", "-5", "6 ", "٣"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a folder")
    assert sorted(version_dirs(tmp_path)) == [1, 12]
    assert version_dirs(tmp_path / "missing") == {}


async def test_latest_serves_the_newest_and_a_broken_one_makes_room(
    tmp_path: Path, loader: FakeLoader, inference: ThreadPoolExecutor
) -> None:
    for version in (1, 2, 3):
        write_version(tmp_path, version)
    write_version(tmp_path, 4, "garbage")
    registry = make_registry(tmp_path, inference, num_latest=2)
    before = failures()
    await registry.refresh()
    assert served_versions(registry) == [3, 2]
    assert failures() == before + 1
    assert await predict(registry) == 3
    assert await predict(registry, 2) == 2
    with pytest.raises(ModelNotFound, match=r"loaded: 3, 2"):
        registry.resolve("", 1)
    await registry.close()


async def test_a_broken_version_is_retried_only_when_its_folder_changes(
    tmp_path: Path, loader: FakeLoader, inference: ThreadPoolExecutor
) -> None:
    write_version(tmp_path, 1)
    broken = write_version(tmp_path, 2, "garbage")
    registry = make_registry(tmp_path, inference)
    before = failures()
    for _ in range(3):
        await registry.refresh()
    assert loader.loads == [2, 1]
    assert failures() == before + 1
    assert served_versions(registry) == [1]

    # Rewritten in place: the folder's own mtime does not move, its file's does.
    folder_mtime = broken.stat().st_mtime_ns
    (broken / "model.txt").write_text("still garbage, longer")
    assert broken.stat().st_mtime_ns == folder_mtime
    await registry.refresh()
    assert loader.loads == [2, 1, 2]
    assert failures() == before + 2

    (broken / "model.txt").write_text("ok")
    await registry.refresh()
    assert served_versions(registry) == [2]
    assert failures() == before + 2
    await registry.close()


async def test_with_nothing_loadable_left_the_last_version_keeps_serving(
    tmp_path: Path,
    loader: FakeLoader,
    inference: ThreadPoolExecutor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for version in (1, 2):
        write_version(tmp_path, version)
    registry = make_registry(tmp_path, inference, version_policy="all")
    await registry.refresh()
    assert served_versions(registry) == [2, 1]
    for version in (1, 2):
        (tmp_path / str(version) / "model.txt").unlink()
        (tmp_path / str(version)).rmdir()
    write_version(tmp_path, 3, "garbage")  # nor does a broken one count
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        for _ in range(3):
            await registry.refresh()
    assert served_versions(registry) == [2]
    assert await predict(registry) == 2
    warnings = [r for r in caplog.records if "still serving the last" in r.getMessage()]
    assert len(warnings) == 1  # once, not on every scan
    assert version_info(2) == 1
    assert version_info(1) is None

    write_version(tmp_path, 4)
    await registry.refresh()
    assert served_versions(registry) == [4]
    await registry.close()


@pytest.mark.parametrize("batching", [True, False])
async def test_an_unloaded_version_finishes_its_requests_before_it_is_released(
    tmp_path: Path, loader: FakeLoader, inference: ThreadPoolExecutor, batching: bool
) -> None:
    write_version(tmp_path, 1)
    registry = make_registry(tmp_path, inference, batching=batching)
    await registry.refresh()
    old = registry.served[0]
    loader.slow_predict.clear()
    in_flight = asyncio.ensure_future(predict(registry))
    await wait_until(lambda: old.in_flight == 1)

    write_version(tmp_path, 2)
    await registry.refresh()  # the fake loader does not warm up: v1's call is still running
    assert served_versions(registry) == [2]
    assert version_info(1) is None
    await asyncio.sleep(0.05)
    assert (
        cast(LoadedModel, old.model)._saved is not None
    )  # hidden from new requests, not yet released
    loader.slow_predict.set()
    assert await in_flight == 1  # finished on the version it started on
    await wait_until(lambda: cast(LoadedModel, old.model)._saved is None)
    assert old.batchers == {}
    assert version_info(2) == 1
    await registry.close()


async def test_close_does_not_wait_for_a_load_in_progress(
    tmp_path: Path, loader: FakeLoader, inference: ThreadPoolExecutor
) -> None:
    write_version(tmp_path, 1)
    registry = make_registry(tmp_path, inference, poll_interval=0.05)
    await registry.refresh()
    loader.gate.clear()
    write_version(tmp_path, 2)
    poller = asyncio.ensure_future(registry.poll())
    await wait_until(lambda: registry.loading)
    poller.cancel()
    started = time.monotonic()
    await asyncio.wait_for(registry.close(), 2)
    assert time.monotonic() - started < 1
    assert registry.loading
    assert served_versions(registry) == []
    loader.gate.set()
    await wait_until(lambda: not registry.loading)
    await registry.refresh()  # closed: stays empty
    assert served_versions(registry) == []
