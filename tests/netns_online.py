"""An online caller for tests/test_netns.py, run inside the client's network namespace:
`python -m tests.netns_online TARGETS OUT STOP`. It calls Predict in a loop with the
library's defaults (retry policy, keepalive) and a 10 s deadline, over every target. OUT
gets one JSON line per server (its target and request-ID prefix), then one per call
(monotonic start and end, the answering server's prefix, the error if any), until the
file STOP exists.

`python -m tests.netns_online --dead-peer TARGET` connects to TARGET, prints "ready", and
once a line arrives on stdin makes one call with no deadline and prints how it ended and
after how long: only keepalive can end a call to a server cut off by a partition.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from mnist_serving.client import MnistClient, MnistError

DEADLINE = 10.0


def dead_peer(target: str) -> None:
    images = np.zeros((1, 28, 28), np.uint8)
    with MnistClient(target, timeout=None) as client:
        client.predict(images)
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        try:
            client.predict(images)
            print("answered", flush=True)
        except MnistError as error:
            print(f"{time.monotonic() - started:.2f} {error}", flush=True)


def main() -> None:
    if sys.argv[1] == "--dead-peer":
        dead_peer(sys.argv[2])
        return
    targets, out, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), np.uint8)
    with out.open("w") as log:
        for target in targets.split(","):  # which request-ID prefix is which server
            with MnistClient(target, timeout=DEADLINE) as alone:
                ids = alone.predict(images[:1]).request_ids
            log.write(json.dumps({"target": target, "server": ids[0][:16]}) + "\n")
    with MnistClient(targets, timeout=DEADLINE) as client, out.open("a") as log:
        while not stop.exists():
            started = time.monotonic()
            record: dict[str, object] = {"start": started}
            try:
                answer = client.predict(images)
                record["server"] = answer.request_ids[0][:16] if answer.request_ids else ""
            except MnistError as error:
                record["error"] = str(error)
            record["end"] = time.monotonic()
            log.write(json.dumps(record) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
