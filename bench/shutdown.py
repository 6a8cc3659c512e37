"""`python -m bench.shutdown --model-dir DIR`: what callers get when the server is stopped.

Starts mnist-serve, has 32 clients call Predict in a loop (each on its own channel, no
retries, 50 ms pause after an UNAVAILABLE), sends SIGTERM after 2 s and counts every
status until the server has exited. A graceful stop gives OK and UNAVAILABLE only; any
CANCELLED is a call the server dropped. Not a test: the outcome depends on timing.
"""

from __future__ import annotations

import argparse
import collections
import signal
import threading
import time
from pathlib import Path

import grpc

from mnist_serving.contract import IMAGE_SIDE
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.launcher import ServerProcess

CLIENTS = 32
PIXELS = IMAGE_SIDE * IMAGE_SIDE
REQUEST = pb.PredictRequest(
    images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[8, PIXELS], content=bytes(8 * PIXELS))
)


def one_run(model_dir: Path, drain_delay: float) -> collections.Counter[str]:
    server = ServerProcess(model_dir, "--poll-interval", "0", "--drain-delay", str(drain_delay))
    codes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    done = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = predict_pb2_grpc.MnistServiceStub(channel)
            while not done.is_set():
                try:
                    stub.Predict(REQUEST, timeout=30)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    codes[code] += 1
                if code == "UNAVAILABLE":
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    server.process.send_signal(signal.SIGTERM)
    codes["exit code"] = server.process.wait(120)
    time.sleep(0.5)  # clients see the closed port
    done.set()
    for thread in threads:
        thread.join()
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shutdown", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drain-delay", type=float, default=0.0)
    args = parser.parse_args()
    for run in range(args.runs):
        codes = one_run(args.model_dir, args.drain_delay)
        print(f"run {run + 1}: {dict(sorted(codes.items()))}", flush=True)


if __name__ == "__main__":
    main()
