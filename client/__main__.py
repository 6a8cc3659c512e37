"""`mnist-client`: health, metadata, predict and batch score against an mnist-serving server.

Exit codes: 0 success; 1 the server said no (not SERVING, an RPC error, failed rows);
2 bad usage or input (unreadable file, wrong shape, unknown extension).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from .client import DEFAULT_TIMEOUT, SERVICE_NAME, MnistClient, tls_credentials
from .codec import Prediction
from .errors import InputFileError, MnistError
from .inputs import SPLITS, open_source
from .scoring import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    JobReport,
    JobSettings,
    confusion_matrix,
    run_job,
    write_confusion,
)

logger = logging.getLogger("mnist_serving.client")

DEFAULT_TARGET = "localhost:8500"
HEALTH_TIMEOUT = 3.0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="mnist-client: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return int(args.command(args))
    except InputFileError as error:
        print(f"mnist-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    except MnistError as error:
        print(f"mnist-client: {args.target}: {error}", file=sys.stderr)
        return EXIT_USAGE if error.code is None else EXIT_FAILED
    except OSError as error:
        print(f"mnist-client: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mnist-client: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-client", description="Client of the mnist-serving gRPC API."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=os.environ.get("MNIST_TARGET", DEFAULT_TARGET),
        help="server HOST:PORT (default: $MNIST_TARGET or %(default)s)",
    )
    common.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    common.add_argument(
        "--ca-cert", type=Path, metavar="PEM", help="use TLS, trusting this CA (implies --tls)"
    )
    common.add_argument(
        "--client-cert",
        type=Path,
        metavar="PEM",
        help="present this certificate, for servers that require one (mutual TLS; implies --tls)",
    )
    common.add_argument("--client-key", type=Path, metavar="PEM", help="the key of --client-cert")

    health = commands.add_parser(
        "health", parents=[common], help="exit 0 iff the server is SERVING"
    )
    health.add_argument(
        "--service",
        default=SERVICE_NAME,
        help='health service name; "" for the whole server (default: %(default)s)',
    )
    # Short enough to answer inside a container healthcheck's own 5 s timeout.
    _timeout_option(health, HEALTH_TIMEOUT)
    health.set_defaults(command=_health)

    metadata = commands.add_parser("metadata", parents=[common], help="what the server serves")
    metadata.add_argument("--json", action="store_true", help="print JSON")
    _timeout_option(metadata, DEFAULT_TIMEOUT)
    metadata.set_defaults(command=_metadata)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="classify image files (.png/.jpg), .npy, .npz or IDX files",
    )
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _input_options(predict)
    predict.add_argument("--json", action="store_true", help="print JSON")
    _timeout_option(predict, DEFAULT_TIMEOUT)
    predict.set_defaults(command=_predict)

    score = commands.add_parser(
        "score",
        parents=[common],
        help="score a data set into CSV or JSON Lines, resumably",
        description=(
            "Score every input of SRC and write one row per input, in order, to OUT (.csv or "
            ".jsonl). With labels (npz y_test, IDX labels, digit-named image folders) print "
            "the accuracy and write OUT's confusion matrix next to it."
        ),
    )
    score.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="SRC",
        help=".npz (Keras layout or one array), .npy, IDX file or folder, or image folder",
    )
    score.add_argument("--output", required=True, type=Path, metavar="OUT")
    _input_options(score)
    score.add_argument(
        "--batch-size",
        type=_positive(int),
        default=DEFAULT_BATCH_SIZE,
        help="images per request (default: %(default)s)",
    )
    score.add_argument(
        "--concurrency",
        type=_positive(int),
        default=DEFAULT_CONCURRENCY,
        help="requests in flight (default: %(default)s)",
    )
    score.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted OUT, retrying its failed rows (without it, OUT is replaced)",
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    _timeout_option(score, DEFAULT_TIMEOUT)
    score.set_defaults(command=_score)
    return parser


def _timeout_option(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=default,
        help="deadline of each call in seconds, retries included (default: %(default)s)",
    )


def _input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--invert", action="store_true", help="images are dark digits on a light background"
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="which half of a Keras-layout .npz or an IDX folder (default: %(default)s)",
    )
    parser.add_argument(
        "--model-version",
        type=int,
        default=0,
        help="pin a model version (default: the newest)",
    )


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if (args.client_cert is None) != (args.client_key is None):
        raise InputFileError("--client-cert and --client-key go together")
    if args.tls or args.ca_cert is not None or args.client_cert is not None:
        return tls_credentials(args.ca_cert, args.client_cert, args.client_key)
    return None


def _client(args: argparse.Namespace, **options: Any) -> MnistClient:
    return MnistClient(args.target, credentials=_credentials(args), timeout=args.timeout, **options)


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else EXIT_FAILED


def _metadata(args: argparse.Namespace) -> int:
    with _client(args) as client:
        metadata = client.metadata()
    if args.json:
        print(json.dumps(metadata.to_dict(), indent=2))
        return 0
    print(f"model {metadata.name}, at most {metadata.max_images_per_request} images per request")
    for version in metadata.versions:
        details = [version.architecture]
        if version.test_accuracy:
            details.append(f"test accuracy {version.test_accuracy:.4f}")
        if version.trained_at:
            details.append(f"trained {version.trained_at}")
        shown = ", ".join(d for d in details if d)
        print(f"  version {version.version}" + (f": {shown}" if shown else ""))
    for label, specs in (("inputs", metadata.inputs), ("outputs", metadata.outputs)):
        shown = ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in specs)
        print(f"{label}: {shown}")
    print(f"classes: {' '.join(metadata.class_labels)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    names: list[str] = []
    parts: list[np.ndarray] = []
    for path in args.files:
        source = open_source(path, split=args.split, invert=args.invert)
        images, bad = source.load(0, len(source))
        if bad:
            raise InputFileError(next(iter(bad.values())))
        if path.is_dir():
            keys = [f"{path}/{source.key(i)}" for i in range(len(source))]
        elif len(source) == 1:
            keys = [str(path)]
        else:
            keys = [f"{path}[{i}]" for i in range(len(source))]
        names.extend(keys)
        parts.append(images.reshape(len(images), 28, 28))
    if any(p.dtype != np.uint8 for p in parts):
        # One dtype per call: scaled float32 holds raw pixels exactly too.
        parts = [p.astype(np.float32) / 255 if p.dtype == np.uint8 else p for p in parts]
    batch = np.concatenate(parts)
    with _client(args) as client:
        prediction = client.predict(batch, model_version=args.model_version)
    _print_predictions(names, prediction, args.json)
    return 0


def _print_predictions(names: list[str], prediction: Prediction, as_json: bool) -> None:
    confidence = prediction.confidence.tolist()
    classes = prediction.classes.tolist()
    if as_json:
        rows = [
            {
                "input": name,
                "class": klass,
                "probability": float(f"{p:.7g}"),
                "probabilities": [float(f"{q:.7g}") for q in probabilities],
            }
            for name, klass, p, probabilities in zip(
                names, classes, confidence, prediction.probabilities.tolist(), strict=True
            )
        ]
        print(json.dumps({"model_version": prediction.model_version, "predictions": rows}))
        return
    width = max(len(name) for name in names)
    for name, klass, p in zip(names, classes, confidence, strict=True):
        print(f"{name:<{width}}  {klass}  ({p:.4f})")


def _score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    source = open_source(args.input, split=args.split, invert=args.invert)
    settings = JobSettings(
        target=args.target,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        model_version=args.model_version,
        timeout=args.timeout,
        credentials=_credentials(args),
    )
    bars: list[tqdm[Any]] = []

    def start(done: int) -> None:
        # Made once the rows already done are known, so that the rate counts new ones only.
        bars.append(
            tqdm(
                total=len(source),
                initial=done,
                unit="img",
                unit_scale=True,
                disable=True if args.no_progress else None,  # None: off unless a terminal
                dynamic_ncols=True,
            )
        )

    def advance(rows: int) -> None:
        bars[0].update(rows)

    try:
        report = run_job(
            settings,
            source,
            args.output,
            resume=args.resume,
            on_start=start,
            on_rows=advance,
        )
    finally:
        for bar in bars:
            bar.close()
    return _summarise(report, source.labels, args)


def _summarise(report: JobReport, labels: np.ndarray | None, args: argparse.Namespace) -> int:
    stats = report.stats
    if report.resumed_rows:
        kept = f"kept {report.resumed_rows} rows from the earlier run"
        if report.rescored_rows:
            kept += f", re-scored {report.rescored_rows} that had failed"
        print(kept)
    if stats.images == 0:
        print(f"nothing left to score: {args.output} has every row")
    else:
        print(
            f"scored {stats.images} images in {stats.seconds:.2f} s "
            f"({stats.images_per_second:.0f} images/s; batches of {report.batch_size}, "
            f"{args.concurrency} in flight), model version {stats.model_version}; "
            f"{stats.failed} failed -> {args.output}"
        )
    if labels is not None:
        answered = report.classes >= 0
        correct = int((report.classes[answered] == labels[answered]).sum())
        total = int(answered.sum())
        if total:
            print(f"accuracy {correct / total:.4f} ({correct}/{total} with a prediction)")
            matrix = confusion_matrix(labels, report.classes)
            written = write_confusion(matrix, args.output)
            print("confusion matrix: " + ", ".join(str(p) for p in written))
    for (start, stop), message in zip(stats.failed_ranges, stats.errors, strict=True):
        print(f"mnist-client: rows {start}-{stop - 1} failed: {message}", file=sys.stderr)
    if report.stopped_early:
        done = int(np.flatnonzero(report.classes >= 0).max(initial=-1)) + 1
        print(
            f"mnist-client: stopped after repeated failures (about row {done}); "
            "fix the cause and rerun with --resume",
            file=sys.stderr,
        )
    if stats.failed_ranges or report.stopped_early:
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
