"""Batch scoring: push a data set through the server and write one row per input.

Two engines share the output columns (`outputs`), resuming (`resume`) and the report
(`report`): `pipeline`, the plain engine (one machine, one output file, in order), and
`ray`, the same job on Ray Data (many shards, many servers, a cluster); the latter needs
the `ray` extra and is imported only when used.
"""

from .outputs import OUTPUT_FORMATS, BatchResult, RowFormat
from .pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    JobReport,
    JobSettings,
    Predictor,
    ScoreStats,
    batch_ranges,
    run_job,
    score,
    score_async,
    scored_batches,
)
from .report import Accuracy, confusion_matrix, write_confusion
from .resume import Existing, read_existing, replace_rows

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONCURRENCY",
    "OUTPUT_FORMATS",
    "Accuracy",
    "BatchResult",
    "Existing",
    "JobReport",
    "JobSettings",
    "Predictor",
    "RowFormat",
    "ScoreStats",
    "batch_ranges",
    "confusion_matrix",
    "read_existing",
    "replace_rows",
    "run_job",
    "score",
    "score_async",
    "scored_batches",
    "write_confusion",
]
