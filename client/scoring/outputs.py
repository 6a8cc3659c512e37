"""What a scoring job writes, shared by both engines: one row per input with its key,
class, the class's probability, the 10 probabilities and, where it has none, the error.

The plain engine writes those rows as CSV or JSON Lines (`RowFormat`); the Ray engine
writes the same columns to Parquet shards (`prediction_table`), with the model version
and, when the input has them, the labels.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from mnist_serving.contract import NUM_CLASSES

from ..codec import Prediction
from ..errors import InputFileError
from ..inputs import Source

if TYPE_CHECKING:
    import pyarrow as pa

OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class BatchResult:
    """Rows start..stop-1 of a source as scored: what the engines write, one batch at a time."""

    start: int
    stop: int
    prediction: Prediction | None  # the rows not in `errors`, in order
    errors: dict[int, str]  # row index -> why it has no prediction


class RowFormat:
    """One output row per input: key, class, its probability, the 10 probabilities, error;
    with `request_ids`, also the request ID of the call that answered the row and the
    row's position in that call (request_id, request_index: what feedback names it by).

    Rows are made with one %-format per row (a few microseconds): at 100k+ images/s the
    writer, not the server, would otherwise set the pace.
    """

    def __init__(self, kind: str, key_name: str, request_ids: bool = False) -> None:
        self.kind = kind
        self.key_name = key_name
        self.request_ids = request_ids
        columns = [key_name, "class", "probability", *(f"p{i}" for i in range(NUM_CLASSES))]
        if request_ids:
            columns += list(REQUEST_ID_COLUMNS)
        self.columns = [*columns, "error"]
        # %.7g: float32's precision; it also spells valid JSON numbers (0.5, 1e-05).
        numbers = ["%.7g"] * NUM_CLASSES
        if kind == "csv":
            self._template = "%s,%d,%.7g," + ",".join(numbers) + ("%s" if request_ids else "")
            self._template += ",\n"
        else:
            self._template = (
                f'{{"{key_name}": %s, "class": %d, "probability": %.7g, "probabilities": ['
                + ", ".join(numbers)
                + "]"
                + ("%s" if request_ids else "")
                + "}\n"
            )

    @staticmethod
    def for_path(path: Path, key_name: str, request_ids: bool = False) -> RowFormat:
        kind = OUTPUT_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise InputFileError(f"{path}: unknown output format; use .csv or .jsonl (JSON Lines)")
        return RowFormat(kind, key_name, request_ids)

    def header(self) -> str:
        return ",".join(self.columns) + "\n" if self.kind == "csv" else ""

    def rows(self, source: Source, result: BatchResult) -> list[str]:
        """The lines (each ending in a newline) of the result's rows, in order."""
        keys = [self._key(source.key(i)) for i in range(result.start, result.stop)]
        lines = [""] * len(keys)
        if result.prediction is not None:
            slots = [i - result.start for i in range(result.start, result.stop)
                     if i not in result.errors]  # fmt: skip
            prediction = result.prediction
            extra: list[tuple[str, ...]] = [()] * len(slots)
            if self.request_ids:
                extra = [(self._request_id(*pair),) for pair in _request_ids_of(prediction)]
            for slot, klass, confidence, probabilities, more in zip(
                slots,
                prediction.classes.tolist(),
                prediction.confidence.tolist(),
                prediction.probabilities.tolist(),
                extra,
                strict=True,
            ):
                values = (keys[slot], klass, confidence, *probabilities, *more)
                lines[slot] = self._template % values
        for index, error in result.errors.items():
            lines[index - result.start] = self._failed(keys[index - result.start], error)
        return lines

    def _request_id(self, request_id: str | None, position: int | None) -> str:
        """The request ID fields of one row (nothing from a server that sends no IDs)."""
        if self.kind == "csv":
            if request_id is None:
                return ",,"
            return f",{_csv_field(request_id)},{position}"
        if request_id is None:
            return ', "request_id": null, "request_index": null'
        return f', "request_id": {json.dumps(request_id)}, "request_index": {position}'

    def _key(self, key: str | int) -> str:
        if isinstance(key, int):
            return str(key)
        return _csv_field(key) if self.kind == "csv" else json.dumps(key)

    def _failed(self, key: str, error: str) -> str:
        error = " ".join(error.split())  # one row, one line
        if self.kind == "csv":
            return f"{key}{',' * (len(self.columns) - 2)},{_csv_field(error)}\n"
        return f'{{"{self.key_name}": {key}, "error": {json.dumps(error)}}}\n'

    def parse(self, line: str) -> tuple[str, int | None]:
        """(key as text, class or None for a failed row) of one complete row."""
        if self.kind == "csv":
            fields = next(csv.reader([line]))
            if len(fields) != len(self.columns):
                raise ValueError(f"{len(fields)} fields, expected {len(self.columns)}")
            return fields[0], int(fields[1]) if fields[1] else None
        record = json.loads(line)
        klass = record.get("class")
        if klass is not None and self.request_ids != ("request_index" in record):
            # JSON Lines have no header: a row says which kind of job wrote it.
            raise ValueError(
                "it has request IDs and this run writes none: rerun with --request-ids"
                if "request_index" in record
                else "it has no request IDs: rerun without --request-ids"
            )
        return str(record[self.key_name]), None if klass is None else int(klass)


REQUEST_ID_COLUMNS = ("request_id", "request_index")


def _request_ids_of(prediction: Prediction) -> list[tuple[str | None, int | None]]:
    """(request ID, position in its call) per image; (None, None) from a server that sends
    no request IDs."""
    found = prediction.image_request_ids()
    if found is None:
        return [(None, None)] * len(prediction)
    return list(zip(*found, strict=True))


def _csv_field(text: str) -> str:
    if any(c in text for c in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


# --- Parquet (the Ray engine) --------------------------------------------------------------


class RequestIds:
    """Per row of a shard: the request ID of the call that answered it and the row's
    position in that call (None and -1 where it has none: a failed row, a server that
    sends no IDs)."""

    def __init__(self, count: int) -> None:
        self.ids: list[str | None] = [None] * count
        self.positions = np.full(count, -1, np.int32)

    def put(self, start: int, prediction: Prediction) -> None:
        """The rows start.. that `prediction` answered, in order."""
        found = prediction.image_request_ids()
        if found is not None:
            ids, positions = found
            self.ids[start : start + len(ids)] = ids
            self.positions[start : start + len(ids)] = positions

    def fill(self, rows: npt.NDArray[np.int64], answered: RequestIds) -> None:
        """Rows `rows` from `answered`, which holds them in order (a shard's readable rows)."""
        for row, request_id in zip(rows.tolist(), answered.ids, strict=True):
            self.ids[row] = request_id
        self.positions[rows] = answered.positions


def prediction_schema(
    with_labels: bool, key_type: pa.DataType, request_ids: bool = False
) -> pa.Schema:
    """The columns of a Parquet output shard; pyarrow is imported only here (the extra)."""
    import pyarrow as pa

    fields = [
        pa.field("key", key_type, nullable=False),
        pa.field("class", pa.int64()),
        pa.field("probability", pa.float32()),
        pa.field("probabilities", pa.list_(pa.float32(), NUM_CLASSES)),
        pa.field("model_version", pa.int64(), nullable=False),
    ]
    if request_ids:
        # request_index is int32, as `index` in the server's prediction log.
        fields += [pa.field("request_id", pa.string()), pa.field("request_index", pa.int32())]
    if with_labels:
        fields.append(pa.field("label", pa.int64()))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


def prediction_table(
    keys: Sequence[str] | npt.NDArray[np.int64],
    classes: npt.NDArray[np.int64],
    probabilities: npt.NDArray[np.float32],
    model_version: int,
    labels: npt.NDArray[np.int64] | None,
    errors: dict[int, str],
    request_ids: RequestIds | None = None,
) -> pa.Table:
    """One shard's rows: `classes` -1 and `probabilities` NaN where a row has an error.
    Integer keys are written as int64, others as strings: the type the input had. With
    `request_ids`, the columns request_id and request_index (null where a row has none)."""
    import pyarrow as pa

    integers = isinstance(keys, np.ndarray) and np.issubdtype(keys.dtype, np.integer)
    key_type = pa.int64() if integers else pa.string()
    count = len(keys)
    failed = np.zeros(count, bool)
    failed[list(errors)] = True
    confidence = np.take_along_axis(probabilities, np.maximum(classes, 0)[:, None], axis=1)[:, 0]
    flat = pa.array(probabilities.astype(np.float32, copy=False).reshape(-1))
    columns: list[pa.Array] = [
        pa.array(keys, key_type),
        pa.array(classes, pa.int64(), mask=failed),
        pa.array(confidence.astype(np.float32), pa.float32(), mask=failed),
        pa.FixedSizeListArray.from_arrays(flat, NUM_CLASSES, mask=pa.array(failed)),
        pa.array(np.full(count, model_version, np.int64)),
    ]
    if request_ids is not None:
        columns.append(pa.array(request_ids.ids, pa.string()))
        columns.append(pa.array(request_ids.positions, pa.int32(), mask=request_ids.positions < 0))
    if labels is not None:
        columns.append(pa.array(labels, pa.int64()))
    columns.append(pa.array([errors.get(i) for i in range(count)], pa.string()))
    schema = prediction_schema(labels is not None, key_type, request_ids is not None)
    return pa.Table.from_arrays(columns, schema=schema)
