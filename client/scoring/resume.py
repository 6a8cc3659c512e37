"""Resuming a job. The plain engine continues one output file after its last complete row
(`read_existing`, `replace_rows`); the Ray engine commits whole shards under deterministic
names, atomically (`write_atomically`), and a rerun skips those already there.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputFileError
from ..inputs import Source
from .outputs import RowFormat

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs


@dataclass
class Existing:
    """The complete rows an interrupted run left: how many, their classes (-1 = failed)."""

    rows: int
    classes: list[int]
    truncated_bytes: int


def read_existing(path: Path, fmt: RowFormat, source: Source) -> Existing:
    """Check `path` against `source` row by row and cut a half-written last line."""
    classes: list[int] = []
    good_end = 0
    with path.open("rb") as stream:
        if fmt.kind == "csv":
            header = stream.readline()
            if not header.endswith(b"\n"):
                header = b""  # killed while writing the header: start over
            elif header.decode() != fmt.header():
                other = RowFormat(fmt.kind, fmt.key_name, not fmt.request_ids)
                if header.decode() == other.header():
                    flag = "with" if other.request_ids else "without"
                    raise InputFileError(
                        f"{path}: was written {flag} --request-ids; resume it the same way, "
                        "or run without --resume to start over"
                    )
                raise InputFileError(
                    f"{path}: its header does not match this job's columns; "
                    "score into a new file, or run without --resume to start over"
                )
            good_end = len(header)
        for raw in stream:
            if not raw.endswith(b"\n"):
                break  # the line a killed run was writing
            index = len(classes)
            if index >= len(source):
                raise InputFileError(f"{path}: has more rows than the input has items")
            try:
                key, klass = fmt.parse(raw.decode())
            except (ValueError, KeyError, UnicodeDecodeError) as error:
                raise InputFileError(f"{path}: row {index} is unreadable ({error})") from None
            if key != str(source.key(index)):
                raise InputFileError(
                    f"{path}: row {index} is for {key!r} but input {index} is "
                    f"{source.key(index)!r}; was it written from another input?"
                )
            classes.append(-1 if klass is None else klass)
            good_end += len(raw)
        size = stream.seek(0, os.SEEK_END)
    if size != good_end:
        with path.open("r+b") as stream:
            stream.truncate(good_end)
    return Existing(len(classes), classes, size - good_end)


def replace_rows(path: Path, fmt: RowFormat, new_rows: dict[int, str]) -> None:
    """Rewrite `path` with some rows replaced (atomically: a kill leaves the old file)."""
    temporary = path.with_name(path.name + ".partial")
    with (
        path.open("r", encoding="utf-8", newline="") as old,
        temporary.open("w", encoding="utf-8", newline="") as new,
    ):
        if fmt.kind == "csv":
            new.write(old.readline())
        for index, line in enumerate(old):
            new.write(new_rows.get(index, line))
        new.flush()
        os.fsync(new.fileno())
    os.replace(temporary, path)


# --- whole shards (the Ray engine) -----------------------------------------------------------

TEMPORARY_MARK = ".partial-"


def write_atomically(table: pa.Table, filesystem: pyarrow.fs.FileSystem, path: str) -> None:
    """Write `table` as Parquet beside `path`, then rename it there: readers (and a rerun)
    see the whole shard or nothing. The temporary name is unique per attempt, so two
    attempts at one shard (a restarted worker and the one it replaced) never share a file;
    the last rename wins, and both wrote the same rows."""
    import pyarrow.parquet as pq

    folder, _, name = path.rpartition("/")
    temporary = f"{folder}/.{name}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    pq.write_table(table, temporary, filesystem=filesystem)
    filesystem.move(temporary, path)


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMPORARY_MARK in name
