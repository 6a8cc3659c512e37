"""`mnist-client drift-report DIR`: what a prediction log says about the model's answers.

Per model version, live traffic against its training reference (`reference-v<N>.json`):

- the class mix (predicted classes) against the model's predicted mix on the test set,
  and the training labels' mix;
- the confidence (top probability) histogram against the test set's;
- drift over time: per time bucket, the Jensen-Shannon divergence of the class mix and of
  the confidence histogram from the reference, and the low-confidence rate;
- the confusion matrix of the records that got feedback (feedback files joined to the
  predictions on request_id + index) and the live accuracy.

Divergences are Jensen-Shannon, in bits (0: the same distribution, 1: disjoint), on the
reference's own histogram edges, bins (edges[i], edges[i+1]]: as the server's
mnist_*_divergence gauges compute them. Writes report.md, summary.json (every number) and,
with matplotlib, PNG pictures into the report folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import NUM_CLASSES
from mnist_serving.contract.reference import (
    CONFIDENCE_EDGES,
    LOW_CONFIDENCE_THRESHOLD,
    bin_counts,
    js_divergence,
)

from .errors import InputFileError
from .predictionlog import PredictionLog, Records

# A bucket with fewer images gets no divergence: on a small sample it is mostly noise.
DEFAULT_MIN_BUCKET_IMAGES = 50
MAX_BUCKETS = 48
NICE_BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # seconds
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_US = 1_000_000


# --- the numbers --------------------------------------------------------------------------------


def class_counts(classes: np.ndarray) -> npt.NDArray[np.int64]:
    """Images per class 0..9 (a class outside them, which the contract rules out, is not
    counted)."""
    known = classes[(classes >= 0) & (classes < NUM_CLASSES)]
    return np.bincount(known, minlength=NUM_CLASSES).astype(np.int64)


def shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [float(x) for x in (counts / total if total else np.zeros(len(counts)))]


def parse_bucket(text: str) -> int:
    """Seconds of a bucket width such as 30s, 5m, 1h, 1d."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"a bucket is a positive duration such as 30s, 5m, 1h or 1d, not {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def auto_bucket(first_us: int, last_us: int) -> int:
    """The smallest of NICE_BUCKETS that cuts the log's span into at most MAX_BUCKETS."""
    span = (last_us - first_us) / _US
    for seconds in NICE_BUCKETS:
        if span / seconds <= MAX_BUCKETS:
            return seconds
    return math.ceil(span / MAX_BUCKETS / 86400) * 86400


@dataclass
class Bucket:
    start: str  # ISO 8601, UTC
    images: int
    class_mix_divergence: float | None  # None: too few images, or no reference
    confidence_divergence: float | None
    low_confidence_rate: float | None  # None: too few images
    # From the logged inputs (None: too few logged, or no reference).
    mean_intensity_divergence: float | None = None
    ink_fraction_divergence: float | None = None


@dataclass
class Feedback:
    labels: int  # records of the log that got a label
    correct: int
    confusion: list[list[int]]  # [true label][predicted class]
    # Labels whose prediction is not in the log (not sampled, or its file not kept): counted
    # with the predicted class the feedback file itself holds.
    unlogged_labels: int = 0
    unlogged_correct: int = 0
    # Labels whose feedback row names another class than the logged prediction: a request
    # ID reused by a caller for two calls.
    mismatched: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None


@dataclass
class VersionReport:
    version: int
    images: int
    first: str
    last: str
    has_reference: bool
    class_mix: list[float]
    reference_predicted_mix: list[float] | None
    training_label_mix: list[float] | None
    class_mix_divergence: float | None
    confidence_edges: list[float]
    confidence_fractions: list[float]
    reference_confidence_fractions: list[float] | None
    confidence_divergence: float | None
    low_confidence_threshold: float
    low_confidence_rate: float
    reference_low_confidence_rate: float | None
    buckets: list[Bucket]
    feedback: Feedback
    # The inputs, where the server logged them (--log-inputs): per-image mean intensity and
    # ink fraction against the training images'.
    inputs_logged: int = 0
    mean_intensity: float | None = None  # the live mean
    reference_mean_intensity: float | None = None
    mean_intensity_divergence: float | None = None
    ink_fraction: float | None = None
    reference_ink_fraction: float | None = None
    ink_fraction_divergence: float | None = None


@dataclass
class DriftReport:
    folder: str
    images: int
    feedback_rows: int
    first: str
    last: str
    bucket_seconds: int
    min_bucket_images: int
    versions: list[VersionReport]
    files: int
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for version, report in zip(data["versions"], self.versions, strict=True):
            version["feedback"]["accuracy"] = report.feedback.accuracy
        return data


def iso(time_us: int) -> str:
    moment = datetime.fromtimestamp(time_us / _US, tz=timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def build_report(
    log: PredictionLog,
    bucket_seconds: int | None = None,
    min_bucket_images: int = DEFAULT_MIN_BUCKET_IMAGES,
) -> DriftReport:
    predictions = log.predictions
    if len(predictions) == 0:
        raise InputFileError(f"{log.folder}: its prediction files hold no records")
    first, last = int(predictions.time_us.min()), int(predictions.time_us.max())
    width = bucket_seconds or auto_bucket(first, last)
    joined = _join_feedback(predictions, log.feedback)
    versions = [
        _version_report(
            int(v),
            predictions.take(predictions.model_version == v),
            log.references.get(int(v)),
            joined.get(int(v), _no_feedback()),
            width,
            min_bucket_images,
        )
        for v in np.unique(predictions.model_version)
    ]
    return DriftReport(
        str(log.folder),
        len(predictions),
        len(log.feedback),
        iso(first),
        iso(last),
        width,
        min_bucket_images,
        versions,
        log.files,
        log.skipped,
    )


def _no_feedback() -> Feedback:
    return Feedback(0, 0, np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64).tolist())


def _join_feedback(predictions: Records, feedback: Records) -> dict[int, Feedback]:
    """Per version: the confusion matrix of the logged records that got a label (the first
    label of each, as the server counts), and the labels whose prediction is not logged."""
    keys = zip(predictions.request_id.tolist(), predictions.index.tolist(), strict=True)
    logged: dict[tuple[str, int], int] = {key: row for row, key in enumerate(keys)}
    matrices: dict[int, npt.NDArray[np.int64]] = {}
    results: dict[int, Feedback] = {}
    seen: set[tuple[str, int]] = set()
    order = np.argsort(feedback.time_us, kind="stable")
    for row in order.tolist():
        key = (str(feedback.request_id[row]), int(feedback.index[row]))
        if key in seen:
            continue
        seen.add(key)
        label = int(feedback.extra[row])
        found = logged.get(key)
        if found is None:
            version = int(feedback.model_version[row])
            result = results.setdefault(version, _no_feedback())
            result.unlogged_labels += 1
            result.unlogged_correct += int(feedback.predicted[row]) == label
            continue
        version = int(predictions.model_version[found])
        predicted = int(predictions.predicted[found])
        result = results.setdefault(version, _no_feedback())
        matrix = matrices.setdefault(version, np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
        if 0 <= label < NUM_CLASSES and 0 <= predicted < NUM_CLASSES:
            matrix[label, predicted] += 1
        result.mismatched += int(feedback.predicted[row]) != predicted
    for version, matrix in matrices.items():
        result = results[version]
        result.confusion = matrix.tolist()
        result.labels = int(matrix.sum())
        result.correct = int(np.trace(matrix))
    return results


def _version_report(
    version: int,
    records: Records,
    reference: dict[str, Any] | None,
    feedback: Feedback,
    width: int,
    min_bucket_images: int,
) -> VersionReport:
    classes = records.predicted
    confidence = records.extra.astype(np.float64)
    mix_counts = class_counts(classes)
    reference_mix: list[float] | None
    reference_confidence: list[float] | None
    if reference is not None:
        edges = [float(e) for e in reference["confidence"]["edges"]]
        threshold = float(reference.get("low_confidence_threshold", LOW_CONFIDENCE_THRESHOLD))
        reference_mix = [float(x) for x in reference["predicted_distribution"]]
        reference_confidence = [float(x) for x in reference["confidence"]["fractions"]]
        reference_rate = reference.get("low_confidence_rate")
    else:
        edges, threshold = list(CONFIDENCE_EDGES), LOW_CONFIDENCE_THRESHOLD
        reference_mix = reference_confidence = reference_rate = None
    confidence_counts = bin_counts(confidence, edges)

    def divergence(counts: np.ndarray, against: list[float] | None) -> float | None:
        return None if against is None else js_divergence(counts, against)

    buckets = []
    slots = records.time_us // (width * _US)
    for slot in np.unique(slots).tolist():
        rows = slots == slot
        count = int(rows.sum())
        enough = count >= min_bucket_images
        buckets.append(
            Bucket(
                iso(slot * width * _US),
                count,
                divergence(class_counts(classes[rows]), reference_mix) if enough else None,
                divergence(bin_counts(confidence[rows], edges), reference_confidence)
                if enough
                else None,
                float(np.mean(confidence[rows] < threshold)) if enough else None,
                _input_divergence(
                    records.mean_intensity[rows], reference, "mean_intensity", min_bucket_images
                ),
                _input_divergence(
                    records.ink_fraction[rows], reference, "ink_fraction", min_bucket_images
                ),
            )
        )
    inputs = _inputs(records, reference)
    return VersionReport(
        version=version,
        images=len(records),
        first=iso(int(records.time_us.min())),
        last=iso(int(records.time_us.max())),
        has_reference=reference is not None,
        class_mix=shares(mix_counts),
        reference_predicted_mix=reference_mix,
        training_label_mix=None
        if reference is None
        else [float(x) for x in reference["class_distribution"]],
        class_mix_divergence=divergence(mix_counts, reference_mix),
        confidence_edges=edges,
        confidence_fractions=shares(confidence_counts),
        reference_confidence_fractions=reference_confidence,
        confidence_divergence=divergence(confidence_counts, reference_confidence),
        low_confidence_threshold=threshold,
        low_confidence_rate=float(np.mean(confidence < threshold)),
        reference_low_confidence_rate=None if reference_rate is None else float(reference_rate),
        buckets=buckets,
        feedback=feedback,
        **inputs,
    )


def _input_divergence(
    values: np.ndarray, reference: dict[str, Any] | None, key: str, at_least: int = 1
) -> float | None:
    """Divergence of the logged inputs' statistic `key` from the training images' (None
    without a reference for it, or with fewer than `at_least` inputs logged)."""
    logged = values[~np.isnan(values)]
    if reference is None or key not in reference or len(logged) < at_least:
        return None
    histogram = reference[key]
    return js_divergence(bin_counts(logged, histogram["edges"]), histogram["fractions"])


def _inputs(records: Records, reference: dict[str, Any] | None) -> dict[str, Any]:
    """The VersionReport fields about the logged inputs."""
    logged = ~np.isnan(records.mean_intensity)
    if not logged.any():
        return {}
    found: dict[str, Any] = {"inputs_logged": int(logged.sum())}
    for key in ("mean_intensity", "ink_fraction"):
        values = getattr(records, key)[logged]
        found[key] = float(values.mean())
        if reference is not None and key in reference:
            mean = reference[key].get("mean")
            found[f"reference_{key}"] = None if mean is None else float(mean)
        found[f"{key}_divergence"] = _input_divergence(values, reference, key)
    return found


# --- the report folder ------------------------------------------------------------------------


def write_report(report: DriftReport, out: Path) -> list[Path]:
    """report.md, summary.json and (with matplotlib) the pictures; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = _plot(report, out)
    (out / "summary.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    names = {key: path.name for key, path in (pictures or {}).items()}
    (out / "report.md").write_text(_markdown(report, names, pictures is not None))
    return [out / "report.md", out / "summary.json", *(pictures or {}).values()]


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(report: DriftReport, pictures: dict[str, str], plotted: bool) -> str:
    lines = [
        f"# Drift report: {report.folder}",
        "",
        f"{report.images} prediction records from {report.first} to {report.last} "
        f"({report.files} files), {report.feedback_rows} feedback labels; "
        f"model version{'s' * (len(report.versions) > 1)} "
        f"{', '.join(str(v.version) for v in report.versions)}.",
        "",
        "Divergences are Jensen-Shannon, in bits: 0 is the reference's distribution, 1 one "
        "that shares nothing with it (the server's `mnist_*_divergence` gauges are the "
        "same numbers over a sliding window).",
        "",
    ]
    if not plotted:
        lines += [
            '*No pictures: matplotlib is not installed (pip install "mnist-serving[drift]").*',
            "",
        ]
    for version in report.versions:
        lines += _version_section(version, pictures)
    lines += _time_section(report, pictures)
    if report.skipped:
        lines += ["## Files not read", ""]
        lines += [f"- {line}" for line in report.skipped]
        lines.append("")
    return "\n".join(lines)


def _version_section(v: VersionReport, pictures: dict[str, str]) -> list[str]:
    lines = [f"## Version {v.version}", "", f"{v.images} images from {v.first} to {v.last}."]
    if not v.has_reference:
        lines += [
            "",
            f"No `reference-v{v.version}.json`: the version was exported before the trainer "
            "wrote a training reference, so there is nothing to compare with.",
        ]
    fb = v.feedback
    accuracy = (
        "no feedback"
        if not fb.labels
        else f"{_number(fb.accuracy)} ({fb.correct}/{fb.labels} labelled records)"
    )
    lines += [
        "",
        "| signal | live | reference |",
        "| --- | --- | --- |",
        f"| class mix divergence | {_number(v.class_mix_divergence)} | 0 |",
        f"| confidence divergence | {_number(v.confidence_divergence)} | 0 |",
        f"| low-confidence rate (top probability < {v.low_confidence_threshold:g}) | "
        f"{_number(v.low_confidence_rate)} | {_number(v.reference_low_confidence_rate)} |",
        f"| accuracy (feedback) | {accuracy} | |",
    ]
    if v.inputs_logged:
        lines += [
            f"| mean intensity divergence ({v.inputs_logged} inputs logged) | "
            f"{_number(v.mean_intensity_divergence)} | 0 |",
            f"| ink fraction divergence | {_number(v.ink_fraction_divergence)} | 0 |",
            f"| mean intensity (mean pixel, 0..1) | {_number(v.mean_intensity)} | "
            f"{_number(v.reference_mean_intensity)} |",
            f"| ink fraction (share of pixels > 0.5) | {_number(v.ink_fraction)} | "
            f"{_number(v.reference_ink_fraction)} |",
        ]
    lines.append("")
    key = f"class-mix-v{v.version}"
    if key in pictures:
        lines += [f"![class mix, version {v.version}]({pictures[key]})", ""]
    lines += [
        "| class | live | reference: predicted on the test set | training labels |",
        "| --- | --- | --- | --- |",
    ]
    for klass in range(NUM_CLASSES):
        ref = v.reference_predicted_mix
        train = v.training_label_mix
        lines.append(
            f"| {klass} | {v.class_mix[klass]:.4f} | "
            f"{_number(None if ref is None else ref[klass])} | "
            f"{_number(None if train is None else train[klass])} |"
        )
    lines.append("")
    key = f"confidence-v{v.version}"
    if key in pictures:
        lines += [f"![confidence, version {v.version}]({pictures[key]})", ""]
    lines += ["| top probability | live | reference |", "| --- | --- | --- |"]
    edges = v.confidence_edges
    for i, share in enumerate(v.confidence_fractions):
        ref = v.reference_confidence_fractions
        low = f"[{edges[i]:g}" if i == 0 else f"({edges[i]:g}"
        lines.append(
            f"| {low}, {edges[i + 1]:g}] | {share:.4f} | "
            f"{_number(None if ref is None else ref[i])} |"
        )
    lines.append("")
    lines += _feedback_section(v, pictures)
    return lines


def _feedback_section(v: VersionReport, pictures: dict[str, str]) -> list[str]:
    fb = v.feedback
    lines = [f"### Feedback, version {v.version}", ""]
    if not fb.labels and not fb.unlogged_labels:
        return [*lines, "No record of this version got a label.", ""]
    lines.append(
        f"{fb.labels} logged records got a label: accuracy {_number(fb.accuracy)} "
        f"({fb.correct} right)."
    )
    if fb.unlogged_labels:
        lines.append(
            f"{fb.unlogged_labels} more labels are for predictions not in the log (not "
            f"sampled): {fb.unlogged_correct} of them right, by the class the server noted."
        )
    if fb.mismatched:
        lines.append(
            f"{fb.mismatched} labels name a request ID whose logged class differs from the "
            "one the server joined: a caller reused a request ID."
        )
    lines.append("")
    key = f"confusion-v{v.version}"
    if key in pictures:
        lines += [f"![confusion matrix, version {v.version}]({pictures[key]})", ""]
    if fb.labels:
        header = " | ".join(str(i) for i in range(NUM_CLASSES))
        lines += [
            f"| label \\ predicted | {header} |",
            "| --- " * (NUM_CLASSES + 1) + "|",
            *(
                f"| {label} | " + " | ".join(str(n) for n in row) + " |"
                for label, row in enumerate(fb.confusion)
            ),
            "",
        ]
    return lines


def _time_section(report: DriftReport, pictures: dict[str, str]) -> list[str]:
    lines = [
        "## Over time",
        "",
        f"Buckets of {_duration(report.bucket_seconds)}; a bucket with fewer than "
        f"{report.min_bucket_images} images gets no numbers (n/a).",
        "",
    ]
    for key, title in (
        ("drift-over-time", "divergence over time"),
        ("low-confidence-over-time", "low-confidence rate over time"),
    ):
        if key in pictures:
            lines += [f"![{title}]({pictures[key]})", ""]
    inputs = any(v.inputs_logged for v in report.versions)
    lines += [
        "| bucket (UTC) | version | images | class mix divergence | confidence divergence | "
        "low-confidence rate |" + (" mean intensity divergence |" if inputs else ""),
        "| --- " * (7 if inputs else 6) + "|",
    ]
    rows = sorted(
        ((b.start, v.version, b) for v in report.versions for b in v.buckets),
        key=lambda row: (row[0], row[1]),
    )
    for start, version, b in rows:
        lines.append(
            f"| {start} | {version} | {b.images} | {_number(b.class_mix_divergence)} | "
            f"{_number(b.confidence_divergence)} | {_number(b.low_confidence_rate)} |"
            + (f" {_number(b.mean_intensity_divergence)} |" if inputs else "")
        )
    lines.append("")
    return lines


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --- pictures (matplotlib, when installed) ----------------------------------------------------


def _plot(report: DriftReport, out: Path) -> dict[str, Path] | None:
    """The pictures written, by name without .png; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    written: dict[str, Path] = {}

    def save(figure: Any, key: str) -> None:
        FigureCanvasAgg(figure)
        figure.tight_layout()
        path = out / f"{key}.png"
        figure.savefig(path, dpi=100)
        written[key] = path

    x = np.arange(NUM_CLASSES)
    for v in report.versions:
        figure = Figure(figsize=(7, 3.6))
        axes = figure.add_subplot()
        series = [("live", v.class_mix)]
        if v.reference_predicted_mix is not None:
            series.append(("reference: test set, predicted", v.reference_predicted_mix))
        if v.training_label_mix is not None:
            series.append(("training labels", v.training_label_mix))
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series):
            axes.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        axes.set_xticks(x)
        axes.set_xlabel("class")
        axes.set_ylabel("share of images")
        axes.set_title(
            f"Class mix, version {v.version} (divergence {_number(v.class_mix_divergence)})"
        )
        axes.legend(fontsize=8)
        save(figure, f"class-mix-v{v.version}")

        figure = Figure(figsize=(7, 3.6))
        axes = figure.add_subplot()
        bins = np.arange(len(v.confidence_fractions))
        names = [f"≤{e:g}" for e in v.confidence_edges[1:]]
        compared = [("live", v.confidence_fractions)]
        if v.reference_confidence_fractions is not None:
            compared.append(("reference: test set", v.reference_confidence_fractions))
        width = 0.8 / len(compared)
        for i, (name, values) in enumerate(compared):
            axes.bar(bins + (i - (len(compared) - 1) / 2) * width, values, width, label=name)
        axes.set_xticks(bins, names, fontsize=7)
        axes.set_xlabel("top probability")
        axes.set_ylabel("share of images")
        axes.set_title(
            f"Confidence, version {v.version} (divergence {_number(v.confidence_divergence)})"
        )
        axes.legend(fontsize=8)
        save(figure, f"confidence-v{v.version}")

        if v.feedback.labels:
            matrix = np.asarray(v.feedback.confusion, np.int64)
            figure = Figure(figsize=(6, 5.5))
            axes = figure.add_subplot()
            axes.imshow(np.log1p(matrix), cmap="Blues")
            top = np.log1p(matrix.max())
            for (row, col), count in np.ndenumerate(matrix):
                if count:
                    color = "white" if np.log1p(count) > 0.6 * top else "black"
                    axes.text(
                        col, row, str(count), ha="center", va="center", fontsize=7, color=color
                    )
            axes.set_xticks(x)
            axes.set_yticks(x)
            axes.set_xlabel("predicted class")
            axes.set_ylabel("true label (feedback)")
            axes.set_title(
                f"Version {v.version}: {v.feedback.labels} labelled, accuracy "
                f"{_number(v.feedback.accuracy)}"
            )
            save(figure, f"confusion-v{v.version}")

    def over_time(buckets: list[Bucket], name: str) -> tuple[np.ndarray, np.ndarray]:
        """(bucket starts, values) of the buckets that have a value of `name`."""
        points = [(b.start, getattr(b, name)) for b in buckets if getattr(b, name) is not None]
        starts = np.array([start.removesuffix("Z") for start, _ in points], "datetime64[s]")
        return starts, np.array([value for _, value in points], np.float64)

    if any(v.has_reference for v in report.versions):
        _plot_divergence(report, over_time, save)

    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    for v in report.versions:
        label = f"version {v.version}"
        line = axes.plot(*over_time(v.buckets, "low_confidence_rate"), marker="o", label=label)
        if v.reference_low_confidence_rate is not None:
            axes.axhline(
                v.reference_low_confidence_rate,
                linestyle="--",
                color=line[0].get_color(),
                label=f"version {v.version}: test set",
            )
    axes.set_ylabel("share of images")
    axes.set_title(f"Low-confidence rate per {_duration(report.bucket_seconds)}")
    axes.legend(fontsize=8)
    figure.autofmt_xdate()
    save(figure, "low-confidence-over-time")
    return written


def _plot_divergence(report: DriftReport, over_time: Any, save: Any) -> None:
    """drift-over-time.png: the divergences per bucket of the versions with a reference."""
    from matplotlib.figure import Figure

    inputs = any(v.inputs_logged for v in report.versions)
    figure = Figure(figsize=(8, 7 if inputs else 5))
    axes = figure.subplots(3 if inputs else 2, 1, sharex=True)
    signals = [("class_mix_divergence", "class mix"), ("confidence_divergence", "confidence")]
    if inputs:
        signals.append(("mean_intensity_divergence", "mean intensity"))
    for v in report.versions:
        if not v.has_reference:
            continue  # nothing to diverge from
        for ax, (name, _) in zip(axes, signals, strict=True):
            ax.plot(*over_time(v.buckets, name), marker="o", label=f"version {v.version}")
    for ax, (_, title) in zip(axes, signals, strict=True):
        ax.set_ylabel(title)
    mix = axes[0]
    mix.set_title(
        "Divergence from the training reference (Jensen-Shannon, bits), per "
        + _duration(report.bucket_seconds)
    )
    mix.legend(fontsize=8)
    figure.autofmt_xdate()
    save(figure, "drift-over-time")
