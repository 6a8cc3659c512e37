"""Reading a server's prediction log folder (`mnist-serve --prediction-log DIR`).

The folder holds, by the contract the server writes it to:

    predictions-<YYYYmmddTHHMMSSZ>-<pid>-<seq>.parquet   one row per image answered (sampled)
    feedback-<YYYYmmddTHHMMSSZ>-<pid>-<seq>.parquet      one row per accepted feedback label
    reference-v<version>.json                            each served version's training reference

Files are written as `<name>.parquet.tmp` and renamed: only `*.parquet` are read, so a file
being written is never half read. The `input` (784 bytes per image) and `probabilities`
columns are not read: the report needs neither, and they are most of a file's bytes.
pyarrow (the `drift` extra) is imported only here, when a log is read.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mnist_serving.contract.reference import check_reference, input_statistics

from .errors import InputFileError

logger = logging.getLogger(__name__)

PREDICTIONS_GLOB = "predictions-*.parquet"
FEEDBACK_GLOB = "feedback-*.parquet"
REFERENCE_NAME = re.compile(r"reference-v(\d+)\.json")
PREDICTION_COLUMNS = ("time", "request_id", "index", "model_version", "predicted", "confidence")
PIXELS = 28 * 28
FEEDBACK_COLUMNS = ("time", "request_id", "index", "label", "model_version", "predicted")


@dataclass
class Records:
    """Columns of the rows read, in file order: times in microseconds since the epoch
    (UTC), request IDs, indexes in their calls, versions, classes, and per kind `extra`
    (confidence for predictions, label for feedback)."""

    time_us: npt.NDArray[np.int64]
    request_id: npt.NDArray[np.object_]
    index: npt.NDArray[np.int64]
    model_version: npt.NDArray[np.int64]
    predicted: npt.NDArray[np.int64]
    extra: npt.NDArray[Any]
    # Per image, from the logged input (NaN where none: --log-inputs off, or feedback).
    mean_intensity: npt.NDArray[np.float32]
    ink_fraction: npt.NDArray[np.float32]

    FIELDS = (
        "time_us", "request_id", "index", "model_version", "predicted", "extra",
        "mean_intensity", "ink_fraction",
    )  # fmt: skip

    def __len__(self) -> int:
        return len(self.time_us)

    def take(self, rows: npt.NDArray[np.intp] | npt.NDArray[np.bool_]) -> Records:
        return Records(
            self.time_us[rows],
            self.request_id[rows],
            self.index[rows],
            self.model_version[rows],
            self.predicted[rows],
            self.extra[rows],
            self.mean_intensity[rows],
            self.ink_fraction[rows],
        )


@dataclass
class PredictionLog:
    folder: Path
    predictions: Records  # extra: confidence (float32)
    feedback: Records  # extra: label (int64)
    references: dict[int, dict[str, Any]]  # version -> its training reference
    files: int  # Parquet files read
    skipped: list[str] = field(default_factory=list)  # "file: why" for files not read


def read_log(folder: Path) -> PredictionLog:
    """Every prediction, feedback label and reference of `folder`. A file that cannot be
    read (not Parquet, a column missing) is skipped and named in `skipped`; a folder
    without prediction files is an InputFileError."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputFileError(
            'drift-report needs pyarrow and matplotlib: pip install "mnist-serving[drift]"'
        ) from None
    if not folder.is_dir():
        raise InputFileError(f"{folder}: not a folder (the server's --prediction-log DIR)")
    skipped: list[str] = []
    prediction_files = sorted(folder.glob(PREDICTIONS_GLOB))
    feedback_files = sorted(folder.glob(FEEDBACK_GLOB))
    predictions = _read_all(prediction_files, PREDICTION_COLUMNS, "confidence", skipped)
    feedback = _read_all(feedback_files, FEEDBACK_COLUMNS, "label", skipped)
    if not prediction_files:
        raise InputFileError(
            f"{folder}: no {PREDICTIONS_GLOB} files; is it a server's --prediction-log folder?"
        )
    references: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("reference-v*.json")):
        match = REFERENCE_NAME.fullmatch(path.name)
        if match is None:
            continue
        try:
            references[int(match.group(1))] = check_reference(
                json.loads(path.read_text()), lenient=True
            )
        except (OSError, ValueError) as error:
            skipped.append(f"{path.name}: {error}")
    read = len(prediction_files) + len(feedback_files)
    return PredictionLog(folder, predictions, feedback, references, read - len(skipped), skipped)


def _read_all(
    paths: list[Path], columns: tuple[str, ...], extra: str, skipped: list[str]
) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = []
    for path in paths:
        try:
            wanted = list(columns)
            if extra == "confidence" and "input" in pq.read_schema(path).names:
                wanted.append("input")
            parts.append(_records(pq.read_table(path, columns=wanted), extra))
        except (pa.ArrowException, OSError, KeyError, ValueError) as error:
            skipped.append(f"{path.name}: {_first_line(error)}")
    if not parts:
        return _empty(extra)
    return Records(*(np.concatenate([getattr(p, name) for p in parts]) for name in Records.FIELDS))


def _records(table: Any, extra: str) -> Records:
    """One file's columns, cast to the types the contract names (an int8 class, an int32
    index and a float32 confidence widen; a timestamp of any unit becomes microseconds)."""
    import pyarrow as pa

    def numbers(name: str, kind: Any) -> npt.NDArray[Any]:
        column = table.column(name)
        if column.null_count:
            raise ValueError(f"column {name!r} has {column.null_count} nulls")
        return np.asarray(column.cast(kind).to_numpy())

    time_type = table.schema.field("time").type
    if not pa.types.is_timestamp(time_type):
        raise ValueError(f"column 'time' is {time_type}, not a timestamp")
    times = table.column("time").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    mean_intensity, ink_fraction = _input_statistics(table)
    return Records(
        np.asarray(times.to_numpy(), np.int64),
        np.asarray(table.column("request_id").to_pylist(), object),
        numbers("index", pa.int64()),
        numbers("model_version", pa.int64()),
        numbers("predicted", pa.int64()),
        numbers(extra, pa.float32() if extra == "confidence" else pa.int64()),
        mean_intensity,
        ink_fraction,
    )


def _input_statistics(table: Any) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Per row, the mean pixel in [0, 1] and the share of pixels > 127 of the logged input
    (784 uint8 bytes), as the trainer's reference computes them; NaN where none was logged."""
    count = table.num_rows
    mean = np.full(count, np.nan, np.float32)
    ink = np.full(count, np.nan, np.float32)
    if "input" not in table.column_names or table.column("input").null_count == count:
        return mean, ink
    import pyarrow as pa

    column = table.column("input")
    present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    # Only the logged values, as one array with int64 offsets: they lie one after the
    # other in its data buffer.
    values = column.filter(pa.array(present)).combine_chunks().cast(pa.large_binary())
    offsets = np.frombuffer(values.buffers()[1], np.int64)
    offsets = offsets[values.offset : values.offset + len(values) + 1]
    if np.any(np.diff(offsets) != PIXELS):
        raise ValueError(f"column 'input' holds values that are not {PIXELS} bytes")
    data = np.frombuffer(values.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    mean[present], ink[present] = input_statistics(data.reshape(-1, PIXELS))
    return mean, ink


def _empty(extra: str) -> Records:
    return Records(
        np.empty(0, np.int64),
        np.empty(0, object),
        np.empty(0, np.int64),
        np.empty(0, np.int64),
        np.empty(0, np.int64),
        np.empty(0, np.float32 if extra == "confidence" else np.int64),
        np.empty(0, np.float32),
        np.empty(0, np.float32),
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
