"""The main job end to end: train if there is no model, serve it, score the test set.

`make demo` runs this. Steps, each printed as it happens:
1. `mnist-train` into --model-dir unless a version is already there (the export holds the
   SavedModel and its verified LiteRT twin);
2. `mnist-serve` on --port / --http-port, waiting for health SERVING: it serves the
   twin (--runtime auto), through TensorFlow only for a version without one;
3. `mnist-client score` of the MNIST test set through the server (accuracy, images/s);
4. a look at the server's metrics, then a clean stop (SIGTERM, exit code 0).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mnist_serving.contract import TWIN, existing_versions
from mnist_serving.server.launcher import ServerProcess

# Where Keras' download (the trainer's fallback without --data) leaves the data set.
KERAS_CACHE = Path.home() / ".keras" / "datasets" / "mnist.npz"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("models/mnist"))
    parser.add_argument("--data", default=os.environ.get("MNIST_PATH"), help="MNIST npz or IDX")
    parser.add_argument("--port", default="8500")
    parser.add_argument("--http-port", default="8501")
    parser.add_argument("--output", type=Path, default=Path("out/scores.csv"))
    args = parser.parse_args()
    data = ["--data", args.data] if args.data else []

    versions = existing_versions(args.model_dir)
    if versions:
        step(f"model found: {args.model_dir}/{versions[-1]} (delete it to train again)")
        if not (args.model_dir / str(versions[-1]) / TWIN).exists():
            print(
                f"  it has no LiteRT twin ({TWIN}): it is served through TensorFlow; "
                "train again for a version with one",
                flush=True,
            )
    else:
        step(f"training: no model under {args.model_dir}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mnist_serving.trainer",
                *data,
                "--model-dir",
                str(args.model_dir),
            ],
            check=True,
        )

    step(f"serving {args.model_dir} on :{args.port} (HTTP and metrics :{args.http_port})")
    with ServerProcess(
        args.model_dir,
        "--port",
        args.port,
        "--http-port",
        args.http_port,
        "--poll-interval",
        "0",
        host="127.0.0.1",
    ) as server:
        runtimes = next(
            (f.split("=", 1)[1] for f in server.log.split() if f.startswith("runtimes=")), "?"
        )
        print(
            f"SERVING at {server.target} (version:runtime {runtimes}); "
            f"metrics at {server.metrics_url}",
            flush=True,
        )

        step("scoring the MNIST test set through the server")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        scored = subprocess.run(
            [
                sys.executable,
                "-m",
                "mnist_serving.client",
                "score",
                "--target",
                server.target,
                "--input",
                args.data or str(KERAS_CACHE),
                "--output",
                str(args.output),
            ],
        )
        print(f"scoring took {time.perf_counter() - started:.1f} s; rows in {args.output}")

        step(f"the server's own figures ({server.metrics_url})")
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                counted = line.startswith(("mnist_images_predicted_total", "mnist_requests_total"))
                if counted and not line.endswith(" 0.0"):  # methods never called: left out
                    print("  " + line)

        step("stopping the server (SIGTERM: drain, exit 0)")
        code = server.stop()
        print(f"server exited with {code}")
    return scored.returncode or code


if __name__ == "__main__":
    sys.exit(main())
