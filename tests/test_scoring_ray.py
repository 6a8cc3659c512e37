"""The Ray Data scoring engine (`mnist-client score --engine ray`) on a local Ray instance
against real servers: every row exactly once, through a killed driver and a killed worker.

One Ray instance serves the whole module (2 CPUs); CLI runs in subprocesses join it with
--address, as a driver joins a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mnist_serving.client.__main__ import main
from mnist_serving.client.errors import InputFileError
from mnist_serving.client.scoring import score
from mnist_serving.client.scoring.ray import RayJobReport, RayJobSettings, run_ray_job
from mnist_serving.client.scoring.shards import (
    ReadOptions,
    list_shards,
    npz_to_parquet,
    read_shard,
)

from .certs import make_files, write
from .fake_server import expected, running_fake_server
from .support import ServerProcess

ray = pytest.importorskip(
    "ray", reason='the Ray engine needs the ray extra: pip install "mnist-serving[ray]"'
)
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WAIT = 120  # seconds: generous bounds on waits that end on an event, never on timing


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 << 20,
        logging_level="ERROR",
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def mnist_arrays(mnist_path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The 70k MNIST images (train, then test), their keys and labels."""
    with np.load(mnist_path) as data:
        images = np.concatenate([data["x_train"], data["x_test"]])
        labels = np.concatenate([data["y_train"], data["y_test"]]).astype(np.int64)
        keys = [f"train/{i}" for i in range(len(data["x_train"]))]
        keys += [f"test/{i}" for i in range(len(data["x_test"]))]
    return keys, images, labels


@pytest.fixture(scope="module")
def eight_shards(mnist_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shards8")
    npz_to_parquet(str(mnist_path), str(folder), shards=8)
    return folder


@pytest.fixture(scope="module")
def scored_eight(
    ray_address: str,
    served_trained: ServerProcess,
    eight_shards: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[RayJobReport, Path]:
    """One uninterrupted job over the eight shards: the reference the other runs match."""
    output = tmp_path_factory.mktemp("scored8")
    settings = job(served_trained.target, actors=2)
    return run_ray_job(settings, [str(eight_shards)], str(output)), output


def read_output(folder: Path) -> dict[str, np.ndarray]:
    """The output folder as one table (pyarrow skips _job.json and the _scores files)."""
    table = pq.read_table(folder).sort_by("key")
    columns: dict[str, np.ndarray] = {
        name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names
    }
    empty = np.full(10, np.nan, np.float32)
    columns["probabilities"] = np.stack(
        [empty if p is None else p for p in columns["probabilities"]]
    )
    return columns


def committed(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.parquet"))


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def cli_process(*args: object, temporary: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_serving.client", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},  # where Ray's log goes
    )


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's Ray log (kept when a job fails) lands in the test's own folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def job(target: str | tuple[str, ...], **options: object) -> RayJobSettings:
    targets = (target,) if isinstance(target, str) else target
    return RayJobSettings(targets=targets, progress=False, **options)  # type: ignore[arg-type]


# --- reading shards (pyarrow only) ----------------------------------------------------------


def test_shard_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    flat = images.reshape(5, -1)
    tables = {
        "binary": pa.table({"image": pa.array([r.tobytes() for r in flat], pa.binary())}),
        "fixed": pa.table({"image": pa.array([r.tobytes() for r in flat], pa.binary(784))}),
        "list": pa.table(
            {"image": pa.array(flat.tolist(), pa.list_(pa.uint8())), "label": [1] * 5}
        ),
        "floats": pa.table({"image": pa.array((flat / 255).tolist(), pa.list_(pa.float32()))}),
    }
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    np.save(tmp_path / "a.npy", images)
    np.savez(tmp_path / "b.npz", x_test=images, y_test=np.arange(5))
    shards = list_shards([str(tmp_path)])
    assert [s.kind for s in shards] == ["npy", "npz", "parquet", "parquet", "parquet", "parquet"]
    assert [s.output for s in shards][:3] == [
        "00000-a.parquet",
        "00001-b.parquet",
        "00002-binary.parquet",
    ]
    for shard in shards:
        data = read_shard(shard, ReadOptions())
        pixels = data.images.reshape(5, -1)
        if data.images.dtype == np.float32:
            pixels = np.rint(pixels * 255).astype(np.uint8)
        np.testing.assert_array_equal(pixels, flat, err_msg=shard.uri)
        assert data.keys[0] == f"{shard.uri}#0"
    assert read_shard(shards[1], ReadOptions()).labels.tolist() == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    assert read_shard(shards[5], ReadOptions()).labels.tolist() == [1] * 5  # type: ignore[union-attr]
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty" / "e.parquet")
    empty = read_shard(list_shards([str(tmp_path / "empty")])[0], ReadOptions())
    assert empty.keys == []
    assert empty.images.shape == (0, 784)


def test_key_columns_of_any_integer_width_read_as_int64(tmp_path: Path) -> None:
    image = pa.array([bytes(784)] * 3, pa.binary())
    pq.write_table(pa.table({"key": pa.array([7, 8, 9], pa.uint16()), "image": image}),
                   tmp_path / "narrow.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": pa.array([1, None, 3]), "image": image}),
                   tmp_path / "holes.parquet")  # fmt: skip
    pq.write_table(pa.table({"key": pa.array([2**64 - 1, 0, 1], pa.uint64()), "image": image}),
                   tmp_path / "huge.parquet")  # fmt: skip
    shards = {Path(s.uri).stem: s for s in list_shards([str(tmp_path)])}
    narrow, holes, huge = shards["narrow"], shards["holes"], shards["huge"]
    keys = read_shard(narrow, ReadOptions()).keys
    assert isinstance(keys, np.ndarray)
    assert keys.dtype == np.int64
    assert keys.tolist() == [7, 8, 9]
    with pytest.raises(InputFileError, match=r"holes\.parquet: column 'key' has 1 empty keys"):
        read_shard(holes, ReadOptions())
    with pytest.raises(InputFileError, match=r"huge\.parquet: column 'key' holds keys beyond"):
        read_shard(huge, ReadOptions())


def test_importing_the_engine_needs_neither_ray_nor_pyarrow() -> None:
    code = (
        "import sys, mnist_serving.client.__main__, mnist_serving.client.scoring.ray;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow'));"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- the job ----------------------------------------------------------------------------------


def test_70k_rows_each_once_with_the_plain_scorers_accuracy(
    served_trained: ServerProcess,
    scored_eight: tuple[RayJobReport, Path],
    mnist_arrays: tuple[list[str], np.ndarray, np.ndarray],
) -> None:
    keys, images, labels = mnist_arrays
    report, output = scored_eight
    assert not report.failed_shards
    assert report.failed_rows == 0
    assert report.rows == 70_000
    assert len(report.scored) == 8
    assert report.model_version == 1

    out = read_output(output)
    assert len(out["key"]) == 70_000
    assert len(set(out["key"])) == 70_000  # each key exactly once
    order = np.argsort(keys)
    np.testing.assert_array_equal(out["key"], np.array(keys)[order])
    np.testing.assert_array_equal(out["label"], labels[order])
    assert set(out["model_version"]) == {1}
    assert all(e is None for e in out["error"])

    plain = score(served_trained.target, images)
    assert plain.failed == 0
    ray_accuracy = float((out["class"] == out["label"]).mean())
    plain_accuracy = float((plain.classes == labels).mean())
    assert ray_accuracy == plain_accuracy
    assert ray_accuracy > 0.95
    assert plain.probabilities is not None
    np.testing.assert_allclose(out["probabilities"], plain.probabilities[order], atol=1e-5)
    confusion = report.confusion
    assert confusion is not None
    assert confusion.sum() == 70_000
    assert np.trace(confusion) == round(ray_accuracy * 70_000)


def test_driver_killed_and_rerun_ends_with_the_uninterrupted_output(
    ray_address: str,
    served_trained: ServerProcess,
    eight_shards: Path,
    scored_eight: tuple[RayJobReport, Path],
    tmp_path: Path,
) -> None:
    whole, killed = scored_eight[1], tmp_path / "killed"
    args = ["score", "--engine", "ray", "--target", served_trained.target, "--address",
            ray_address, "--input", eight_shards, "--output", killed, "--actors", "1",
            "--no-progress"]  # fmt: skip
    driver = cli_process(*args, temporary=tmp_path)
    server = served_trained.process
    try:
        wait_for(lambda: bool(committed(killed)) or driver.poll() is not None, "a first shard")
        assert driver.poll() is None, driver.communicate()
        # With the server paused no further shard can finish: the kill lands mid-job.
        server.send_signal(signal.SIGSTOP)
        driver.send_signal(signal.SIGKILL)
        driver.communicate()
        done_at_kill = committed(killed)
    finally:
        server.send_signal(signal.SIGCONT)
    assert 1 <= len(done_at_kill) < 8

    rerun = cli_process(*args, temporary=tmp_path)
    stdout, stderr = rerun.communicate(timeout=WAIT * 2)
    assert rerun.returncode == 0, stdout + stderr
    assert f"kept {len(done_at_kill)} shards" in stdout
    assert f"scored {70_000 - 8750 * len(done_at_kill)} images in " in stdout
    assert "accuracy 0.9" in stdout
    assert "WARNING" not in stderr, stderr
    assert "core_worker" not in stderr, stderr
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temporaries left

    assert committed(killed) == committed(whole)
    a, b = read_output(whole), read_output(killed)
    assert len(set(b["key"])) == len(b["key"]) == 70_000
    for name in ("key", "class", "label", "model_version"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)

    again = cli_process(*args, temporary=tmp_path)
    stdout, _ = again.communicate(timeout=WAIT * 2)
    assert again.returncode == 0
    assert "nothing left to score" in stdout
    assert "kept 8 shards (70000 rows)" in stdout


def writer_pid(shard: Path) -> int:
    """The pid of the actor that wrote `shard` (from the counts in its footer)."""
    counts = json.loads(pq.read_metadata(shard).metadata[b"mnist_serving"])
    return int(counts["worker"].rsplit(":", 1)[1])


def test_a_killed_worker_is_replaced_and_no_row_is_lost_or_doubled(
    ray_address: str, served_trained: ServerProcess, eight_shards: Path, tmp_path: Path
) -> None:
    settings = job(served_trained.target, actors=1)
    reports: list[RayJobReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            reports.append(run_ray_job(settings, [str(eight_shards)], str(tmp_path)))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    server = served_trained.process
    try:
        wait_for(lambda: bool(committed(tmp_path)) or not thread.is_alive(), "a first shard")
        server.send_signal(signal.SIGSTOP)  # the worker is now stuck inside a shard
        worker = writer_pid(tmp_path / committed(tmp_path)[0])
        os.kill(worker, signal.SIGKILL)
    finally:
        server.send_signal(signal.SIGCONT)
    thread.join(WAIT * 2)
    assert not thread.is_alive()
    assert not errors, errors
    report = reports[0]
    assert not report.failed_shards, [o.error for o in report.failed_shards]
    assert report.rows == 70_000
    out = read_output(tmp_path)
    assert len(set(out["key"])) == len(out["key"]) == 70_000
    writers = {writer_pid(tmp_path / name) for name in committed(tmp_path)}
    assert worker in writers
    assert len(writers) == 2


def test_bad_shards_fail_alone_with_a_clear_message(
    ray_address: str,
    served_trained: ServerProcess,
    mnist_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    with np.load(mnist_path) as data:
        np.savez(inputs / "good.npz", x_test=data["x_test"][:300], y_test=data["y_test"][:300])
    (inputs / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    pq.write_table(pa.table({"image": pa.array(range(3), pa.int64())}), inputs / "ints.parquet")
    pq.write_table(pa.table({"pixels": [b"x"]}), inputs / "nocolumn.parquet")
    np.save(inputs / "shape.npy", np.zeros((4, 27, 27), np.uint8))
    out = tmp_path / "out"
    code = main(["score", "--engine", "ray", "--target", served_trained.target, "--input",
                 str(inputs), "--output", str(out), "--no-progress"])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 1
    assert "scored 300 images in 1 shards" in stdout
    assert "0 failed rows, 4 failed shards" in stdout
    assert "accuracy 0.9" in stdout
    lines = stderr.strip().splitlines()
    assert len([line for line in lines if " failed: " in line]) == 4, stderr
    assert "corrupt.parquet: not a readable Parquet file" in stderr
    assert "ints.parquet: column 'image' is int64; expected 784 bytes per image" in stderr
    assert "nocolumn.parquet: no column 'image' (columns: pixels)" in stderr
    assert "shape.npy: images must have shape [N, 28, 28]" in stderr
    assert committed(out) == ["00001-good.parquet"]


def test_unreadable_images_fail_their_rows(
    ray_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from mnist_serving.client.images import read_image

    files = []
    for index in range(4):
        digit = np.zeros((28, 28), np.uint8)
        digit[6 + index : 22, 9 : 19 - index] = 255  # white ink on black, as MNIST
        files.append(tmp_path / "in" / str(index) / "d.png")
        files[-1].parent.mkdir(parents=True)
        Image.fromarray(digit).save(files[-1])
    (tmp_path / "in" / "3" / "broken.png").write_bytes(b"not a png")
    digits = np.stack([read_image(f) for f in files])
    with running_fake_server() as fake:
        code = main(["score", "--engine", "ray", "--target", fake.target, "--input",
                     str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                     "--images-per-shard", "3", "--no-progress"])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 1, stderr
    assert "scored 5 images in 2 shards" in stdout
    assert "1 failed rows" in stdout
    out = read_output(tmp_path / "out")
    assert out["key"].tolist() == ["0/d.png", "1/d.png", "2/d.png", "3/broken.png", "3/d.png"]
    assert "not a readable image" in out["error"][3]
    good = [0, 1, 2, 4]
    np.testing.assert_array_equal(out["class"][good], expected(digits)[1])
    np.testing.assert_array_equal(out["label"], [0, 1, 2, 3, 3])


def test_several_targets_share_the_calls_and_one_version_is_pinned(
    ray_address: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4000, 28, 28), dtype=np.uint8)
    for part in range(4):
        np.save(tmp_path / f"{part}.npy", images[part * 1000 : (part + 1) * 1000])
    with running_fake_server() as one, running_fake_server() as two:
        settings = job((one.target, two.target), actors=1, batch_size=100, concurrency=2)
        # file:// URIs take the same path as s3:// or gs:// ones (pyarrow's from_uri).
        inputs = [f"file://{tmp_path}/{p}.npy" for p in range(4)]
        report = run_ray_job(settings, inputs, f"file://{tmp_path}/out")
        calls = [one.service.predict_calls(), two.service.predict_calls()]
    assert report.rows == 4000
    assert report.model_version == 2
    # Each batch goes where the expected wait is lowest (client/routing.py): both servers
    # take a share, every batch once.
    assert len(calls[0]) + len(calls[1]) == 40
    assert min(len(calls[0]), len(calls[1])) > 0
    assert {c.version for c in calls[0] + calls[1]} == {2}
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == 4000
    assert set(out.column("model_version").to_pylist()) == {2}
    assert "label" not in out.column_names
    by_key = dict(zip(out.column("key").to_pylist(), out.column("class").to_pylist(), strict=True))
    classes = expected(images)[1]
    for part in range(4):
        uri = f"file://{tmp_path}/{part}.npy"
        assert [by_key[f"{uri}#{i}"] for i in range(1000)] == classes[
            part * 1000 : (part + 1) * 1000
        ].tolist()


def test_request_ids_name_each_rows_call_and_one_job_keeps_its_columns(
    ray_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--request-ids: request_id and request_index per row (null for an unreadable one),
    each the prediction the server remembers for it; a rerun without the flag is refused."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        image = np.zeros((28, 28), np.uint8)
        image[4 : 10 + 3 * i, 8:20] = 255
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"broken")
    np.save(tmp_path / "b.npy", np.random.default_rng(4).integers(0, 256, (25, 28, 28), np.uint8))
    inputs = [str(folder), str(tmp_path / "b.npy")]
    out = tmp_path / "out"
    with running_fake_server() as fake:
        settings = job(fake.target, actors=1, batch_size=10, request_ids=True)
        report = run_ray_job(settings, inputs, str(out))
        assert report.rows == 30
        assert report.failed_rows == 1
        predicted = dict(fake.service.predicted)
    table = pq.read_table(out)
    assert table.schema.field("request_index").type == pa.int32()
    rows = table.to_pylist()
    broken = [r for r in rows if r["error"]]
    assert [(r["key"], r["request_id"], r["request_index"]) for r in broken] == [
        ("1.png", None, None)
    ]
    answered = [r for r in rows if not r["error"]]
    keys = [(r["request_id"], r["request_index"]) for r in answered]
    assert len(set(keys)) == 29
    assert [predicted[k] for k in keys] == [r["class"] for r in answered]
    by_key = {r["key"]: r for r in rows}
    # The image shard's one call held 0, 2, 3, 4.png: positions 0..3; the array's three
    # calls of 10, 10 and 5 count from 0 each.
    assert [by_key[f"{k}.png"]["request_index"] for k in (0, 2, 3, 4)] == [0, 1, 2, 3]
    array_rows = [by_key[f"{tmp_path / 'b.npy'}#{i}"] for i in range(25)]
    assert [r["request_index"] for r in array_rows] == [*range(10), *range(10), *range(5)]
    assert len({r["request_id"] for r in array_rows}) == 3

    with pytest.raises(InputFileError, match="was started with --request-ids"):
        run_ray_job(job("127.0.0.1:1", actors=1), inputs, str(out))


def test_the_actors_declare_the_batch_class(
    ray_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "a.npy", np.zeros((30, 28, 28), np.uint8))
    with running_fake_server() as fake:
        code = main(["score", "--engine", "ray", "--target", fake.target, "--no-progress",
                     "--batch-size", "10", "--input", str(tmp_path / "a.npy"),
                     "--output", str(tmp_path / "out")])  # fmt: skip
        calls = list(fake.service.calls)
    assert code == 0, capsys.readouterr().err
    # The driver's probe, then the actor's three calls: every one declared batch.
    assert [c.method for c in calls].count("Predict") == 3
    assert {c.priority for c in calls} == {"batch"}


def test_the_output_keys_keep_the_input_keys_type(
    ray_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Integer keys stay int64 and strings stay strings, so the scores join back to the
    input table without a cast; a shard without a key column gets the engine's own keys."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    ids = rng.permutation(10**12 + np.arange(40, dtype=np.int64) * 7919)  # beyond int32

    def table(keys: Any, pixels: np.ndarray) -> Any:  # pyarrow Array -> Table
        rows = [row.tobytes() for row in pixels.reshape(len(pixels), -1)]
        return pa.table({"key": keys, "image": pa.array(rows, pa.binary())})

    (tmp_path / "ints").mkdir()
    (tmp_path / "words").mkdir()
    pq.write_table(table(pa.array(ids[:20]), images[:20]), tmp_path / "ints" / "a.parquet")
    pq.write_table(table(pa.array(ids[20:]), images[20:40]), tmp_path / "ints" / "b.parquet")
    words = pa.array([f"digit-{i}" for i in range(10)], pa.string())
    pq.write_table(table(words, images[40:]), tmp_path / "words" / "c.parquet")
    np.save(tmp_path / "d.npy", images[40:])
    classes = {int(k): int(c) for k, c in zip(ids, expected(images[:40])[1], strict=True)}

    with running_fake_server() as fake:
        settings = job(fake.target, actors=1)
        run_ray_job(settings, [str(tmp_path / "ints")], str(tmp_path / "out-ints"))
        run_ray_job(settings, [str(tmp_path / "words")], str(tmp_path / "out-words"))
        with caplog.at_level(logging.WARNING, logger="mnist_serving.client.scoring.ray"):
            mixed = run_ray_job(
                settings,
                [str(tmp_path / "ints"), str(tmp_path / "d.npy")],
                str(tmp_path / "out-mixed"),
            )

    scores = pq.read_table(tmp_path / "out-ints")
    assert scores.schema.field("key").type == pa.int64()
    inputs = pq.read_table(tmp_path / "ints")
    joined = scores.select(["key", "class"]).join(inputs, "key")  # no cast needed
    assert joined.num_rows == 40
    by_key = dict(
        zip(joined.column("key").to_pylist(), joined.column("class").to_pylist(), strict=True)
    )
    assert by_key == classes
    worded = pq.read_table(tmp_path / "out-words")
    assert worded.schema.field("key").type == pa.string()
    assert worded.column("key").to_pylist() == words.to_pylist()

    assert mixed.key_types == {"int64": 2, "string": 1}
    assert "key columns of different types (int64 in 2, string in 1)" in caplog.text
    own = pq.read_table(tmp_path / "out-mixed" / "00002-d.parquet").column("key")
    assert own.to_pylist() == [f"{tmp_path / 'd.npy'}#{i}" for i in range(10)]


def test_the_actors_present_the_client_certificate_to_a_mutual_tls_server(
    ray_address: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = make_files(tmp_path / "tls")
    good = files.authority.issue("ray-job", server=False)
    cert, key = write(tmp_path / "c.pem", good.cert), write(tmp_path / "c.key", good.key)
    np.save(tmp_path / "a.npy", np.zeros((50, 28, 28), np.uint8))
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", *files.server_flags(client_ca=True)
    )
    try:
        base = ["score", "--engine", "ray", "--target", server.target, "--no-progress",
                "--input", str(tmp_path / "a.npy"), "--ca-cert", str(files.ca)]  # fmt: skip
        assert main([*base, "--output", str(tmp_path / "anonymous")]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert main([*base, "--output", str(tmp_path / "half"), "--client-cert", str(cert)]) == 2
        assert "--client-cert and --client-key go together" in capsys.readouterr().err
        out = tmp_path / "out"
        code = main([*base, "--output", str(out), "--client-cert", str(cert), "--client-key",
                     str(key)])  # fmt: skip
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        assert "scored 50 images in 1 shards" in stdout
        assert pq.read_table(out).num_rows == 50
    finally:
        assert server.stop() == 0, server.log


def test_a_job_keeps_its_model_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "a.npy", np.zeros((10, 28, 28), np.uint8))
    with running_fake_server() as fake:
        base = ["score", "--engine", "ray", "--target", fake.target, "--no-progress",
                "--input", str(tmp_path / "a.npy"), "--output", str(tmp_path / "out")]  # fmt: skip
        assert main([*base, "--model-version", "9"]) == 1
        assert "model version 9 is not served" in capsys.readouterr().err
        (tmp_path / "out" / "_job.json").write_text(
            '{"model_version": 1, "shards": [{"uri": "%s", "output": "00000-a.parquet"}]}'
            % (tmp_path / "a.npy")
        )
        assert main([*base, "--model-version", "2"]) == 2
        assert "was started with model version 1, not 2" in capsys.readouterr().err


def test_to_parquet_writes_the_readmes_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = np.arange(7 * 784, dtype=np.int64).reshape(7, 28, 28) % 256
    np.savez(tmp_path / "m.npz", x_train=images[:4].astype(np.uint8), y_train=np.arange(4),
             x_test=images[4:].astype(np.uint8), y_test=np.arange(3))  # fmt: skip
    code = main(["to-parquet", "--input", str(tmp_path / "m.npz"), "--output",
                 str(tmp_path / "shards"), "--shards", "2"])  # fmt: skip
    assert code == 0
    assert "wrote 2 Parquet shards" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "shards")
    keys = ["train/0", "train/1", "train/2", "train/3", "test/0", "test/1", "test/2"]
    assert table.column("key").to_pylist() == keys
    assert table.column("label").to_pylist() == [0, 1, 2, 3, 0, 1, 2]
    data = read_shard(list_shards([str(tmp_path / "shards")])[0], ReadOptions())
    np.testing.assert_array_equal(data.images.reshape(-1, 28, 28), images[: len(data.keys)])
    assert main(["to-parquet", "--input", str(tmp_path / "m.npz"), "--output",
                 str(tmp_path / "x"), "--splits", "valid"]) == 2  # fmt: skip
    assert "no x_valid" in capsys.readouterr().err


def test_the_actors_send_the_token_without_the_file(
    ray_address: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--token-file is read by the driver alone; the actors get the token's value in their
    settings (a cluster's workers need no file). MNIST_TOKEN works the same."""
    from mnist_serving.server.auth import keys_main

    keys = tmp_path / "keys.json"
    assert keys_main(["add", "ray-job", "--role", "predict", "--file", str(keys)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    np.save(tmp_path / "a.npy", np.zeros((30, 28, 28), np.uint8))
    monkeypatch.delenv("MNIST_TOKEN", raising=False)
    with ServerProcess(tiny_model_dir, "--poll-interval", "0", "--auth-keys", str(keys)) as server:
        base = ["score", "--engine", "ray", "--target", server.target, "--no-progress",
                "--batch-size", "10", "--input", str(tmp_path / "a.npy"), "--output"]  # fmt: skip
        assert main([*base, str(tmp_path / "anonymous")]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main([*base, str(tmp_path / "out"), "--token-file", str(token_file)]) == 0
        token_file.unlink()  # from here on only the environment has it
        monkeypatch.setenv("MNIST_TOKEN", token)
        assert main([*base, str(tmp_path / "again")]) == 0
        ok = ("mnist_requests_total", (("api", "native"), ("caller", "ray-job"), ("code", "OK"),
                                       ("method", "Predict"), ("priority", "batch")))  # fmt: skip
        # Two jobs of 3 calls each, and each driver's probe call.
        assert server.scrape()[ok] >= 6
    assert token not in server.log
