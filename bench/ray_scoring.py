"""`python -m bench.ray_scoring --model-dir DIR [--images N] [--json FILE]`: the Ray engine
against the plain scorer, side by side in one run.

The MNIST images (train + test: 70k, or the first --images of them) as 8 Parquet shards,
scored through one server by `mnist-client score --engine ray` and, as one .npz, by the
plain `mnist-client score`; then the Ray job again against two servers. Each is a fresh
CLI process, as a user runs it; the Ray job starts its own local Ray instance. Prints
images/s and the ratios:

  R1  Ray job / plain scorer, one server (the Ray job's cost on one machine; target >= 0.5)
  R2  Ray job, two servers / one server

Ray's figures come twice: end to end (from the command's start of scoring, Ray's own
start-up included) and "after start-up" (from the first shard begun to the last one
written). On a small machine the two servers share the same cores, so R2 shows the
overhead of spreading calls more than any gain. Shared machines are noisy: read the
ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mnist_serving.client.scoring.shards import npz_to_parquet
from mnist_serving.contract import IMAGE_SIDE
from mnist_serving.server.launcher import ServerProcess

PLAIN = re.compile(r"scored (\d+) images in ([\d.]+) s \((\d+) images/s")
RAY = re.compile(r"scored (\d+) images in \d+ shards in ([\d.]+) s \((\d+) images/s; (\d+) after")


def images_and_labels(count: int) -> tuple[np.ndarray, np.ndarray | None]:
    data = os.environ.get("MNIST_PATH")
    if data and Path(data).exists():
        with np.load(data) as mnist:
            images = np.concatenate([mnist["x_train"], mnist["x_test"]])[:count]
            labels = np.concatenate([mnist["y_train"], mnist["y_test"]])[:count]
        return images, labels.astype(np.int64)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8), None


def client(*args: object, timeout: float = 900) -> tuple[str, float]:
    started = time.perf_counter()
    job = subprocess.run(
        [sys.executable, "-m", "mnist_serving.client", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - started
    if job.returncode != 0:
        raise RuntimeError(f"mnist-client {' '.join(map(str, args))} failed:\n{job.stderr}")
    return job.stdout, wall


def plain(target: str, npz: Path, output: Path) -> dict[str, Any]:
    stdout, wall = client("score", "--target", target, "--input", npz, "--output", output,
                          "--no-progress")  # fmt: skip
    found = PLAIN.search(stdout)
    if found is None:
        raise RuntimeError(f"no summary in mnist-client score's output:\n{stdout}")
    return {"images": int(found[1]), "seconds": float(found[2]),
            "images_per_s": float(found[3]), "command_seconds": wall}  # fmt: skip


def ray_job(targets: str, shards: Path, output: Path, num_cpus: int) -> dict[str, Any]:
    stdout, wall = client("score", "--engine", "ray", "--targets", targets, "--input", shards,
                          "--output", output, "--num-cpus", num_cpus, "--no-progress")  # fmt: skip
    found = RAY.search(stdout)
    if found is None:
        raise RuntimeError(f"no summary in the Ray job's output:\n{stdout}")
    return {"images": int(found[1]), "seconds": float(found[2]),
            "images_per_s": float(found[3]), "after_startup_images_per_s": float(found[4]),
            "command_seconds": wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_scoring", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--images", type=int, default=70_000, help="default: all 70k")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                        help="CPUs of the Ray job's local instance (default: all)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    images, labels = images_and_labels(args.images)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        npz = work / "images.npz"
        if labels is None:
            np.savez(npz, x_test=images)
        else:
            np.savez(npz, x_test=images, y_test=labels)
        npz_to_parquet(str(npz), str(work / "shards"), shards=args.shards, splits=("test",))
        one = ServerProcess(args.model_dir, "--poll-interval", "0")
        two = ServerProcess(args.model_dir, "--poll-interval", "0")
        try:
            print(f"plain scorer, {len(images)} images, one server ...", file=sys.stderr)
            base = plain(one.target, npz, work / "plain.csv")
            print(f"Ray job, {args.shards} shards, one server ...", file=sys.stderr)
            single = ray_job(one.target, work / "shards", work / "ray1", args.num_cpus)
            print("Ray job, two servers ...", file=sys.stderr)
            both = f"{one.target},{two.target}"
            double = ray_job(both, work / "shards", work / "ray2", args.num_cpus)
        finally:
            one.stop()
            two.stop()

    rows = {
        "R1": single["images_per_s"] / base["images_per_s"],
        "R1_after_startup": single["after_startup_images_per_s"] / base["images_per_s"],
        "R2": double["images_per_s"] / single["images_per_s"],
        "R2_after_startup": (
            double["after_startup_images_per_s"] / single["after_startup_images_per_s"]
        ),
    }
    print(f"settings: images={len(images)} shards={args.shards} num_cpus={args.num_cpus}")
    print(
        f"plain scorer, 1 server:  {base['images_per_s']:9.0f} images/s "
        f"({base['seconds']:.2f} s scoring, {base['command_seconds']:.1f} s command)"
    )
    for name, figures in (("Ray job, 1 server: ", single), ("Ray job, 2 servers:", double)):
        print(
            f"{name}  {figures['images_per_s']:9.0f} images/s end to end, "
            f"{figures['after_startup_images_per_s']:.0f} after start-up "
            f"({figures['seconds']:.2f} s, {figures['command_seconds']:.1f} s command)"
        )
    print(
        f"R1 Ray / plain, 1 server: {rows['R1']:.2f} end to end, "
        f"{rows['R1_after_startup']:.2f} after start-up (target >= 0.5)"
    )
    print(
        f"R2 Ray 2 servers / 1 server: {rows['R2']:.2f} end to end, "
        f"{rows['R2_after_startup']:.2f} after start-up"
    )
    if args.json:
        figures = {"plain": base, "ray_1_server": single, "ray_2_servers": double, **rows}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
