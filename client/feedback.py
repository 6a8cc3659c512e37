"""Ground-truth feedback: the true label of images an earlier Predict call classified.

A label names its prediction by (request ID, index): the request ID the call's answer
carried (`Prediction.request_ids`) and the image's position inside that call (0 for a
single image). Both clients send an iterable of (request_id, index, label) in calls of at
most `MAX_FEEDBACK_LABELS` and sum the answers into one `FeedbackResult`.
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsIndex

from mnist_serving.contract import NUM_CLASSES
from mnist_serving.protos.mnist.v1 import predict_pb2

from .errors import InputFileError, InvalidInput, MnistError

# The server's limit per Feedback call (more is INVALID_ARGUMENT).
MAX_FEEDBACK_LABELS = 10_000
# The longest request ID a server keeps (printable ASCII).
MAX_REQUEST_ID_LENGTH = 128

# (request_id, index, label); numpy integers do too.
FeedbackLabel = tuple[str, SupportsIndex, SupportsIndex]


@dataclass(frozen=True)
class FeedbackResult:
    """What the server did with the labels sent.

    `accepted`: joined to a remembered prediction and counted into live accuracy.
    `unknown`: no remembered prediction (an unknown or expired request ID, an index the call
    did not have, a call the server did not record); `unknown_positions` are their positions
    in the labels given, in order, counted from 0 across all chunks.
    `duplicate`: a prediction that already had a label (the first label counts).
    """

    accepted: int = 0
    unknown: int = 0
    duplicate: int = 0
    unknown_positions: tuple[int, ...] = ()

    @property
    def sent(self) -> int:
        return self.accepted + self.unknown + self.duplicate

    def __add__(self, other: FeedbackResult) -> FeedbackResult:
        return FeedbackResult(
            self.accepted + other.accepted,
            self.unknown + other.unknown,
            self.duplicate + other.duplicate,
            self.unknown_positions + other.unknown_positions,
        )

    @staticmethod
    def from_proto(response: predict_pb2.FeedbackResponse, offset: int) -> FeedbackResult:
        """One call's answer; its positions shifted by `offset`, the chunk's first label."""
        return FeedbackResult(
            int(response.accepted),
            int(response.unknown),
            int(response.duplicate),
            tuple(offset + int(i) for i in response.unknown_indices),
        )

    def __str__(self) -> str:
        return (
            f"{self.sent} labels: {self.accepted} accepted, {self.unknown} unknown or expired, "
            f"{self.duplicate} duplicate"
        )


def check_label(position: int, label: FeedbackLabel) -> predict_pb2.FeedbackLabel:
    """The message of one (request_id, index, label); InvalidInput (a client-side fault,
    code None) naming `position` when it breaks the contract."""
    try:
        request_id, index, klass = label
    except (TypeError, ValueError):
        raise InvalidInput(
            f"feedback label {position}: expected (request_id, index, label), got {label!r}",
            None,
        ) from None
    if not isinstance(request_id, str) or not request_id:
        raise InvalidInput(f"feedback label {position}: empty or missing request ID", None)
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not all(" " <= c <= "~" for c in request_id):
        raise InvalidInput(
            f"feedback label {position}: request ID {request_id[:40]!r} is not 1 to "
            f"{MAX_REQUEST_ID_LENGTH} printable ASCII characters",
            None,
        )
    if not _is_integer(index) or int(index) < 0:
        raise InvalidInput(
            f"feedback label {position}: index must be a whole number >= 0, got {index!r}", None
        )
    if not _is_integer(klass) or not 0 <= int(klass) < NUM_CLASSES:
        raise InvalidInput(
            f"feedback label {position}: label must be 0..{NUM_CLASSES - 1}, got {klass!r}", None
        )
    return predict_pb2.FeedbackLabel(request_id=request_id, index=int(index), label=int(klass))


def _is_integer(value: object) -> bool:
    # numpy integers included; bool and floats are refused.
    return hasattr(value, "__index__") and not isinstance(value, bool)


def feedback_requests(
    labels: Iterable[FeedbackLabel], chunk_size: int = MAX_FEEDBACK_LABELS
) -> Iterator[tuple[int, predict_pb2.FeedbackRequest]]:
    """(offset of the chunk's first label, request) per chunk of at most `chunk_size`; the
    labels are read lazily, so a file of millions is never held whole."""
    if not 1 <= chunk_size <= MAX_FEEDBACK_LABELS:
        raise ValueError(f"chunk_size must be 1..{MAX_FEEDBACK_LABELS}")
    numbered = enumerate(labels)
    while chunk := list(itertools.islice(numbered, chunk_size)):
        messages = [check_label(position, label) for position, label in chunk]
        yield chunk[0][0], predict_pb2.FeedbackRequest(labels=messages)


def partial_failure(error: MnistError, done: FeedbackResult) -> MnistError:
    """`error`, saying what the calls before it did: the server counted those labels, so
    sending them again would make them duplicates."""
    if done.sent == 0:
        return error
    details = (
        f"{error.details} (the {done.sent} labels before it were sent: {done.accepted} "
        f"accepted, {done.unknown} unknown, {done.duplicate} duplicate)"
    )
    typed = type(error)(details, error.code)
    typed.request_id = error.request_id
    return typed


# --- the CLI's file: request_id, index, label ------------------------------------------------

CSV_COLUMNS = ("request_id", "index", "label")
# What `score --request-ids` names the position in the call: its own `index` column is the
# row's position in the data set. When a file has both, this one is the position in the call.
REQUEST_INDEX_COLUMN = "request_index"


def read_feedback_csv(path: Path) -> tuple[list[FeedbackLabel], list[int]]:
    """The labels of a CSV file with a header (columns request_id, label, and optionally
    index, or request_index as `score --request-ids` writes it, which wins over index: 0
    when absent or empty; others ignored), and the line each came from. Every row is
    checked; the first bad one raises InputFileError naming its line. "-" reads stdin."""
    if str(path) == "-":
        return _read_feedback(io.TextIOWrapper(sys.stdin.buffer, "utf-8-sig"), "<stdin>")
    try:
        with path.open(encoding="utf-8-sig", newline="") as stream:
            return _read_feedback(stream, str(path))
    except UnicodeDecodeError as error:
        raise InputFileError(f"{path}: not a UTF-8 text file ({error.reason})") from None


def _read_feedback(stream: io.TextIOBase, name: str) -> tuple[list[FeedbackLabel], list[int]]:
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        raise InputFileError(f"{name}: empty file; expected a header: request_id,index,label")
    columns = [c.strip() for c in header]
    missing = [c for c in ("request_id", "label") if c not in columns]
    if missing:
        raise InputFileError(
            f"{name} line 1: the header has no {' or '.join(missing)} column (it has "
            f"{', '.join(map(repr, columns))}); expected request_id,index,label"
        )
    where = {c: columns.index(c) for c in CSV_COLUMNS if c in columns}
    if REQUEST_INDEX_COLUMN in columns:
        where["index"] = columns.index(REQUEST_INDEX_COLUMN)
    labels: list[FeedbackLabel] = []
    lines: list[int] = []
    # Lines are counted from where a row starts: a quoted field may span several.
    next_line = reader.line_num + 1
    for row in reader:
        line, next_line = next_line, reader.line_num + 1
        if not row or not any(field.strip() for field in row):
            continue  # blank lines
        if len(row) != len(columns):
            raise InputFileError(
                f"{name} line {line}: {len(row)} fields, the header has {len(columns)}"
            )
        request_id = row[where["request_id"]].strip()
        index_text = row[where["index"]].strip() if "index" in where else ""
        label_text = row[where["label"]].strip()
        index = _whole(index_text or "0", name, line, "index")
        label = _whole(label_text, name, line, "label")
        try:
            check_label(len(labels), (request_id, index, label))
        except InvalidInput as error:
            reason = error.details.split(": ", 1)[1]  # without "feedback label N"
            raise InputFileError(f"{name} line {line}: {reason}") from None
        labels.append((request_id, index, label))
        lines.append(line)
    if not labels:
        raise InputFileError(f"{name}: no labels (only a header)")
    return labels, lines


def _whole(text: str, name: str, line: int, column: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputFileError(
            f"{name} line {line}: {column} {text!r} is not a whole number"
        ) from None
