"""`mnist-client`: health, metadata, predict and batch score against an mnist-serving server.

Exit codes: 0 success; 1 the server said no (not SERVING, an RPC error, failed rows);
2 bad usage or input (unreadable file, wrong shape, unknown extension).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mnist_serving.contract import IMAGE_SIDE

from .client import (
    BATCH,
    DEFAULT_TIMEOUT,
    PRIORITIES,
    SERVICE_NAME,
    MnistClient,
    Priority,
    authorization,
    tls_credentials,
)
from .codec import Prediction
from .drift_report import DEFAULT_MIN_BUCKET_IMAGES, MAX_BUCKETS
from .errors import InputFileError, MnistError
from .feedback import MAX_FEEDBACK_LABELS, read_feedback_csv
from .inputs import SPLITS, open_source
from .scoring import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    Accuracy,
    JobReport,
    JobSettings,
    confusion_matrix,
    run_job,
    write_confusion,
)
from .scoring.shards import DEFAULT_IMAGES_PER_SHARD

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
    common.add_argument(
        "--token",
        metavar="TOKEN",
        help="the server's API key (mnist-serve --auth-keys); visible to other users in the "
        "process list: prefer --token-file or $MNIST_TOKEN",
    )
    common.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the API key from this file (default: $MNIST_TOKEN, if set)",
    )

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
    _priority_option(predict, None, "default: none, which the server takes as online")
    predict.set_defaults(command=_predict)

    score = commands.add_parser(
        "score",
        parents=[common],
        help="score a data set into CSV or JSON Lines (or Parquet shards on Ray), resumably",
        description=(
            "Score every input of SRC and write one row per input, in order, to OUT (.csv or "
            ".jsonl). With labels (npz y_test, IDX labels, digit-named image folders) print "
            "the accuracy and write OUT's confusion matrix next to it. With --engine ray, SRC "
            "is one or more shards or folders of shards (Parquet, .npy, .npz, images; local or "
            "any pyarrow filesystem: s3://, gs://, ...) and OUT a folder of Parquet shards, "
            "one per input shard, each written exactly once; rerun the same command to finish "
            "an interrupted job."
        ),
    )
    score.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="SRC",
        help=".npz (Keras layout or one array), .npy, IDX file or folder, or image folder; "
        "with --engine ray: shards (.parquet, .npy, .npz) and folders of them or of images",
    )
    score.add_argument("--output", required=True, metavar="OUT")
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
        "--connections",
        type=_positive(int),
        default=JobSettings.connections,
        help="TCP connections to spread the requests over, e.g. one per server worker "
        "(default: %(default)s)",
    )
    score.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted OUT, retrying its failed rows (without it, OUT is replaced)",
    )
    score.add_argument(
        "--request-ids",
        action="store_true",
        help="write each row's request ID and its position in that call (columns request_id, "
        "request_index), to send the job's true labels back with `mnist-client feedback`",
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    _timeout_option(score, DEFAULT_TIMEOUT)
    _priority_option(score, BATCH, "default: %(default)s, behind online callers")
    score.add_argument(
        "--targets",
        metavar="ADDR[,ADDR...]",
        help="servers to spread the calls over, the fewest in flight first; a call that one "
        "fails (or does not answer within half its --timeout) is sent to another. Or one "
        "dns:///NAME:PORT (default: --target)",
    )
    _ray_options(score)
    score.set_defaults(command=_score)

    feedback = commands.add_parser(
        "feedback",
        parents=[common],
        help="send the true labels of earlier predictions (a CSV of request_id, index, label)",
        description=(
            "Send ground truth for earlier predictions. FILE is a CSV with a header naming "
            "the columns request_id, label and optionally index (the image's position in "
            "its call; 0 when absent or empty); other columns are ignored, so the output of "
            "`score --request-ids` with a label column added will do. Every row is checked "
            "before anything is sent. Exit 1 when some labels matched no prediction the "
            "server remembers (they are listed on stderr)."
        ),
    )
    feedback.add_argument("file", type=Path, metavar="FILE.csv", help='a CSV file; "-": stdin')
    feedback.add_argument(
        "--chunk-size",
        type=_positive(int),
        default=MAX_FEEDBACK_LABELS,
        help="labels per call (default and most: %(default)s)",
    )
    _timeout_option(feedback, DEFAULT_TIMEOUT)
    feedback.set_defaults(command=_feedback)

    drift = commands.add_parser(
        "drift-report",
        help="a report of a server's prediction log: class mix, confidence and drift over "
        "time against the training reference, and the confusion matrix of the feedback",
        description=(
            "Read the prediction log folder DIR (mnist-serve --prediction-log DIR: its "
            "predictions-*.parquet, feedback-*.parquet and reference-v*.json) and write "
            "report.md, summary.json and PNG pictures into --out. Needs the drift extra: "
            'pip install "mnist-serving[drift]" (pyarrow; matplotlib for the pictures).'
        ),
    )
    drift.add_argument("folder", type=Path, metavar="DIR", help="the prediction log folder")
    drift.add_argument(
        "--out",
        type=Path,
        default=Path("drift-report"),
        metavar="REPORT_DIR",
        help="where the report goes (default: %(default)s)",
    )
    drift.add_argument(
        "--bucket",
        metavar="DURATION",
        help="time bucket of the drift over time, e.g. 15m, 1h, 1d (default: the shortest "
        f"of 1m, 5m, 15m, 1h, 6h, 1d, 7d that makes at most {MAX_BUCKETS} buckets)",
    )
    drift.add_argument(
        "--min-bucket-images",
        type=_positive(int),
        default=DEFAULT_MIN_BUCKET_IMAGES,
        help="a bucket with fewer images gets no numbers (default: %(default)s)",
    )
    drift.set_defaults(command=_drift_report, target="")

    to_parquet = commands.add_parser(
        "to-parquet",
        help="write a Keras-layout MNIST .npz as Parquet shards (for --engine ray)",
        description="Columns: key (train/0, ..., test/9999), image (784 bytes), label.",
    )
    to_parquet.add_argument("--input", required=True, metavar="NPZ")
    to_parquet.add_argument("--output", required=True, metavar="FOLDER", help="path or URI")
    to_parquet.add_argument(
        "--shards", type=_positive(int), default=8, help="files to write (default: %(default)s)"
    )
    to_parquet.add_argument(
        "--splits",
        default="train,test",
        help="which halves, in order, comma-separated (default: %(default)s)",
    )
    to_parquet.set_defaults(command=_to_parquet)
    return parser


def _ray_options(score: argparse.ArgumentParser) -> None:
    ray = score.add_argument_group('the Ray engine (pip install "mnist-serving[ray]")')
    ray.add_argument(
        "--engine",
        choices=("plain", "ray"),
        default="plain",
        help="plain: this process, one output file; ray: Ray Data over shards (default: "
        "%(default)s)",
    )
    ray.add_argument(
        "--address", help="join this Ray cluster (default: a local instance on this machine)"
    )
    ray.add_argument(
        "--actors",
        type=_positive(int),
        help="scoring actors, each with --concurrency requests in flight (default: one per "
        "CPU of the cluster)",
    )
    ray.add_argument(
        "--num-cpus", type=_positive(int), help="CPUs of the local Ray instance (default: all)"
    )
    ray.add_argument(
        "--images-per-shard",
        type=_positive(int),
        default=DEFAULT_IMAGES_PER_SHARD,
        help="image files per shard of an image folder (default: %(default)s)",
    )
    ray.add_argument(
        "--image-column", default="image", help="Parquet column of the images (default: image)"
    )
    ray.add_argument(
        "--key-column", default="key", help="Parquet column of the keys, if any (default: key)"
    )
    ray.add_argument(
        "--label-column",
        default="label",
        help="Parquet column of the labels, if any (default: label)",
    )


def _timeout_option(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=default,
        help="deadline of each call in seconds, retries included (default: %(default)s)",
    )


def _priority_option(
    parser: argparse.ArgumentParser, default: Priority | None, default_help: str
) -> None:
    parser.add_argument(
        "--priority",
        choices=PRIORITIES,
        default=default,
        help=f"the calls' priority class on the server ({default_help})",
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


def _check_client_certificate(args: argparse.Namespace) -> None:
    if (args.client_cert is None) != (args.client_key is None):
        raise InputFileError("--client-cert and --client-key go together")


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    _check_client_certificate(args)
    if args.tls or args.ca_cert is not None or args.client_cert is not None:
        return tls_credentials(args.ca_cert, args.client_cert, args.client_key)
    return None


def _token(args: argparse.Namespace) -> str | None:
    """The API key: --token, else --token-file's content, else $MNIST_TOKEN, else none."""
    if args.token is not None:
        token, source = str(args.token), "--token"
    elif args.token_file is not None:
        source = f"--token-file {args.token_file}"
        try:
            token = args.token_file.read_text()
        except OSError as error:
            raise InputFileError(f"{source}: {error.strerror}") from None
    else:
        token, source = os.environ.get("MNIST_TOKEN", ""), "$MNIST_TOKEN"
        if not token.strip():
            return None
    try:
        authorization(token)
    except ValueError as error:
        raise InputFileError(f"{source}: {error}") from None
    return token.strip()


def _client(args: argparse.Namespace, **options: Any) -> MnistClient:
    return MnistClient(
        args.target,
        credentials=_credentials(args),
        timeout=args.timeout,
        token=_token(args),
        **options,
    )


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
        parts.append(images.reshape(len(images), IMAGE_SIDE, IMAGE_SIDE))
    if any(p.dtype != np.uint8 for p in parts):
        # One dtype per call: scaled float32 holds raw pixels exactly too.
        parts = [p.astype(np.float32) / 255 if p.dtype == np.uint8 else p for p in parts]
    batch = np.concatenate(parts)
    with _client(args) as client:
        prediction = client.predict(batch, model_version=args.model_version, priority=args.priority)
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
    if args.engine == "ray":
        return _score_ray(args)
    if len(args.input) != 1:
        raise InputFileError("several inputs need --engine ray; the plain engine takes one")
    from tqdm import tqdm

    if args.targets:
        args.target = args.targets  # for error messages
    args.output = Path(args.output)
    source = open_source(Path(args.input[0]), split=args.split, invert=args.invert)
    settings = JobSettings(
        target=args.targets or args.target,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        connections=args.connections,
        model_version=args.model_version,
        timeout=args.timeout,
        credentials=_credentials(args),
        priority=args.priority,
        request_ids=args.request_ids,
        token=_token(args),
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
        matrix = confusion_matrix(labels, report.classes)
        if matrix.sum():
            print(Accuracy.of(matrix))
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


def _score_ray(args: argparse.Namespace) -> int:
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("ray", "pyarrow")):
        raise InputFileError('the Ray engine needs the ray extra: pip install "mnist-serving[ray]"')
    from .scoring.ray import RayJobSettings, run_ray_job, summary_lines
    from .scoring.shards import ReadOptions

    targets = tuple(t.strip() for t in (args.targets or args.target).split(",") if t.strip())
    args.target = ",".join(targets)  # for error messages
    _check_client_certificate(args)
    settings = RayJobSettings(
        targets=targets,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        actors=args.actors or 0,
        model_version=args.model_version,
        timeout=args.timeout,
        tls=args.tls,
        root_certificates=None if args.ca_cert is None else args.ca_cert.read_bytes(),
        client_certificate=None if args.client_cert is None else args.client_cert.read_bytes(),
        client_key=None if args.client_key is None else args.client_key.read_bytes(),
        read=ReadOptions(
            split=args.split,
            invert=args.invert,
            image_column=args.image_column,
            key_column=args.key_column,
            label_column=args.label_column,
        ),
        images_per_shard=args.images_per_shard,
        address=args.address,
        num_cpus=args.num_cpus,
        progress=not args.no_progress,
        priority=args.priority,
        request_ids=args.request_ids,
        token=_token(args),
    )

    def start(todo: int, kept: int) -> None:
        done = f" ({kept} done by an earlier run)" if kept else ""
        print(f"mnist-client: {todo} shards to score{done}", file=sys.stderr, flush=True)

    with _native_stderr_to_file() as ray_log:
        try:
            report = run_ray_job(settings, args.input, args.output, on_start=start)
        except BaseException:
            if ray_log.stat().st_size:
                print(f"mnist-client: Ray's own messages are in {ray_log}", file=sys.stderr)
            else:
                ray_log.unlink()
            raise
    for line in summary_lines(report):
        print(line)
    matrix = report.confusion
    if matrix is not None and matrix.sum():
        print(Accuracy.of(matrix))
        if "://" in args.output:
            print("confusion matrix (rows: label, columns: predicted class):")
            for label, row in enumerate(matrix.tolist()):
                print(f"  {label}: " + " ".join(f"{n:6d}" for n in row))
        else:
            written = write_confusion(matrix, Path(args.output) / "_scores")
            print("confusion matrix: " + ", ".join(str(p) for p in written))
    for outcome in report.failed_shards:
        print(f"mnist-client: shard {outcome.output} failed: {outcome.error}", file=sys.stderr)
    if report.failed_shards or report.failed_rows:
        print(f"mnist-client: Ray's own messages are in {ray_log}", file=sys.stderr)
        return EXIT_FAILED
    ray_log.unlink(missing_ok=True)
    return 0


@contextlib.contextmanager
def _native_stderr_to_file() -> Iterator[Path]:
    """Send what Ray's C++ core (and the processes it starts) write to file descriptor 2
    into a log file, while Python's sys.stderr (our messages, Ray Data's progress bars)
    stays on the terminal: Ray logs a few alarming-looking lines on every run."""
    descriptor, name = tempfile.mkstemp(prefix="mnist-client-ray-", suffix=".log")
    sys.stderr.flush()
    terminal = os.dup(2)
    previous = sys.stderr
    # Our own log lines (e.g. a clamped batch size) stay on the terminal too.
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is previous
    ]
    try:
        os.dup2(descriptor, 2)
        sys.stderr = open(terminal, "w", buffering=1, closefd=False)  # noqa: SIM115
        for handler in handlers:
            handler.setStream(sys.stderr)
        yield Path(name)
    finally:
        sys.stderr.flush()
        for handler in handlers:
            handler.setStream(previous)
        sys.stderr = previous
        os.dup2(terminal, 2)
        os.close(terminal)
        os.close(descriptor)


def _feedback(args: argparse.Namespace) -> int:
    if args.chunk_size > MAX_FEEDBACK_LABELS:
        raise InputFileError(f"--chunk-size is at most {MAX_FEEDBACK_LABELS} (the server's limit)")
    labels, lines = read_feedback_csv(args.file)
    with _client(args) as client:
        result = client.feedback(labels, chunk_size=args.chunk_size)
    calls = -(-len(labels) // args.chunk_size)
    print(f"sent {result} in {calls} call{'s' * (calls != 1)}")
    shown = 10
    for position in result.unknown_positions[:shown]:
        request_id, index, _ = labels[position]
        print(
            f"mnist-client: {args.file} line {lines[position]}: no prediction remembered for "
            f"request {request_id!r} index {index} (unknown or expired)",
            file=sys.stderr,
        )
    if result.unknown > shown:
        print(f"mnist-client: ... and {result.unknown - shown} more unknown", file=sys.stderr)
    return EXIT_FAILED if result.unknown else 0


def _drift_report(args: argparse.Namespace) -> int:
    from .drift_report import build_report, parse_bucket, write_report
    from .predictionlog import read_log

    try:
        bucket = None if args.bucket is None else parse_bucket(args.bucket)
    except ValueError as error:
        raise InputFileError(f"--bucket: {error}") from None
    log = read_log(args.folder)
    report = build_report(log, bucket, args.min_bucket_images)
    written = write_report(report, args.out)
    print(
        f"read {report.images} predictions and {report.feedback_rows} feedback labels "
        f"({report.first} to {report.last}) -> {written[0]}"
    )
    for version in report.versions:
        parts = [f"version {version.version}: {version.images} images"]
        if version.class_mix_divergence is not None:
            parts.append(f"class mix divergence {version.class_mix_divergence:.4f}")
        if version.confidence_divergence is not None:
            parts.append(f"confidence divergence {version.confidence_divergence:.4f}")
        if version.mean_intensity_divergence is not None:
            parts.append(f"mean intensity divergence {version.mean_intensity_divergence:.4f}")
        parts.append(f"low-confidence rate {version.low_confidence_rate:.4f}")
        if version.feedback.labels:
            parts.append(
                f"accuracy {version.feedback.accuracy:.4f} on {version.feedback.labels} labels"
            )
        if not version.has_reference:
            parts.append("no reference")
        print(", ".join(parts))
    for line in report.skipped:
        print(f"mnist-client: skipped {line}", file=sys.stderr)
    return 0


def _to_parquet(args: argparse.Namespace) -> int:
    import importlib.util

    from .scoring.shards import npz_to_parquet

    if importlib.util.find_spec("pyarrow") is None:
        raise InputFileError('to-parquet needs pyarrow: pip install "mnist-serving[ray]"')
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    written = npz_to_parquet(args.input, args.output, shards=args.shards, splits=splits)
    print(f"wrote {len(written)} Parquet shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
