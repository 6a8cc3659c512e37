"""`python -m bench.shutdown --model-dir DIR`: what callers get when the server is stopped,
and what the stop costs.

Starts mnist-serve (extra server flags after `--`), has 32 clients call Predict in a tight
loop (each on its own channel, no retries; half send 1 image, half 64; --backoff pauses a
client after each UNAVAILABLE), sends SIGTERM after 2 s and records every call's outcome
and when it was sent, until the server has exited.
Calls sent before the signal must all be OK; calls sent after it may be refused
(UNAVAILABLE, which clients retry elsewhere). Also times a stop with no traffic. Not a
test: the outcome depends on timing.
"""

from __future__ import annotations

import argparse
import collections
import signal
import threading
import time
from pathlib import Path

import grpc

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.launcher import ServerProcess

CLIENTS = 32


def request(images: int) -> pb.PredictRequest:
    return pb.PredictRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[images, 784], content=bytes(images * 784))
    )


def one_run(model_dir: Path, flags: list[str], backoff: float) -> str:
    server = ServerProcess(model_dir, "--poll-interval", "0", *flags)
    calls: list[tuple[float, str]] = []  # (sent, code)
    lock = threading.Lock()
    done = threading.Event()

    def client(images: int) -> None:
        message = request(images)
        with grpc.insecure_channel(server.target) as channel:
            stub = predict_pb2_grpc.MnistServiceStub(channel)
            while not done.is_set():
                sent = time.monotonic()
                try:
                    stub.Predict(message, timeout=30)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    calls.append((sent, code))
                if code == "UNAVAILABLE" and backoff:
                    time.sleep(backoff)

    threads = [threading.Thread(target=client, args=(1 if i % 2 else 64,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(120)
    stop_seconds = time.monotonic() - signalled
    done.set()
    for thread in threads:
        thread.join()
    before = collections.Counter(c for sent, c in calls if sent < signalled)
    after = collections.Counter(c for sent, c in calls if sent >= signalled)
    failed = [signalled - sent for sent, c in calls if sent < signalled and c != "OK"]
    lead = f" (sent {min(failed) * 1e3:.1f}-{max(failed) * 1e3:.1f} ms before)" if failed else ""
    return (
        f"sent before the signal: {dict(sorted(before.items()))}{lead}; "
        f"after: {dict(sorted(after.items()))}; exit {code}; stop took {stop_seconds:.2f} s"
    )


def idle_stop(model_dir: Path, flags: list[str]) -> float:
    server = ServerProcess(model_dir, "--poll-interval", "0", *flags)
    started = time.monotonic()
    server.stop()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shutdown", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=0.0, help="pause after UNAVAILABLE (s)")
    parser.add_argument("flags", nargs="*", help="server flags (after --)")
    args = parser.parse_args()
    for run in range(args.runs):
        print(f"run {run + 1}: {one_run(args.model_dir, args.flags, args.backoff)}", flush=True)
    print(f"stop with no traffic: {idle_stop(args.model_dir, args.flags):.2f} s", flush=True)


if __name__ == "__main__":
    main()
