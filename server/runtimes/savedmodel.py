"""What a version folder says about itself, read without any runtime: the SavedModel's
signatures (for TensorFlow Serving's GetModelMetadata) and the trainer's report.

saved_model.pb is parsed with the subset of TensorFlow's saved_model.proto and
meta_graph.proto compiled into this project's private descriptor pool (protos/tensorflow/):
the graph, the saver and the object graph are not declared there and stay unknown fields,
and a SignatureDef copied out keeps every field, declared or not, so re-serialising it
gives TensorFlow Serving's bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mnist_serving.contract import REPORT, SAVED_MODEL, SIGNATURES
from mnist_serving.protos.tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

logger = logging.getLogger(__name__)


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDef protos of the served signatures (not __saved_model_init_op)."""
    saved_model = saved_model_pb2.SavedModel.FromString((path / SAVED_MODEL).read_bytes())
    graphs = saved_model.meta_graphs
    if not graphs:
        raise ValueError(f"{path / SAVED_MODEL} holds no MetaGraphDef")
    # The "serve" graph, as TensorFlow Serving picks; tf.saved_model.save writes only that one.
    graph = next((g for g in graphs if "serve" in g.meta_info_def.tags), graphs[0])
    signature_defs = {}
    for signature in SIGNATURES.values():
        if signature not in graph.signature_def:
            raise ValueError(f"{path} has no {signature!r} signature")
        copy = meta_graph_pb2.SignatureDef()
        copy.CopyFrom(graph.signature_def[signature])  # copied: the graph need not stay in memory
        signature_defs[signature] = copy
    return signature_defs


def read_report(path: Path) -> dict[str, Any]:
    """The trainer's metrics.json; empty (and a warning) when it is missing or unreadable."""
    try:
        report = json.loads((path / REPORT).read_text())
    except (OSError, ValueError):
        logger.warning("no readable training report", extra={"path": str(path / REPORT)})
        return {}
    return report if isinstance(report, dict) else {}
