"""`mnist-client drift-report DIR` on a prediction log folder built here with pyarrow, file
by file as the contract between the server and the client says the server writes it
(/work/tools/DRIFT-CONTRACT.md; the server's writer is tested on its own side)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from mnist_serving.client.__main__ import main
from mnist_serving.client.drift_report import auto_bucket, build_report, parse_bucket
from mnist_serving.client.predictionlog import read_log
from mnist_serving.contract.reference import bin_counts, js_divergence

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

START = datetime(2026, 12, 3, 6, 0, tzinfo=timezone.utc)
CONFIDENCE_EDGES = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]
TRAINING_MIX = [0.0987, 0.1124, 0.0993, 0.1022, 0.0974, 0.0904, 0.0986, 0.1044, 0.0975, 0.0992]
PREDICTED_MIX = [0.098, 0.114, 0.103, 0.101, 0.098, 0.089, 0.096, 0.103, 0.097, 0.101]
CONFIDENCE_FRACTIONS = [0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.02, 0.03, 0.1, 0.3, 0.508]


def reference() -> dict[str, object]:
    """A training reference, in the shape the trainer writes under metrics.json's "reference"."""
    return {
        "class_distribution": TRAINING_MIX,
        "predicted_distribution": PREDICTED_MIX,
        "confidence": {"edges": CONFIDENCE_EDGES, "fractions": CONFIDENCE_FRACTIONS},
        "low_confidence_threshold": 0.5,
        "low_confidence_rate": 0.012,
        "mean_intensity": {"edges": [0, 0.5, 1], "fractions": [1, 0], "mean": 0.13, "std": 0.04},
        "ink_fraction": {"edges": [0, 0.5, 1], "fractions": [1, 0], "mean": 0.1, "std": 0.03},
    }


PREDICTIONS_SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("index", pa.int32()),
        ("caller", pa.string()),
        ("api", pa.string()),
        ("model_version", pa.int64()),
        ("priority", pa.string()),
        ("predicted", pa.int8()),
        ("confidence", pa.float32()),
        ("probabilities", pa.list_(pa.float32(), 10)),
        ("input", pa.binary()),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("index", pa.int32()),
        ("label", pa.int8()),
        ("model_version", pa.int64()),
        ("predicted", pa.int8()),
    ]
)


@dataclass
class Traffic:
    times: list[datetime]
    request_ids: list[str]
    indexes: np.ndarray
    version: int
    predicted: np.ndarray
    confidence: np.ndarray


def traffic(
    rng: np.random.Generator,
    start: datetime,
    minutes: float,
    count: int,
    version: int,
    mix: list[float],
    confidence: np.ndarray,
    prefix: str,
) -> Traffic:
    """`count` images in calls of 4 (request IDs prefix-0, ...), spread over `minutes`."""
    offsets = np.sort(rng.uniform(0, minutes * 60, count))
    times = [start + timedelta(seconds=float(s)) for s in offsets]
    predicted = rng.choice(10, size=count, p=np.asarray(mix) / np.sum(mix))
    return Traffic(
        times,
        [f"{prefix}-{i // 4}" for i in range(count)],
        np.arange(count) % 4,
        version,
        predicted,
        confidence.astype(np.float32),
    )


def normal_confidence(rng: np.random.Generator, count: int) -> np.ndarray:
    """Top probabilities drawn from the reference's own histogram (uniform within a bin)."""
    bins = rng.choice(len(CONFIDENCE_FRACTIONS), size=count, p=CONFIDENCE_FRACTIONS)
    low, high = np.array(CONFIDENCE_EDGES[:-1]), np.array(CONFIDENCE_EDGES[1:])
    values = low[bins] + (high[bins] - low[bins]) * rng.uniform(0.01, 1.0, count)
    return np.asarray(np.clip(values, 0.1, 1.0))


def write_predictions(folder: Path, name: str, t: Traffic) -> None:
    count = len(t.times)
    probabilities = np.full((count, 10), 0.0, np.float32)
    probabilities[np.arange(count), t.predicted] = t.confidence
    table = pa.table(
        [
            pa.array(t.times, pa.timestamp("us", tz="UTC")),
            pa.array(t.request_ids, pa.string()),
            pa.array(t.indexes, pa.int32()),
            pa.array(["anonymous"] * count),
            pa.array(["native"] * count),
            pa.array(np.full(count, t.version), pa.int64()),
            pa.array(["online"] * count),
            pa.array(t.predicted, pa.int8()),
            pa.array(t.confidence, pa.float32()),
            pa.FixedSizeListArray.from_arrays(pa.array(probabilities.reshape(-1)), 10),
            pa.nulls(count, pa.binary()),
        ],
        schema=PREDICTIONS_SCHEMA,
    )
    pq.write_table(table, folder / f"predictions-{name}.parquet")


def write_feedback(folder: Path, name: str, rows: list[tuple[str, int, int, int, int]]) -> None:
    """rows: (request_id, index, label, model_version, predicted)."""
    times = [START + timedelta(hours=4, seconds=i) for i in range(len(rows))]
    table = pa.table(
        [
            pa.array(times, pa.timestamp("us", tz="UTC")),
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([r[1] for r in rows], pa.int32()),
            pa.array([r[2] for r in rows], pa.int8()),
            pa.array([r[3] for r in rows], pa.int64()),
            pa.array([r[4] for r in rows], pa.int8()),
        ],
        schema=FEEDBACK_SCHEMA,
    )
    pq.write_table(table, folder / f"feedback-{name}.parquet")


@dataclass
class Log:
    folder: Path
    normal: Traffic  # version 1, 06:00-08:00
    drifted: Traffic  # version 1, 08:00-09:00: only sevens, low confidence
    other: Traffic  # version 2 (no reference), 06:00-09:00
    confusion: np.ndarray  # of the labelled version 1 records


@pytest.fixture
def log(tmp_path: Path) -> Log:
    rng = np.random.default_rng(7)
    folder = tmp_path / "log"
    folder.mkdir()
    normal = traffic(rng, START, 120, 4000, 1, PREDICTED_MIX, normal_confidence(rng, 4000), "n")
    seven = [0.0] * 10
    seven[7] = 1.0
    drifted = traffic(rng, START + timedelta(hours=2), 60, 1000, 1, seven,
                      rng.uniform(0.2, 0.6, 1000), "d")  # fmt: skip
    other = traffic(rng, START, 180, 600, 2, [0.1] * 10, normal_confidence(rng, 600), "o")
    # Files as the server rotates them: several per kind, named by time, pid and sequence.
    write_predictions(folder, "20261203T060000Z-41-0", subset(normal, slice(0, 2500)))
    write_predictions(folder, "20261203T071500Z-41-1", subset(normal, slice(2500, None)))
    write_predictions(folder, "20261203T080000Z-41-2", drifted)
    write_predictions(folder, "20261203T060000Z-42-0", other)
    (folder / "reference-v1.json").write_text(json.dumps(reference()))
    # What a reader must leave alone: a file being written, and anything else.
    (folder / "predictions-20261203T090000Z-41-3.parquet.tmp").write_bytes(b"half a file")
    (folder / "notes.txt").write_text("not part of the log")

    # Feedback: the truth for 1000 normal records (90% right), 200 drifted ones (all
    # wrong: they are not sevens), two labels for records not in the log (not sampled),
    # and a second label for a record already labelled (the first one counts).
    confusion = np.zeros((10, 10), np.int64)
    rows: list[tuple[str, int, int, int, int]] = []
    for i in range(1000):
        predicted = int(normal.predicted[i])
        label = predicted if i % 10 else (predicted + 1) % 10
        rows.append((normal.request_ids[i], int(normal.indexes[i]), label, 1, predicted))
        confusion[label, predicted] += 1
    for i in range(200):
        label = i % 7
        rows.append((drifted.request_ids[i], int(drifted.indexes[i]), label, 1, 7))
        confusion[label, 7] += 1
    rows.append(("unsampled-1", 0, 3, 1, 3))
    rows.append(("unsampled-2", 2, 4, 1, 5))
    write_feedback(folder, "20261203T100000Z-41-0", rows[:700])
    duplicate = (*rows[0][:2], (rows[0][2] + 5) % 10, 1, rows[0][4])
    write_feedback(folder, "20261203T100500Z-41-1", [*rows[700:], duplicate])
    return Log(folder, normal, drifted, other, confusion)


def subset(t: Traffic, rows: slice) -> Traffic:
    return Traffic(t.times[rows], t.request_ids[rows], t.indexes[rows], t.version,
                   t.predicted[rows], t.confidence[rows])  # fmt: skip


# --- the numbers ------------------------------------------------------------------------------


def test_js_divergence_and_bins() -> None:
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([3, 1], [0.75, 0.25]) == pytest.approx(0.0, abs=1e-12)
    # Counts and shares are the same distribution; the value is symmetric.
    assert js_divergence([2, 6], [0.5, 0.5]) == pytest.approx(js_divergence([0.5, 0.5], [1, 3]))
    assert 0 < js_divergence([0.5, 0.5], [0.25, 0.75]) < 0.1
    # Bins (edges[i], edges[i+1]], the first closed: as Prometheus' le buckets.
    counts = bin_counts(np.array([0.0, 0.3, 0.30001, 0.5, 0.5001, 1.0]), CONFIDENCE_EDGES)
    assert counts.tolist() == [2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1]


def test_buckets() -> None:
    assert [parse_bucket(t) for t in ("30s", "5m", "1h", " 2d ")] == [30, 300, 3600, 172800]
    for bad in ("0h", "1w", "h", "1.5h", ""):
        with pytest.raises(ValueError, match="positive duration"):
            parse_bucket(bad)
    hour = 3600 * 1_000_000
    assert auto_bucket(0, 3 * hour) == 300  # 36 buckets
    assert auto_bucket(0, 30 * hour) == 3600
    assert auto_bucket(0, 0) == 60


def test_the_report_compares_live_traffic_with_the_reference(log: Log) -> None:
    read = read_log(log.folder)
    assert read.skipped == []
    assert sorted(read.references) == [1]
    report = build_report(read, bucket_seconds=3600)
    assert report.images == 4000 + 1000 + 600
    assert report.feedback_rows == 1203
    assert (report.first, report.bucket_seconds) == ("2026-12-03T06:00:00Z", 3600)
    one, two = report.versions
    assert (one.version, one.images, two.version, two.images) == (1, 5000, 2, 600)

    # The class mix over the whole log, and its divergence from the reference.
    classes = np.concatenate([log.normal.predicted, log.drifted.predicted])
    mix = np.bincount(classes, minlength=10) / 5000
    np.testing.assert_allclose(one.class_mix, mix)
    assert one.class_mix_divergence == pytest.approx(js_divergence(mix, PREDICTED_MIX))
    assert one.reference_predicted_mix == PREDICTED_MIX
    confidence = np.concatenate([log.normal.confidence, log.drifted.confidence])
    assert one.low_confidence_rate == pytest.approx(np.mean(confidence < 0.5))
    assert one.reference_low_confidence_rate == 0.012

    # Over time: two normal hours stay near the reference, the drifted one does not.
    assert [b.start for b in one.buckets] == [
        "2026-12-03T06:00:00Z", "2026-12-03T07:00:00Z", "2026-12-03T08:00:00Z"
    ]  # fmt: skip
    assert sum(b.images for b in one.buckets) == 5000
    normal_hours, drifted_hour = one.buckets[:2], one.buckets[2]
    assert drifted_hour.images == 1000
    for bucket in normal_hours:
        assert bucket.class_mix_divergence is not None
        assert bucket.class_mix_divergence < 0.01
        assert bucket.confidence_divergence is not None
        assert bucket.confidence_divergence < 0.01
        assert bucket.low_confidence_rate is not None
        assert bucket.low_confidence_rate < 0.05
    assert drifted_hour.class_mix_divergence is not None
    assert drifted_hour.class_mix_divergence > 0.5
    assert drifted_hour.class_mix_divergence == pytest.approx(
        js_divergence([0] * 7 + [1, 0, 0], PREDICTED_MIX)
    )
    assert drifted_hour.confidence_divergence is not None
    assert drifted_hour.confidence_divergence > 0.5
    assert drifted_hour.low_confidence_rate == pytest.approx(np.mean(log.drifted.confidence < 0.5))

    # Feedback joined on request_id + index: the first label of each record counts.
    feedback = one.feedback
    assert feedback.labels == 1200
    np.testing.assert_array_equal(feedback.confusion, log.confusion)
    assert feedback.correct == 900
    assert feedback.accuracy == pytest.approx(0.75)
    assert (feedback.unlogged_labels, feedback.unlogged_correct, feedback.mismatched) == (2, 1, 0)

    # A version without a reference: live numbers only.
    assert not two.has_reference
    assert two.class_mix_divergence is None
    assert two.confidence_divergence is None
    assert all(b.class_mix_divergence is None for b in two.buckets)
    assert [b.images for b in two.buckets] == [
        int(sum(START + timedelta(hours=h) <= t < START + timedelta(hours=h + 1)
                for t in log.other.times))
        for h in range(3)
    ]  # fmt: skip
    assert two.feedback.labels == 0


def test_small_buckets_get_no_numbers(log: Log) -> None:
    report = build_report(read_log(log.folder), bucket_seconds=60, min_bucket_images=50)
    buckets = report.versions[1].buckets  # version 2: 600 images over 180 minutes
    assert all(b.images < 50 for b in buckets)
    assert {b.low_confidence_rate for b in buckets} == {None}


def test_cli_writes_the_report(
    log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code = main(["drift-report", str(log.folder), "--out", str(out), "--bucket", "1h"])
    stdout, stderr = capsys.readouterr()
    assert (code, stderr) == (0, "")
    lines = stdout.splitlines()
    assert lines[0] == (
        "read 5600 predictions and 1203 feedback labels (2026-12-03T06:00:00Z to "
        f"{build_report(read_log(log.folder)).last}) -> {out / 'report.md'}"
    )
    assert lines[1].startswith("version 1: 5000 images, class mix divergence 0.")
    assert lines[1].endswith("accuracy 0.7500 on 1200 labels")
    assert lines[2].startswith("version 2: 600 images, low-confidence rate")
    assert lines[2].endswith("no reference")

    pictures = ["class-mix-v1", "confidence-v1", "confusion-v1", "class-mix-v2",
                "confidence-v2", "drift-over-time", "low-confidence-over-time"]  # fmt: skip
    for name in pictures:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "confusion-v2.png").exists()  # no feedback for version 2
    markdown = (out / "report.md").read_text()
    for name in pictures:
        assert f"]({name}.png)" in markdown
    assert "## Version 1" in markdown
    assert "No `reference-v2.json`" in markdown
    assert "| 2026-12-03T08:00:00Z | 1 | 1000 |" in markdown
    assert "1200 logged records got a label: accuracy 0.7500 (900 right)." in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"][0]["feedback"]["confusion"] == log.confusion.tolist()
    assert summary["versions"][0]["feedback"]["accuracy"] == 0.75
    assert summary["skipped"] == []


def test_a_bad_file_is_skipped_and_named(
    log: Log, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (log.folder / "predictions-20261203T090000Z-41-3.parquet").write_bytes(b"not parquet")
    no_confidence = pa.table({"time": pa.array([START], pa.timestamp("us", tz="UTC"))})
    pq.write_table(no_confidence, log.folder / "feedback-20261203T110000Z-41-2.parquet")
    (log.folder / "reference-v2.json").write_text('{"class_distribution": [1]}')
    out = tmp_path / "report"
    assert main(["drift-report", str(log.folder), "--out", str(out)]) == 0
    stderr = capsys.readouterr().err.splitlines()
    assert len(stderr) == 3
    assert stderr[0].startswith("mnist-client: skipped predictions-20261203T090000Z-41-3.parquet: ")
    assert stderr[1].startswith("mnist-client: skipped feedback-20261203T110000Z-41-2.parquet: ")
    assert "request_id" in stderr[1]
    assert stderr[2] == (
        "mnist-client: skipped reference-v2.json: class_distribution must be a list of 10 numbers"
    )
    markdown = (out / "report.md").read_text()
    assert "## Files not read" in markdown
    assert "- reference-v2.json: class_distribution must be a list of 10 numbers" in markdown
    assert json.loads((out / "summary.json").read_text())["images"] == 5600


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drift-report", str(tmp_path / "missing")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    assert main(["drift-report", str(tmp_path)]) == 2
    assert "no predictions-*.parquet files" in capsys.readouterr().err
    assert main(["drift-report", str(tmp_path), "--bucket", "1w"]) == 2
    assert "--bucket: a bucket is a positive duration" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(PREDICTIONS_SCHEMA.empty_table(), empty / "predictions-x.parquet")
    assert main(["drift-report", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "its prediction files hold no records" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("blocked", "code", "expected"),
    [
        ("matplotlib", 0, "No pictures: matplotlib is not installed"),
        ("pyarrow", 2, 'drift-report needs pyarrow and matplotlib: pip install "mnist-serving'),
    ],
)
def test_without_the_extra(
    log: Log, tmp_path: Path, blocked: str, code: int, expected: str
) -> None:
    """The base install has neither: the report is written without pictures, or the
    command says what to install."""
    out = tmp_path / "report"
    program = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from mnist_serving.client.__main__ import main\n"
        f"sys.exit(main(['drift-report', {str(log.folder)!r}, '--out', {str(out)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == code, result.stderr
    if code == 0:
        assert expected in (out / "report.md").read_text()
        assert not list(out.glob("*.png"))
    else:
        assert expected in result.stderr


def test_a_log_without_references_gets_live_numbers_only(log: Log, tmp_path: Path) -> None:
    (log.folder / "reference-v1.json").unlink()
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's, e.g. an empty legend
        assert main(["drift-report", str(log.folder), "--out", str(out)]) == 0
    assert not (out / "drift-over-time.png").exists()  # nothing to diverge from
    assert (out / "low-confidence-over-time.png").exists()
    markdown = (out / "report.md").read_text()
    assert "No `reference-v1.json`" in markdown
    assert "drift-over-time.png" not in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert [v["class_mix_divergence"] for v in summary["versions"]] == [None, None]


INPUT_EDGES = [0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5,
               0.6, 0.8, 1.0]  # fmt: skip


def digits(rng: np.random.Generator, count: int) -> np.ndarray:
    """Stand-ins for MNIST digits: white strokes on black, about 12% of the pixels."""
    images = np.zeros((count, 784), np.uint8)
    ink = rng.random((count, 784)) < rng.uniform(0.08, 0.16, (count, 1))
    images[ink] = rng.integers(128, 256, int(ink.sum()), dtype=np.uint8)
    return images


def test_logged_inputs_are_compared_with_the_training_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(11)
    training = digits(rng, 2000)
    mean = training.sum(axis=1) / (255 * 784)
    ink = (training > 127).mean(axis=1)
    ref = reference()
    for key, values in (("mean_intensity", mean), ("ink_fraction", ink)):
        counts = bin_counts(values, INPUT_EDGES)
        ref[key] = {"edges": INPUT_EDGES, "fractions": (counts / counts.sum()).tolist(),
                    "mean": float(values.mean()), "std": float(values.std())}  # fmt: skip
    folder = tmp_path / "log"
    folder.mkdir()
    (folder / "reference-v1.json").write_text(json.dumps(ref))
    # An hour of digits, then an hour of inverted ones (dark ink on white): the same
    # classes and confidence, so only the inputs tell.
    normal, inverted = digits(rng, 300), 255 - digits(rng, 300)
    for hour, images in enumerate((normal, inverted)):
        t = traffic(rng, START + timedelta(hours=hour), 60, 300, 1, PREDICTED_MIX,
                    normal_confidence(rng, 300), f"h{hour}")  # fmt: skip
        write_predictions(folder, f"2026120{hour}T060000Z-1-0", t)
        table = pq.read_table(folder / f"predictions-2026120{hour}T060000Z-1-0.parquet")
        rows = [row.tobytes() for row in images]
        rows[5] = None  # --log-inputs off for a while: no input, no statistics
        table = table.set_column(10, "input", pa.array(rows, pa.binary()))
        pq.write_table(table, folder / f"predictions-2026120{hour}T060000Z-1-0.parquet")

    report = build_report(read_log(folder), bucket_seconds=3600)
    (version,) = report.versions
    assert version.inputs_logged == 598
    both = np.concatenate([np.delete(normal, 5, 0), np.delete(inverted, 5, 0)])
    assert version.mean_intensity == pytest.approx(both.sum() / (255 * 784 * 598), rel=1e-5)
    assert version.ink_fraction == pytest.approx((both > 127).mean(), rel=1e-5)
    assert version.reference_mean_intensity == pytest.approx(mean.mean())
    first, second = version.buckets
    assert first.mean_intensity_divergence is not None
    assert first.mean_intensity_divergence < 0.05
    assert first.ink_fraction_divergence is not None
    assert first.ink_fraction_divergence < 0.05
    assert second.mean_intensity_divergence == pytest.approx(1.0)  # nothing in common
    assert second.ink_fraction_divergence == pytest.approx(1.0)
    # Classes and confidence alone do not see it.
    assert second.class_mix_divergence is not None
    assert second.class_mix_divergence < 0.05

    out = tmp_path / "report"
    assert main(["drift-report", str(folder), "--out", str(out), "--bucket", "1h"]) == 0
    assert "mean intensity divergence 0." in capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    assert "| mean intensity divergence (598 inputs logged) |" in markdown
    assert "| 2026-12-03T07:00:00Z | 1 | 300 |" in markdown
    assert markdown.count(" mean intensity divergence |") == 1  # the bucket table's column
