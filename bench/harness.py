"""The bench harness: what every benchmark shares.

- One closed-loop load generator: `clients` tasks, spread over `connections` channels (or
  HTTP sessions), each sends a request of `images` images through one protocol, waits for
  the answer and sends the next, for `seconds` after a `WARMUP`. The request is built once;
  with `decode` every answer is also decoded into numpy arrays, as a real caller would.
- One way to run it in its own process, so that client and server don't share a GIL:
  `load()` starts `python -m bench.harness ...` (several at once with `processes`, each
  pinned to `cpus` if given) and merges what they print, one JSON object each.
- One row type, `Row` (a ratio, its target, the figures of both sides), one table printer,
  one JSON writer, and `rss_mb`.
Each benchmark module is the rows it adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mnist_serving.contract import IMAGE_SIDE, INPUT_NAME, NUM_CLASSES

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The load generator runs this long before it counts calls.
WARMUP = 1.0
PROTOCOLS = ("native", "v2_grpc", "v2_http_binary", "v2_http_json", "tfserving_rest")
GRPC_PROTOCOLS = ("native", "v2_grpc")
NAN = float("nan")

# What a load run measured: req_per_s, images_per_s, p50_ms, p99_ms (and, from load(),
# seconds and errors); the benchmarks make such dicts of their own figures too.
Stats = dict[str, Any]
Call = Callable[[], Awaitable[None]]


# --- the load generator (runs in the child process) ------------------------------------


def pixels(images: int) -> np.ndarray:
    """The images every load run sends: `images` random uint8 digits, the same each time."""
    shape = (images, IMAGE_SIDE, IMAGE_SIDE)
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def grpc_call(
    protocol: str,
    channel: grpc.aio.Channel,
    images: np.ndarray,
    decode: bool,
    priority: str | None = None,
    token: str | None = None,
) -> Call:
    if protocol == "native":
        from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
        from mnist_serving.protos.mnist.v1 import predict_pb2_grpc

        request = pb.PredictRequest(
            images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes())
        )
        predict = predict_pb2_grpc.MnistServiceStub(channel).Predict
        sent: tuple[tuple[str, str], ...] = (("mnist-priority", priority),) if priority else ()
        sent += (("authorization", f"Bearer {token}"),) if token else ()
        metadata = sent or None

        async def native() -> None:
            answer = await predict(request, timeout=30, metadata=metadata)
            if decode:
                np.frombuffer(answer.probabilities.content, "<f4").reshape(-1, NUM_CLASSES)
                np.frombuffer(answer.classes.content, "<i8")

        return native
    # tritonclient's generated code: the public proto, not ours.
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    v2_request = service_pb2.ModelInferRequest(model_name="mnist")
    v2_request.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=images.shape)
    v2_request.raw_input_contents.append(images.tobytes())
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

    async def v2() -> None:
        answer = await infer(v2_request, timeout=30)
        if decode:
            np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(-1, NUM_CLASSES)
            np.frombuffer(answer.raw_output_contents[1], "<i8")

    return v2


def http_call(protocol: str, session: Any, images: np.ndarray, decode: bool) -> Call:
    shape = list(images.shape)
    headers: dict[str, str] = {}
    tensor: dict[str, Any]
    if protocol == "tfserving_rest":
        path = "/v1/models/mnist:predict"
        body = json.dumps({"instances": images.tolist()}).encode()
    elif protocol == "v2_http_json":
        path = "/v2/models/mnist/infer"
        tensor = {
            "name": INPUT_NAME,
            "datatype": "UINT8",
            "shape": shape,
            "data": images.ravel().tolist(),
        }
        body = json.dumps({"inputs": [tensor]}).encode()
    else:
        path = "/v2/models/mnist/infer"
        tensor = {
            "name": INPUT_NAME,
            "datatype": "UINT8",
            "shape": shape,
            "parameters": {"binary_data_size": images.nbytes},
        }
        header = json.dumps(
            {"inputs": [tensor], "parameters": {"binary_data_output": True}}
        ).encode()
        headers = {"Inference-Header-Content-Length": str(len(header))}
        body = header + images.tobytes()

    async def rest() -> None:
        async with session.post(path, data=body, headers=headers) as answer:
            data = await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"HTTP {answer.status}: {data[:200]!r}")
            length = answer.headers.get("Inference-Header-Content-Length")
        if not decode:
            return
        if protocol == "tfserving_rest":
            rows = json.loads(data)["predictions"]
            np.array([row["probabilities"] for row in rows], dtype=np.float32)
            np.array([row["classes"] for row in rows], dtype=np.int64)
        elif length is None:
            outputs = json.loads(data)["outputs"]
            np.array(outputs[0]["data"], dtype=np.float32).reshape(outputs[0]["shape"])
            np.array(outputs[1]["data"], dtype=np.int64)
        else:
            outputs = json.loads(data[: int(length)])["outputs"]
            sizes = [o["parameters"]["binary_data_size"] for o in outputs]
            start = int(length)
            np.frombuffer(data, "<f4", count=sizes[0] // 4, offset=start).reshape(-1, NUM_CLASSES)
            np.frombuffer(data, "<i8", count=sizes[1] // 8, offset=start + sizes[0])

    return rest


def connect(protocol: str, target: str) -> Any:
    """A gRPC channel with its own TCP connection, or an HTTP session (its own pool)."""
    if protocol in GRPC_PROTOCOLS:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),  # a TCP connection per channel
        ]
        return grpc.aio.insecure_channel(target, options=options)
    import aiohttp

    return aiohttp.ClientSession(
        f"http://{target}",
        timeout=aiohttp.ClientTimeout(total=30),
        skip_auto_headers=["Accept-Encoding"],
    )


async def generate(
    protocol: str,
    target: str,
    images: int,
    clients: int,
    connections: int,
    seconds: float,
    warmup: float = WARMUP,
    decode: bool = False,
    priority: str | None = None,
    token: str | None = None,
) -> Stats:
    """The closed loop, in this process: what one load generator process measured
    (`priority`: the class native calls declare; the server's default when None; `token`:
    the API key native calls send)."""
    batch = pixels(images)
    links = [connect(protocol, target) for _ in range(connections)]
    if protocol in GRPC_PROTOCOLS:
        calls = [grpc_call(protocol, link, batch, decode, priority, token) for link in links]
    else:
        calls = [http_call(protocol, link, batch, decode) for link in links]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def client(index: int) -> None:
        call = calls[index % len(calls)]
        while (now := time.perf_counter()) < stop_at:
            try:
                await call()
            except Exception as error:  # a bench counts failures, it does not stop on one
                name = (
                    error.code().name
                    if isinstance(error, grpc.aio.AioRpcError)
                    else type(error).__name__
                )
                errors[name] = errors.get(name, 0) + 1
                continue
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)

    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - measure_from
    await asyncio.gather(*(link.close() for link in links))
    done = np.array(latencies) if latencies else np.array([NAN])
    return {
        "requests": len(latencies),
        "images": len(latencies) * images,
        "seconds": elapsed,
        "p50_ms": float(np.percentile(done, 50) * 1000),
        "p99_ms": float(np.percentile(done, 99) * 1000),
        "errors": errors,
    }


# --- starting it in processes of its own (the benchmark's side) ------------------------


def cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}"""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pin(pid: int, cpus: set[int]) -> None:
    """Pin a running process to `cpus`: every thread it has now (sched_setaffinity on a pid
    moves that one thread only), and so every thread they start later."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def load(
    target: str,
    images: int,
    clients: int,
    seconds: float,
    *,
    protocol: str = "native",
    connections: int = 1,
    processes: int = 1,
    cpus: set[int] | None = None,
    decode: bool = False,
    priority: str | None = None,
    token: str | None = None,
) -> Stats:
    """Closed-loop load on `target` from `processes` load generators at once, each in its
    own process, the clients and connections split among them: the figures of them all
    (rates summed, the slowest generator's latencies). `token`: an API key that native calls
    send (handed over in the environment, not the command line)."""
    runs = []
    for index in range(processes):
        share = clients // processes + (index < clients % processes)
        links = max(1, connections // processes + (index < connections % processes))
        command = [
            sys.executable, "-m", "bench.harness", "--protocol", protocol, "--target", target,
            "--images", str(images), "--clients", str(share), "--connections", str(links),
            "--seconds", str(seconds), *(["--decode"] if decode else []),
            *(["--priority", priority] if priority else []),
        ]  # fmt: skip
        env = {**os.environ, TOKEN_ENV: token} if token else None
        run = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        if cpus:
            os.sched_setaffinity(run.pid, cpus)  # before its warm-up ends
        runs.append(run)
    results = []
    for run in runs:
        out, _ = run.communicate(timeout=seconds + 120)
        if run.returncode:
            raise RuntimeError(f"the load generator failed ({run.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds_run = max(r["seconds"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for code, count in r["errors"].items():
            errors[code] = errors.get(code, 0) + count
    if errors:
        print(f"  note: {protocol} on {target} answered errors {errors}", file=sys.stderr)
    return {
        "req_per_s": sum(r["requests"] for r in results) / seconds_run,
        "images_per_s": sum(r["images"] for r in results) / seconds_run,
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "seconds": seconds_run,
        "errors": errors,
    }


# --- rows, the table, JSON ---------------------------------------------------------------


@dataclass
class Row:
    """One comparison: `ratio` of a figure of the served side to the same of a baseline."""

    name: str
    what: str
    ratio: float
    # A number means ">= it"; a string such as "<=1.2" says itself; None: a figure to read.
    target: float | str | None
    req_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    baseline: str
    baseline_req_per_s: float
    baseline_images_per_s: float
    baseline_p50_ms: float
    # Extra columns between the name and the ratio, e.g. {"workers": 2} or {"batch": 256}.
    labels: dict[str, int | str] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if isinstance(self.target, str):
            return self.ratio <= float(self.target.removeprefix("<="))
        return self.ratio >= self.target

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return self.target if isinstance(self.target, str) else f">={self.target:g}"


def row(
    name: str,
    what: str,
    stats: Stats,
    baseline_name: str,
    baseline: Stats,
    ratio: float,
    target: float | str | None,
    **labels: int | str,
) -> Row:
    return Row(
        name=name,
        what=what,
        ratio=ratio,
        target=target,
        req_per_s=stats["req_per_s"],
        images_per_s=stats["images_per_s"],
        p50_ms=stats["p50_ms"],
        p99_ms=stats["p99_ms"],
        baseline=baseline_name,
        baseline_req_per_s=baseline["req_per_s"],
        baseline_images_per_s=baseline["images_per_s"],
        baseline_p50_ms=baseline["p50_ms"],
        labels=labels,
    )


def print_table(rows: list[Row], settings: dict[str, Any]) -> None:
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
    width = max([4, *(len(r.name) for r in rows)])
    columns = {key: len(key) for r in rows for key in r.labels}
    for r in rows:
        for key, value in r.labels.items():
            columns[key] = max(columns[key], len(str(value)))
    labels = "".join(f" {key:>{size}}" for key, size in columns.items())
    header = (
        f"{'row':{width}}{labels} {'ratio':>7} {'target':>7} {'met':>4} {'req/s':>9} "
        f"{'images/s':>10} {'p50 ms':>7} {'p99 ms':>7}   baseline (req/s, images/s, p50 ms)"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        labels = "".join(f" {r.labels.get(key, ''):>{size}}" for key, size in columns.items())
        met = "-" if r.met is None else "yes" if r.met else "no"
        print(
            f"{r.name:{width}}{labels} {r.ratio:7.2f} {r.target_text:>7} {met:>4} "
            f"{r.req_per_s:9.0f} {r.images_per_s:10.0f} {r.p50_ms:7.2f} {r.p99_ms:7.2f}   "
            f"{r.baseline}: {r.baseline_req_per_s:.0f}, {r.baseline_images_per_s:.0f}, "
            f"{r.baseline_p50_ms:.2f}"
        )
    for name in dict.fromkeys(r.name for r in rows):
        print(f"  {name}: {next(r.what for r in rows if r.name == name)}")


def write_json(path: Path, rows: Iterable[Row], settings: dict[str, Any]) -> None:
    """One JSON object per row: its labels, its fields, met and the settings."""
    with path.open("w") as out:
        for r in rows:
            fields = asdict(r)
            labels = fields.pop("labels")
            out.write(json.dumps({**labels, **fields, "met": r.met, "settings": settings}) + "\n")


TOKEN_ENV = "MNIST_BENCH_TOKEN"  # how load() hands an API key to its generators


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- settings against off, in alternating rounds ------------------------------------------

BATCH = 256
BATCH_CLIENTS = 4
SHAPES = ((1, "req_per_s"), (BATCH, "images_per_s"))  # single images; batch-256


@dataclass
class Rounds:
    """What `rounds()` measured: per setting and shape (1 or BATCH images per call), the
    load figures and the server's CPU seconds per image, one entry per round."""

    stats: dict[tuple[str, int], list[Stats]]
    cpu: dict[tuple[str, int], list[float]]

    def ratio(self, name: str, images: int, baseline: str = "off") -> float:
        """Median over the rounds of (setting / baseline of the same round), for the
        shape's figure (req/s for single images, images/s for batches)."""
        key = dict(SHAPES)[images]
        pairs = zip(self.stats[name, images], self.stats[baseline, images], strict=True)
        return float(statistics.median(on[key] / off[key] for on, off in pairs))

    def cpu_ratio(self, name: str, images: int, baseline: str = "off") -> float:
        pairs = zip(self.cpu[name, images], self.cpu[baseline, images], strict=True)
        return float(statistics.median(on / off for on, off in pairs))

    def middle(self, name: str, images: int) -> Stats:
        """The run whose figure is the median (a row's absolute figures)."""
        key = dict(SHAPES)[images]
        runs = sorted(self.stats[name, images], key=lambda stats: stats[key])
        return runs[len(runs) // 2]

    def rows(
        self, names: dict[str, tuple[str, str, float | None]], clients: int, baseline: str = "off"
    ) -> list[Row]:
        """Two rows per setting: `names` maps it to (single row, batch row, target)."""
        count = len(self.stats[baseline, 1])
        out: list[Row] = []
        for name, (first, second, target) in names.items():
            for label, images, shape in (
                (first, 1, f"1 image, {clients} clients: req/s"),
                (second, BATCH, f"batch-{BATCH} uint8, {BATCH_CLIENTS} clients: images/s"),
            ):
                figure = shape.rsplit(" ", 1)[1]
                out.append(
                    row(label, f"{name}: {shape} / {baseline} {figure} (median of {count} "
                        "rounds)", self.middle(name, images), baseline,
                        self.middle(baseline, images), self.ratio(name, images, baseline),
                        target)
                )  # fmt: skip
        return out


def rounds_main(
    prog: str, description: str | None, run: Callable[[argparse.Namespace], list[Row]],
    argv: list[str] | None = None,
) -> None:  # fmt: skip
    """The command line of a benchmark made of `rounds()`: --model-dir, --clients,
    --seconds, --rounds, --json; prints the table of what `run(args)` returns."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. models/mnist")
    parser.add_argument("--clients", type=int, default=64, help="single-image clients")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per run")
    parser.add_argument("--rounds", type=int, default=3, help="every setting, this many times")
    parser.add_argument("--json", type=Path, help="also write one JSON object per row here")
    args = parser.parse_args(argv)
    settings = {
        "seconds_per_run": args.seconds,
        "clients": args.clients,
        "rounds": args.rounds,
        "usable_cpus": len(os.sched_getaffinity(0)),
    }
    rows = run(args)
    print_table(rows, settings)
    if args.json:
        write_json(args.json, rows, settings)


def rounds(
    settings: dict[str, list[str]],
    model_dir: Path,
    *,
    count: int,
    clients: int,
    seconds: float,
    after: Callable[[str, Any], None] | None = None,
) -> Rounds:
    """Serve with each setting's flags in turn, `count` rounds, and load each server with
    single images (`clients` clients) then batch-256 (4 clients). Rounds, not one run per
    setting: a neighbour's burst on a shared machine lands in one round's figures, not in one
    setting's, and each ratio is a median of same-round ratios. `after(name, server)` runs
    before each server stops (to read its metrics)."""
    from mnist_serving.server.launcher import ServerProcess

    stats: dict[tuple[str, int], list[Stats]] = {(n, i): [] for n in settings for i in (1, BATCH)}
    cpu: dict[tuple[str, int], list[float]] = {(n, i): [] for n in settings for i in (1, BATCH)}
    for number in range(count):
        for name, flags in settings.items():
            server = ServerProcess(model_dir, "--poll-interval", "0", *flags)
            try:
                print(f"round {number + 1}: {name} ...", file=sys.stderr)
                pid = server.process.pid
                for images in (1, BATCH):
                    spent = cpu_seconds(pid)
                    if images == 1:
                        result = load(server.target, 1, clients, seconds, connections=4)
                    else:
                        result = load(server.target, BATCH, BATCH_CLIENTS, seconds)
                    served = result["images_per_s"] * result["seconds"]
                    cpu[name, images].append((cpu_seconds(pid) - spent) / served)
                    stats[name, images].append(result)
                if after is not None:
                    after(name, server)
            finally:
                server.stop()
    return Rounds(stats, cpu)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, MB (NaN if /proc does not say)."""
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) / 1024 if found else NAN


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.harness",
        description="One closed-loop load generator (what load() runs in its own process); "
        "prints one JSON object: requests, images, seconds, p50_ms, p99_ms, errors.",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="native")
    parser.add_argument("--target", required=True, help="host:port (gRPC or HTTP port)")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--clients", type=int, default=1, help="requests in flight")
    parser.add_argument("--connections", type=int, default=1, help="channels or sessions")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=WARMUP, help="time before measuring")
    parser.add_argument("--decode", action="store_true", help="decode every answer into numpy")
    parser.add_argument("--priority", choices=("online", "batch"), help="native calls' class")
    a = parser.parse_args()
    stats = asyncio.run(
        generate(a.protocol, a.target, a.images, a.clients, a.connections, a.seconds, a.warmup,
                 a.decode, a.priority, os.environ.get(TOKEN_ENV) or None)
    )  # fmt: skip
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
