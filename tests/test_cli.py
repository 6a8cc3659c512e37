"""`mnist-client` and the scoring job against a real gRPC server (tests/fake_server.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from mnist_serving.client.__main__ import main
from mnist_serving.client.scoring import batch_ranges, score

from .fake_server import FakeServer, expected, free_port, running_fake_server


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with running_fake_server() as server:
        yield server


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_serving.client", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dataset(
    tmp_path: Path, count: int = 1000, seed: int = 0
) -> tuple[Path, np.ndarray, np.ndarray]:
    """A Keras-layout npz of random digits whose labels are right for 3 in 4 (vs the fake)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = expected(images)[1].astype(np.uint8)
    wrong = rng.random(count) < 0.25
    labels[wrong] = (labels[wrong] + 1) % 10
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=images[:10], y_train=labels[:10], x_test=images, y_test=labels)
    return path, images, labels


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def check_rows(
    rows: list[dict[str, str]], images: np.ndarray, indices: list[int] | None = None
) -> None:
    probabilities, classes = expected(images)
    assert [int(r["index"]) for r in rows] == (indices or list(range(len(images))))
    np.testing.assert_array_equal([int(r["class"]) for r in rows], classes)
    got = np.array([[float(r[f"p{i}"]) for i in range(10)] for r in rows], np.float32)
    np.testing.assert_allclose(got, probabilities, rtol=1e-6)
    assert {r["probability"] for r in rows} == {"0.91"}
    assert {r["error"] for r in rows} == {""}


# --- health, metadata ------------------------------------------------------------------


def test_health(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    assert cli(capsys, "health", "--target", fake.target) == (0, "SERVING\n", "")
    fake.set_serving(False)
    assert cli(capsys, "health", "--target", fake.target)[:2] == (1, "NOT_SERVING\n")


def test_health_of_an_unreachable_server_is_one_line() -> None:
    result = cli_process("health", "--target", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_of_a_server_that_never_answers_times_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as silent:  # accepts connections, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, out, err = cli(capsys, "health", "--target", target, "--timeout", "0.5")
    assert time.monotonic() - started < 60  # the deadline ended it: it did not hang
    assert (code, out) == (1, "")
    assert err.startswith(f"mnist-client: {target}: DEADLINE_EXCEEDED")


def test_metadata(capsys: pytest.CaptureFixture[str], fake: FakeServer) -> None:
    code, out, _ = cli(capsys, "metadata", "--target", fake.target)
    assert code == 0
    assert "version 2: fake, test accuracy 0.9200" in out
    assert "4096 images per request" in out
    code, out, _ = cli(capsys, "metadata", "--target", fake.target, "--json")
    assert code == 0
    assert [v["version"] for v in json.loads(out)["versions"]] == [2, 1]


# --- predict ---------------------------------------------------------------------------


def test_predict_arrays(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    npz, images, _ = dataset(tmp_path, count=3)
    one = tmp_path / "one.npy"
    np.save(one, images[0])
    code, out, err = cli(capsys, "predict", "--target", fake.target, npz, one)
    assert (code, err) == (0, "")
    classes = expected(images)[1]
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [
        f"{npz}[0]", f"{npz}[1]", f"{npz}[2]", str(one)
    ]  # fmt: skip
    assert [int(line.split()[1]) for line in lines] == [*classes, classes[0]]
    assert all(line.endswith("(0.9100)") for line in lines)


def test_predict_json_and_images(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    png = tmp_path / "seven.png"
    canvas = np.zeros((90, 60), np.uint8)
    canvas[10:80, 20:30] = 255
    Image.fromarray(canvas).save(png)
    code, out, err = cli(capsys, "predict", "--target", fake.target, "--json", png)
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document["model_version"] == 2
    [row] = document["predictions"]
    assert row["input"] == str(png)
    assert len(row["probabilities"]) == 10
    assert row["probability"] == 0.91
    # --invert on a white digit makes a light background: a clear error, either way round.
    code, _, err = cli(capsys, "predict", "--target", fake.target, "--invert", png)
    assert code == 2
    assert "drop --invert" in err
    Image.fromarray(255 - canvas).save(png)
    code, _, err = cli(capsys, "predict", "--target", fake.target, png)
    assert code == 2
    assert "for a dark digit on a light background pass --invert" in err
    code, out, _ = cli(capsys, "predict", "--target", fake.target, png, "--invert")
    assert code == 0
    assert out.startswith(f"{png}  ")


def bad_input(folder: Path, kind: str) -> Path:
    """A file that `mnist-client predict` must refuse."""
    if kind == "missing":
        return folder / "missing.png"
    path = folder / {"text": "notes.txt", "junk": "bad.png", "shape": "x.npy",
                     "strings": "s.npy", "blank": "blank.png"}[kind]  # fmt: skip
    if kind == "text":
        path.write_text("7")
    elif kind == "junk":
        path.write_bytes(b"not a png")
    elif kind == "shape":
        np.save(path, np.zeros((3, 27, 27), np.uint8))
    elif kind == "strings":
        np.save(path, np.array(["a"]))
    else:
        Image.new("L", (30, 30)).save(path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("text", "unknown kind of input"),
        ("junk", "not a readable"),
        ("shape", "shape"),
        ("strings", "shape"),
        ("blank", "blank image"),
    ],
)
def test_predict_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path, kind: str, message: str
) -> None:
    path = bad_input(tmp_path, kind)
    code, out, err = cli(capsys, "predict", "--target", fake.target, path)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err
    assert str(path) in err
    assert fake.service.predict_calls() == []


def test_predict_bad_input_in_a_process_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    result = cli_process("predict", "--target", f"127.0.0.1:{free_port()}", tmp_path / "bad.jpg")
    assert result.returncode == 2
    assert result.stderr.startswith("mnist-client: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_predict_unreachable_server(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((28, 28), np.uint8))
    target = f"127.0.0.1:{free_port()}"
    code, out, err = cli(
        capsys, "predict", "--target", target, "--timeout", "5", tmp_path / "x.npy"
    )
    assert code == 1
    assert out == ""
    assert err.startswith(f"mnist-client: {target}: UNAVAILABLE")
    assert err.count("\n") == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["score", "--input", "x.npz"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["score", "--input", "x.npz", "--output", "o.csv", "--batch-size", "0"])
    assert caught.value.code == 2
    assert "must be positive" in capsys.readouterr().err


# --- score -----------------------------------------------------------------------------


def test_score_csv(capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path) -> None:
    npz, images, labels = dataset(tmp_path)
    out = tmp_path / "scores.csv"
    code, stdout, err = cli(
        capsys, "score", "--target", fake.target, "--input", npz, "--output", out,
        "--batch-size", "100", "--concurrency", "3",
    )  # fmt: skip
    assert (code, err) == (0, "")
    check_rows(read_csv(out), images)
    assert "scored 1000 images" in stdout
    assert "0 failed" in stdout
    accuracy = (expected(images)[1] == labels).mean()
    assert f"accuracy {accuracy:.4f}" in stdout
    calls = fake.service.predict_calls()
    assert [c.images for c in calls] == [100] * 10
    assert [c.version for c in calls] == [0] + [2] * 9  # pinned after the first answer
    assert fake.service.max_in_flight <= 3
    with (tmp_path / "scores.confusion.csv").open() as stream:
        matrix = np.array([row[1:] for row in list(csv.reader(stream))[1:]], np.int64)
    assert matrix.sum() == 1000
    assert np.trace(matrix) == round(accuracy * 1000)
    assert (tmp_path / "scores.confusion.png").stat().st_size > 0


def test_score_keeps_requests_in_flight(fake: FakeServer, tmp_path: Path) -> None:
    fake.service.delay = 0.05
    npz, images, _ = dataset(tmp_path, count=400)
    code = main(["score", "--target", fake.target, "--input", str(npz), "--output",
                 str(tmp_path / "s.csv"), "--batch-size", "20", "--concurrency", "4"])  # fmt: skip
    assert code == 0
    assert fake.service.max_in_flight == 4
    check_rows(read_csv(tmp_path / "s.csv"), images)


def test_score_jsonl_and_model_version(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    npz, images, _ = dataset(tmp_path, count=50)
    out = tmp_path / "scores.jsonl"
    code, _, _ = cli(
        capsys, "score", "--target", fake.target, "--input", npz, "--output", out,
        "--model-version", "1",
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(50))
    assert [r["class"] for r in rows] == expected(images)[1].tolist()
    assert rows[0]["probabilities"][rows[0]["class"]] == rows[0]["probability"] == 0.91
    assert {c.version for c in fake.service.predict_calls()} == {1}


def test_score_clamps_batch_size_to_the_server_limit(tmp_path: Path) -> None:
    npz, images, _ = dataset(tmp_path, count=250)
    with running_fake_server(max_images_per_request=100) as fake:
        code = main(["score", "--target", fake.target, "--input", str(npz),
                     "--output", str(tmp_path / "s.csv"), "--batch-size", "4096"])  # fmt: skip
        assert code == 0
        # 4 requests in flight: the server may see them in any order.
        assert sorted(c.images for c in fake.service.predict_calls()) == [50, 100, 100]
    check_rows(read_csv(tmp_path / "s.csv"), images)


def test_score_image_folder_with_labels_and_a_bad_file(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    folder = tmp_path / "digits"
    for label in (3, 8):
        (folder / str(label)).mkdir(parents=True)
        for i in range(3):
            image = np.zeros((40, 40), np.uint8)
            image[5 : 10 + 5 * i, 10 : 20 + label] = 255
            Image.fromarray(image).save(folder / str(label) / f"{i}.png")
    (folder / "8" / "1.png").write_bytes(b"broken")
    out = tmp_path / "folder.csv"
    code, stdout, err = cli(
        capsys, "score", "--target", fake.target, "--input", folder, "--output", out,
        "--batch-size", "4",
    )  # fmt: skip
    assert code == 1
    rows = read_csv(out)
    assert [r["file"] for r in rows] == ["3/0.png", "3/1.png", "3/2.png", "8/0.png", "8/1.png",
                                         "8/2.png"]  # fmt: skip
    assert rows[4]["class"] == ""
    assert "not a readable image" in rows[4]["error"]
    assert all(r["class"] for i, r in enumerate(rows) if i != 4)
    assert "/5 with a prediction)" in stdout
    assert "rows 4-4 failed" in err
    assert fake.service.predict_calls()[1].images == 1  # the batch [4, 6) minus the bad file


def test_score_starts_over_unless_resuming(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    npz, images, _ = dataset(tmp_path, count=20)
    out = tmp_path / "s.csv"
    out.write_text("index,class\nsomething else entirely\n")
    args = ["score", "--target", fake.target, "--input", npz, "--output", out]
    code, _, err = cli(capsys, *args, "--resume")
    assert code == 2
    assert "header does not match" in err
    assert cli(capsys, *args)[0] == 0
    check_rows(read_csv(out), images)
    # An output with more rows than the input is another job's: not resumed into.
    smaller = tmp_path / "smaller"
    smaller.mkdir()
    code, _, err = cli(capsys, *args[:4], dataset(smaller, count=10)[0], *args[5:], "--resume")
    assert code == 2
    assert "more rows than the input" in err


def test_score_rejects_unknown_output_and_input(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    npz, _, _ = dataset(tmp_path, count=5)
    code, _, err = cli(capsys, "score", "--target", fake.target, "--input", npz,
                       "--output", tmp_path / "s.parquet")  # fmt: skip
    assert code == 2
    assert "use .csv or .jsonl" in err
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros(3), b=np.zeros(3))
    code, _, err = cli(capsys, "score", "--target", fake.target, "--input", bad,
                       "--output", tmp_path / "s.csv")  # fmt: skip
    assert code == 2
    assert "x_test" in err


def reference_output(fake: FakeServer, npz: Path, out: Path, *extra: str) -> bytes:
    assert main(["score", "--target", fake.target, "--input", str(npz), "--output", str(out),
                 *extra]) == 0  # fmt: skip
    return out.read_bytes()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_cuts_a_half_written_row(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path, suffix: str
) -> None:
    npz, _, _ = dataset(tmp_path, count=300)
    reference = reference_output(fake, npz, tmp_path / f"ref{suffix}", "--batch-size", "64")
    out = tmp_path / f"s{suffix}"
    cut = reference.index(b"\n", len(reference) // 2) - 7  # mid-row
    out.write_bytes(reference[:cut])
    done = reference[:cut].count(b"\n") - (suffix == ".csv")
    before = len(fake.service.predict_calls())
    code, stdout, _ = cli(capsys, "score", "--target", fake.target, "--input", npz,
                          "--output", out, "--resume", "--batch-size", "64")  # fmt: skip
    assert code == 0
    assert out.read_bytes() == reference
    assert f"kept {done} rows" in stdout
    assert f"scored {300 - done} images" in stdout
    scored = sum(c.images for c in fake.service.predict_calls()[before:])
    assert scored == 300 - done


def test_resume_after_a_kill(fake: FakeServer, tmp_path: Path) -> None:
    npz, _, _ = dataset(tmp_path, count=2000)
    reference = reference_output(fake, npz, tmp_path / "ref.csv", "--batch-size", "50")
    fake.service.delay = 0.02
    out = tmp_path / "killed.csv"
    args = ["score", "--target", fake.target, "--input", npz, "--output", out,
            "--batch-size", "50", "--concurrency", "2"]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_serving.client", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > 400:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the job ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = out.read_bytes()
    assert 400 < partial.count(b"\n") < 2001
    assert reference.startswith(partial[: partial.rindex(b"\n") + 1])

    fake.service.delay = 0
    result = cli_process(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == reference
    rows = read_csv(out)
    assert [int(r["index"]) for r in rows] == list(range(2000))


def test_failed_batch_is_reported_and_resume_rescores_it(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    npz, images, _ = dataset(tmp_path, count=500)
    reference = reference_output(fake, npz, tmp_path / "ref.csv", "--batch-size", "100")
    out = tmp_path / "s.csv"
    args = ["score", "--target", fake.target, "--input", npz, "--output", out,
            "--batch-size", "100", "--concurrency", "1"]  # fmt: skip
    # The second batch is refused (not retried); the rest of the job goes on.
    fake.service.fail_next(grpc.StatusCode.INVALID_ARGUMENT, details="bad pixels", after=1)
    code, stdout, err = cli(capsys, *args)
    assert code == 1
    assert "100 failed" in stdout
    assert "rows 100-199 failed: INVALID_ARGUMENT: bad pixels" in err
    rows = read_csv(out)
    assert len(rows) == 500
    assert [r["index"] for r in rows] == [str(i) for i in range(500)]
    assert all(r["class"] == "" and r["error"] for r in rows[100:200])
    kept = [*range(100), *range(200, 500)]
    check_rows(rows[:100] + rows[200:], images[kept], kept)

    code, stdout, err = cli(capsys, *args, "--resume")
    assert (code, err) == (0, "")
    assert "kept 500 rows from the earlier run, re-scored 100 that had failed" in stdout
    assert out.read_bytes() == reference


def test_job_gives_up_when_the_server_is_gone_and_resumes(
    capsys: pytest.CaptureFixture[str], fake: FakeServer, tmp_path: Path
) -> None:
    npz, _, _ = dataset(tmp_path, count=1000)
    reference = reference_output(fake, npz, tmp_path / "ref.csv", "--batch-size", "10")
    out = tmp_path / "s.csv"
    args = ["score", "--target", fake.target, "--input", npz, "--output", out,
            "--batch-size", "10", "--concurrency", "2"]  # fmt: skip
    fake.service.fail_next(grpc.StatusCode.NOT_FOUND, times=50, details="gone", after=30)
    code, _, err = cli(capsys, *args)
    assert code == 1
    assert "stopped after repeated failures" in err
    rows = read_csv(out)
    # Six failed batches in a row (2 x concurrency + 2) stop it; nothing after is written.
    # The fake fails from its 31st call on, and batches 29 and 30 are in flight together:
    # when 30 reaches it first, 29 fails and 30 succeeds, so one more batch is written.
    assert len(rows) in (30 * 10 + 6 * 10, 31 * 10 + 6 * 10)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert all(r["error"] == "NOT_FOUND: gone" for r in rows[-60:])
    assert all(not r["error"] for r in rows[:290])
    fake.service.clear_failures()
    code, _, err = cli(capsys, *args, "--resume")
    assert (code, err) == (0, "")
    assert out.read_bytes() == reference


def test_score_function_for_benchmarks(fake: FakeServer) -> None:
    images = np.random.default_rng(5).integers(0, 256, (1000, 784), dtype=np.uint8)
    stats = score(fake.target, images, batch_size=128, concurrency=3)
    probabilities, classes = expected(images)
    np.testing.assert_array_equal(stats.classes, classes)
    np.testing.assert_array_equal(stats.probabilities, probabilities)
    assert (stats.images, stats.failed, stats.model_version) == (1000, 0, 2)
    assert stats.images_per_second > 0
    fake.service.fail_next(grpc.StatusCode.INVALID_ARGUMENT)
    stats = score(fake.target, images, batch_size=128, concurrency=1)
    assert stats.failed_ranges == [(0, 128)]
    assert (stats.classes[:128] == -1).all()
    np.testing.assert_array_equal(stats.classes[128:], classes[128:])


def test_batch_ranges() -> None:
    assert list(batch_ranges(range(0, 7), 3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(batch_ranges([1, 2, 3, 7, 8, 20], 2)) == [(1, 3), (3, 4), (7, 9), (20, 21)]
    assert list(batch_ranges([], 5)) == []


def test_console_script_is_installed(fake: FakeServer) -> None:
    script = Path(sys.executable).parent / "mnist-client"
    assert script.exists()
    result = subprocess.run(
        [str(script), "health", "--target", fake.target],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "SERVING\n")
