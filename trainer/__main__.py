"""`mnist-train` / `python -m mnist_serving.trainer`: train, evaluate, export with a report.

Exit codes: 0 done, 1 a problem with the data or the model folder (one line on stderr),
2 bad command-line arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mnist_serving.contract import REPORT_DIR, existing_versions, next_version

from .data import DataError, Dataset, download_with_keras, load_path
from .model import ARCHITECTURES

logger = logging.getLogger("mnist_serving.trainer")
PROG = "mnist-train"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train an MNIST classifier and export it as a versioned SavedModel "
        "with a report (metrics.json, history.json, figures) in assets.extra/.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help="Keras-layout mnist.npz, or a folder of the four MNIST IDX files (plain or .gz). "
        "Default: $MNIST_PATH, else Keras' download.",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models/mnist"),
        metavar="PATH",
        help="folder of numbered versions to export into (default: %(default)s)",
    )
    parser.add_argument(
        "--version",
        type=_positive_int,
        metavar="N",
        help="version number to export as (default: the next free one); never overwritten",
    )
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mlp", help="default: mlp")
    parser.add_argument(
        "--epochs", type=_positive_int, default=5, metavar="N", help="default: %(default)s"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="N", help="default: %(default)s"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed Python, numpy and TensorFlow and make ops deterministic, so that runs repeat "
        "(default: %(default)s; pass another value for another draw)",
    )
    parser.add_argument(
        "--early-stopping",
        type=_non_negative_int,
        metavar="PATIENCE",
        help="stop when val_loss has not improved for PATIENCE epochs; keep the best weights",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="debug logging, and TensorFlow's own log lines"
    )
    return parser


def load_dataset(data: Path | None) -> Dataset:
    if data is not None:
        logger.info("Reading MNIST from %s", data)
        return load_path(data)
    logger.info("No --data and no MNIST_PATH: downloading MNIST with Keras")
    return download_with_keras()


def run(args: argparse.Namespace) -> int:
    # Imported here so that --help and argument errors do not wait for TensorFlow.
    from mnist_serving.contract.tfquiet import import_tensorflow

    from .train import VALIDATION_SPLIT, TrainConfig, train_and_export

    if args.version is not None and args.version in existing_versions(args.model_dir):
        raise FileExistsError(
            f"{args.model_dir / str(args.version)} already exists; versions are never "
            f"overwritten (next free: {next_version(args.model_dir)})"
        )
    data = args.data
    if data is None and os.environ.get("MNIST_PATH"):
        data = Path(os.environ["MNIST_PATH"])
    if args.verbose:
        import_tensorflow(verbose=True)  # the first import decides whether TF's logs show
    dataset = load_dataset(data)  # before TensorFlow loads, so that a bad file fails fast
    logger.info(
        "Data: %d training images (%.0f%% held out for validation), %d test images; sha256 %s",
        len(dataset.x_train),
        100 * VALIDATION_SPLIT,
        len(dataset.x_test),
        dataset.sha256,
    )
    config = TrainConfig(
        model_dir=args.model_dir,
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        early_stopping=args.early_stopping,
        version=args.version,
        verbose=args.verbose,
    )
    result = train_and_export(config, dataset)
    metrics = result.metrics
    epochs = f"{metrics['epochs']} epoch{'' if metrics['epochs'] == 1 else 's'}"
    print(
        f"Test loss {metrics['test_loss']:.4f}, test accuracy {metrics['test_accuracy']:.4f} "
        f"({metrics['architecture']}, {epochs}, {metrics['train_seconds']:.1f} s of training)"
    )
    print(f"Exported version {metrics['version']} to {result.version_dir}")
    print(f"Report: {result.version_dir / REPORT_DIR}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stdout,
    )
    try:
        return run(args)
    except (DataError, FileExistsError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was exported", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
