"""`mnist-client score --request-ids` (the plain engine; the Ray engine's is in
tests/test_scoring_ray.py): each row names the call that answered it, so that the job's
true labels go back with `mnist-client feedback`. Against tests/fake_server.py, which
remembers (request_id, index) -> class per call as the real server does."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_serving.client.__main__ import main

from .fake_server import FakeServer, expected, running_fake_server


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with running_fake_server() as server:
        yield server


def dataset(tmp_path: Path, count: int) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(count)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=images[:1], y_train=labels[:1], x_test=images, y_test=labels)
    return path, images, labels


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def score(fake: FakeServer, npz: Path, out: Path, *extra: str) -> int:
    return main(["score", "--target", fake.target, "--input", str(npz), "--output", str(out),
                 "--request-ids", "--no-progress", *extra])  # fmt: skip


def check_calls(fake: FakeServer, rows: list[tuple[str, int, int]]) -> None:
    """Every (request_id, request_index, class) is the prediction the server made for it,
    and no two rows name the same one."""
    assert len({(r, i) for r, i, _ in rows}) == len(rows)
    assert [fake.service.predicted[(r, i)] for r, i, _ in rows] == [c for _, _, c in rows]


def test_csv_rows_name_their_call_and_the_labels_go_back(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz, images, labels = dataset(tmp_path, 250)
    out = tmp_path / "scores.csv"
    assert score(fake, npz, out, "--batch-size", "100", "--concurrency", "2") == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["index", "class", "probability", *(f"p{i}" for i in range(10)),
                             "request_id", "request_index", "error"]  # fmt: skip
    assert [int(r["index"]) for r in rows] == list(range(250))
    assert [int(r["class"]) for r in rows] == expected(images)[1].tolist()
    # One call per batch of 100: its rows share its ID and count 0, 1, ... within it.
    assert len({r["request_id"] for r in rows}) == 3
    assert [int(r["request_index"]) for r in rows] == [*range(100), *range(100), *range(50)]
    check_calls(fake, [(r["request_id"], int(r["request_index"]), int(r["class"])) for r in rows])

    # The job's labels, next to its rows, are what `mnist-client feedback` sends back.
    labelled = tmp_path / "labelled.csv"
    with labelled.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*rows[0], "label"])
        for row, label in zip(rows, labels.tolist(), strict=True):
            writer.writerow([*row.values(), label])
    capsys.readouterr()
    assert main(["feedback", "--target", fake.target, str(labelled)]) == 0
    assert capsys.readouterr().out.startswith("sent 250 labels: 250 accepted, 0 unknown")
    by_row = {(r["request_id"], int(r["request_index"])): i for i, r in enumerate(rows)}
    assert {by_row[key]: label for key, label in fake.service.labelled.items()} == dict(
        enumerate(labels.tolist())
    )


def test_jsonl_and_a_bad_file_skip_the_row_the_call_did_not_have(
    fake: FakeServer, tmp_path: Path
) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(6):
        image = np.zeros((28, 28), np.uint8)
        image[4 : 10 + 2 * i, 8:20] = 255
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "4.png").write_bytes(b"broken")
    out = tmp_path / "scores.jsonl"
    assert score(fake, folder, out, "--batch-size", "3") == 1  # one failed row
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"{i}.png" for i in range(6)]
    assert "request_id" not in rows[4]
    assert "not a readable image" in rows[4]["error"]
    # The second call held 3.png and 5.png only: positions 0 and 1.
    assert [r.get("request_index") for r in rows] == [0, 1, 2, 0, None, 1]
    assert rows[3]["request_id"] == rows[5]["request_id"] != rows[0]["request_id"]
    answered = [r for r in rows if "class" in r]
    check_calls(fake, [(r["request_id"], r["request_index"], r["class"]) for r in answered])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_keeps_the_ids_and_refuses_to_mix_columns(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    npz, images, _ = dataset(tmp_path, 300)
    out = tmp_path / f"scores{suffix}"
    assert score(fake, npz, out, "--batch-size", "64") == 0
    whole = out.read_bytes()
    cut = whole.index(b"\n", len(whole) // 2) - 5  # mid-row, as a killed job leaves it
    out.write_bytes(whole[:cut])
    kept = whole[: whole.rindex(b"\n", 0, cut) + 1]

    plain = ["score", "--target", fake.target, "--input", str(npz), "--output", str(out),
             "--batch-size", "64", "--resume", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main(plain) == 2  # without --request-ids: not resumed into
    err = capsys.readouterr().err
    if suffix == ".csv":
        assert "was written with --request-ids; resume it the same way" in err
    else:
        assert "it has request IDs and this run writes none: rerun with --request-ids" in err

    assert score(fake, npz, out, "--batch-size", "64", "--resume") == 0
    assert out.read_bytes().startswith(kept)  # the rows kept keep their IDs
    if suffix == ".csv":
        rows = [(r["request_id"], int(r["request_index"]), int(r["class"]))
                for r in read_csv(out)]  # fmt: skip
    else:
        records = [json.loads(line) for line in out.read_text().splitlines()]
        rows = [(r["request_id"], r["request_index"], r["class"]) for r in records]
    assert [c for _, _, c in rows] == expected(images)[1].tolist()
    check_calls(fake, rows)

    # And the other way round: an output without IDs is not resumed with --request-ids.
    other = tmp_path / f"plain{suffix}"
    assert main([*plain[:6], str(other), *plain[7:9]]) == 0
    other.write_bytes(other.read_bytes()[:-3])
    capsys.readouterr()
    assert score(fake, npz, other, "--batch-size", "64", "--resume") == 2
    err = capsys.readouterr().err
    if suffix == ".csv":
        assert "was written without --request-ids" in err
    else:
        assert "it has no request IDs: rerun without --request-ids" in err


def test_a_server_that_sends_no_ids_leaves_the_columns_empty(tmp_path: Path) -> None:
    npz, _, _ = dataset(tmp_path, 10)
    with running_fake_server(send_request_ids=False) as fake:
        out = tmp_path / "scores.csv"
        assert score(fake, npz, out) == 0
        rows = read_csv(out)
        assert {(r["request_id"], r["request_index"]) for r in rows} == {("", "")}
        assert all(r["class"] for r in rows)
        lines = tmp_path / "scores.jsonl"
        assert score(fake, npz, lines, "--batch-size", "4") == 0
        records = [json.loads(line) for line in lines.read_text().splitlines()]
        assert {(r["request_id"], r["request_index"]) for r in records} == {(None, None)}
        # Still a --request-ids file: it resumes as one.
        lines.write_bytes(lines.read_bytes()[:-10])
        assert score(fake, npz, lines, "--batch-size", "4", "--resume") == 0
        assert len(lines.read_text().splitlines()) == 10
