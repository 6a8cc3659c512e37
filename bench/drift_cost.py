"""`python -m bench.drift_cost --model-dir DIR`: what drift accounting and the feedback
window cost the calls, ratios side by side (issue 24's target: >= 0.97x).

Every setting serves in turn, `--rounds` times (harness.rounds), under the same load (single
images from `--clients` clients; batch-256 requests from 4 clients); each ratio is the
median of the same round's figure divided by the one with both off:
  D0a/D0b  both off again: how far two identical servers differ on this machine
  D1/D2    drift signals and the feedback window on (the defaults)
  D5/D6    the same with --drift-sample-rate 0.1 (one call in ten reaches the drift windows)
  D3/D4    the server process's CPU time per image (user + system, from /proc) on, over off
           (D7/D8: sampled 0.1): less sensitive than throughput to other processes on a
           shared machine, and what the work on the call path costs (target: <= 1/0.97)
"""

from __future__ import annotations

import argparse

from .harness import BATCH, Row, rounds, rounds_main, row

OFF = ["--no-drift", "--feedback-window", "0"]


def run(args: argparse.Namespace) -> list[Row]:
    settings = {
        "off": OFF,
        "drift + feedback window": [],
        "drift sampled 0.1": ["--drift-sample-rate", "0.1"],
        "off again": OFF,
    }
    measured = rounds(
        settings, args.model_dir, count=args.rounds, clients=args.clients, seconds=args.seconds
    )
    rows = measured.rows(
        {
            "off again": ("D0a", "D0b", None),
            "drift + feedback window": ("D1", "D2", 0.97),
            "drift sampled 0.1": ("D5", "D6", 0.97),
        },
        args.clients,
    )
    for label, on, images in (
        ("D3", "drift + feedback window", 1),
        ("D4", "drift + feedback window", BATCH),
        ("D7", "drift sampled 0.1", 1),
        ("D8", "drift sampled 0.1", BATCH),
    ):
        rows.append(
            row(label, f"{on}: server CPU per image, {images} per call / off (lower is better)",
                measured.middle(on, images), "both off", measured.middle("off", images),
                measured.cpu_ratio(on, images), None)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    rounds_main("python -m bench.drift_cost", __doc__, run, argv)


if __name__ == "__main__":
    main()
