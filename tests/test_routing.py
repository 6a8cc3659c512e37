"""Clients over several servers (client/routing.py) and their keepalive: the router alone
on a fake clock, then real clients against real gRPC servers (tests/fake_server.py) on
loopback ports, one of them dead, slow or failing. The network faults between hosts
(partitions, throttled links) are in tests/test_netns.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_serving.client import AsyncMnistClient, Keepalive, MnistClient, RetryPolicy
from mnist_serving.client.__main__ import main
from mnist_serving.client.client import DEFAULT_KEEPALIVE, channel_options
from mnist_serving.client.errors import DeadlineExceeded, InvalidInput, Unavailable
from mnist_serving.client.routing import Router, split_targets
from mnist_serving.server.settings import Settings

from .fake_server import FakeServer, expected, free_port, running_fake_server

FAST_RETRY = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def two() -> Iterator[tuple[FakeServer, FakeServer]]:
    with running_fake_server() as first, running_fake_server() as second:
        yield first, second


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def test_targets_are_split_on_commas_unless_grpc_resolves_them() -> None:
    assert split_targets("a:1, b:2") == ("a:1", "b:2")
    assert split_targets(["a:1"]) == ("a:1",)
    assert split_targets("dns:///name:8500") == ("dns:///name:8500",)
    assert split_targets("ipv4:10.0.0.1:1,10.0.0.2:1") == ("ipv4:10.0.0.1:1,10.0.0.2:1",)
    with pytest.raises(ValueError, match="at least one"):
        split_targets(" , ")


def test_each_attempt_but_the_last_gets_half_the_time_left() -> None:
    clock = Clock()
    router = Router(3, clock)
    attempts = router.attempts(8.0)
    first = next(attempts)
    assert (first.timeout, first.last) == (4.0, False)
    clock.now += 4.0
    second = next(attempts)
    assert (second.timeout, second.last) == (2.0, False)
    clock.now += 1.0
    third = next(attempts)
    assert (third.timeout, third.last) == (3.0, True)
    assert {first.index, second.index, third.index} == {0, 1, 2}
    assert [a.timeout for a in Router(2, clock).attempts(None)] == [None, None]
    assert [a.timeout for a in Router(1, clock).attempts(5.0)] == [5.0]


def test_a_slow_target_gets_fewer_calls_until_its_record_fades() -> None:
    clock = Clock()
    router = Router(2, clock)
    for index, seconds in ((0, 2.0), (1, 0.01)):
        started = router.started(index)
        clock.now += seconds
        router.finished(index, started, None)
    assert [router.order()[0] for _ in range(6)] == [1] * 6
    router.started(1)  # busy: still cheaper than waiting on the slow one
    assert router.order()[0] == 1
    clock.now += 10  # 2 s halved ten times: under 2 ms
    router.finished(1, clock.now - 0.01, None)
    assert 0 in [router.order()[0] for _ in range(2)]


def test_a_failed_target_goes_last_for_a_while_and_its_answer_clears_it() -> None:
    clock = Clock()
    router = Router(2, clock)
    down = Unavailable("gone", grpc.StatusCode.UNAVAILABLE)
    assert router.finished(0, router.started(0), down) is True
    assert [router.order()[0] for _ in range(4)] == [1] * 4
    clock.now += 1.1  # the first cooldown is 1 s
    assert 0 in [router.order()[0] for _ in range(2)]
    assert router.finished(0, router.started(0), down) is True  # again: 2 s this time
    clock.now += 1.1
    assert [router.order()[0] for _ in range(4)] == [1] * 4
    router.finished(0, router.started(0), None)
    assert 0 in [router.order()[0] for _ in range(2)]
    wrong = InvalidInput("bad pixels")
    assert router.finished(0, router.started(0), wrong) is False  # the answer, not the server


def test_keepalive_pings_are_on_and_the_server_permits_them() -> None:
    options = dict(channel_options(1024, FAST_RETRY))
    assert options["grpc.keepalive_time_ms"] == 10_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert DEFAULT_KEEPALIVE.bound == 15.0
    # Pings at the server's minimum interval draw strikes; twice that leaves room.
    assert DEFAULT_KEEPALIVE.time >= 2 * Settings.model_fields["min_ping_interval"].default
    assert "grpc.keepalive_time_ms" not in dict(channel_options(1024, FAST_RETRY, keepalive=None))
    with pytest.raises(ValueError, match="positive"):
        Keepalive(time=0)


def test_a_dead_target_is_passed_over(two: tuple[FakeServer, FakeServer]) -> None:
    live = two[0]
    dead = f"127.0.0.1:{free_port()}"
    batch = images(4)
    with MnistClient(f"{dead},{live.target}", retry=FAST_RETRY, timeout=10) as client:
        for _ in range(4):
            np.testing.assert_array_equal(client.predict(batch).classes, expected(batch)[1])
        assert client.health() == "SERVING"
        assert client.metadata().versions
    assert len(live.service.predict_calls()) == 4


def test_a_call_that_a_silent_server_holds_goes_elsewhere_within_its_deadline(
    two: tuple[FakeServer, FakeServer],
) -> None:
    silent, live = two
    silent.service.delay = 5.0  # answers long after the call's 2 s deadline
    batch = images(2)
    with MnistClient(f"{silent.target},{live.target}", retry=FAST_RETRY, timeout=2) as client:
        np.testing.assert_array_equal(client.predict(batch).classes, expected(batch)[1])
    assert len(silent.service.predict_calls()) == 1  # it was tried first, and given up
    assert len(live.service.predict_calls()) == 1


def test_with_one_target_the_deadline_is_the_calls_own(fake_target: str) -> None:
    with (
        MnistClient(fake_target, timeout=0.3) as client,
        pytest.raises(DeadlineExceeded),
    ):
        client.predict(images(1))


@pytest.fixture
def fake_target() -> Iterator[str]:
    with running_fake_server() as fake:
        fake.service.delay = 1.0
        yield fake.target


def test_the_async_client_fails_over_too(two: tuple[FakeServer, FakeServer]) -> None:
    failing, live = two
    failing.service.fail_next(grpc.StatusCode.UNAVAILABLE, times=100)
    batch = images(3)

    async def run() -> list[np.ndarray]:
        targets = [failing.target, live.target]
        async with AsyncMnistClient(targets, retry=FAST_RETRY, timeout=10) as client:
            return [(await client.predict(batch)).classes for _ in range(4)]

    for classes in asyncio.run(run()):
        np.testing.assert_array_equal(classes, expected(batch)[1])
    assert len(live.service.predict_calls()) == 4


def test_the_plain_scoring_job_takes_several_targets(
    two: tuple[FakeServer, FakeServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = images(300, seed=1)
    source = tmp_path / "images.npy"
    np.save(source, batch)
    out = tmp_path / "scores.jsonl"
    targets = ",".join(f.target for f in two)
    code = main(["score", "--targets", targets, "--input", str(source), "--output", str(out),
                 "--batch-size", "10", "--concurrency", "4", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["class"] for r in rows] == expected(batch)[1].tolist()
    calls = [len(f.service.predict_calls()) for f in two]
    assert sum(calls) == 30
    assert min(calls) > 0  # both servers took a share
