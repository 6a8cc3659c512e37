"""The priority class a client declares (`mnist-priority` metadata): the library's default and
per-call override, `mnist-client predict --priority`, and `mnist-client score`, which sends
"batch" unless told otherwise. What the server saw is read from the fake's record of each
call's metadata, and from a real server's mnist_requests_total."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnist_serving.client import AsyncMnistClient, MnistClient
from mnist_serving.client.__main__ import main
from mnist_serving.client.scoring import JobSettings
from mnist_serving.client.scoring.ray import RayJobSettings

from .fake_server import FakeServer, running_fake_server
from .support import ServerProcess, scrape


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with running_fake_server() as server:
        yield server


def images(count: int) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def declared(fake: FakeServer) -> list[tuple[str, str | None]]:
    """(method, the priority its metadata declared) of every call the fake saw, in order."""
    return [(c.method, c.priority) for c in fake.service.calls]


def test_the_client_declares_its_class_and_a_call_may_override_it(fake: FakeServer) -> None:
    with MnistClient(fake.target) as client:
        client.predict(images(1))
        client.predict(images(1), priority="batch")
    with MnistClient(fake.target, priority="batch", max_images_per_request=4) as client:
        client.metadata()
        client.predict(images(6))  # two RPCs, both declared
        client.predict(images(1), priority="online")
        client.health()  # never declared: a probe reports what it sees
    assert declared(fake) == [
        ("Predict", None),
        ("Predict", "batch"),
        ("GetModelMetadata", "batch"),
        ("Predict", "batch"),
        ("Predict", "batch"),
        ("Predict", "online"),
    ]


def test_the_async_client_declares_its_class_too(fake: FakeServer) -> None:
    async def run() -> None:
        async with AsyncMnistClient(fake.target, priority="batch") as client:
            await client.metadata()
            await client.predict(images(2))
            await client.predict(images(2), priority="online")
        async with AsyncMnistClient(fake.target, priority="online") as client:
            await client.predict(images(2))

    asyncio.run(run())
    assert declared(fake) == [
        ("GetModelMetadata", "batch"),
        ("Predict", "batch"),
        ("Predict", "online"),
        ("Predict", "online"),
    ]


def test_an_unknown_class_is_refused_before_sending(fake: FakeServer) -> None:
    for bad in ("urgent", "BATCH", ""):
        with pytest.raises(ValueError, match=r"'online', 'batch'"):
            MnistClient(fake.target, priority=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"'online', 'batch'"):
            JobSettings(fake.target, priority=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"'online', 'batch'"):
            RayJobSettings((fake.target,), priority=bad)  # type: ignore[arg-type]
    with (
        MnistClient(fake.target) as client,
        pytest.raises(ValueError, match=r"priority must be one of 'online', 'batch'"),
    ):
        client.predict(images(1), priority="low")  # type: ignore[arg-type]

    async def run() -> None:
        async with AsyncMnistClient(fake.target) as client:
            await client.predict(images(1), priority="low")  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"'online', 'batch'"):
        asyncio.run(run())
    assert fake.service.calls == []


def batch_predicts(server: ServerProcess) -> collections.Counter[str]:
    """mnist_requests_total of native Predict calls answered OK, by priority class."""
    counts: collections.Counter[str] = collections.Counter()
    for (name, labels), value in scrape(server).items():
        label = dict(labels)
        if name == "mnist_requests_total" and (label["api"], label["method"], label["code"]) == (
            "native",
            "Predict",
            "OK",
        ):
            counts[label["priority"]] += int(value)
    return counts


def test_a_real_server_counts_the_class_the_client_declared(served_tiny: ServerProcess) -> None:
    before = batch_predicts(served_tiny)
    with MnistClient(served_tiny.target, priority="batch") as client:
        client.predict(images(3))
        client.predict(images(3))
        client.predict(images(3), priority="online")
    with MnistClient(served_tiny.target) as client:
        client.predict(images(3))
    after = batch_predicts(served_tiny)
    assert after["batch"] - before["batch"] == 2
    assert after["online"] - before["online"] == 2


# --- the CLI ---------------------------------------------------------------------------------


def test_predict_sends_the_priority_it_is_given(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "a.npy", images(2))
    args = ["predict", "--target", fake.target, str(tmp_path / "a.npy")]
    assert main(args) == 0
    assert main([*args, "--priority", "batch"]) == 0
    assert main([*args, "--priority", "online"]) == 0
    assert declared(fake) == [("Predict", None), ("Predict", "batch"), ("Predict", "online")]
    with pytest.raises(SystemExit) as refused:
        main([*args, "--priority", "urgent"])
    assert refused.value.code == 2
    assert "invalid choice: 'urgent'" in capsys.readouterr().err
    assert len(fake.service.calls) == 3


def test_score_sends_batch_unless_told_online(fake: FakeServer, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", images(50))
    args = ["score", "--target", fake.target, "--input", str(tmp_path / "a.npy"),
            "--batch-size", "10", "--no-progress"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "batch.csv")]) == 0
    sent = declared(fake)
    assert [m for m, _ in sent] == ["GetModelMetadata"] + ["Predict"] * 5
    assert {p for _, p in sent} == {"batch"}
    fake.service.calls.clear()
    assert main([*args, "--output", str(tmp_path / "online.csv"), "--priority", "online"]) == 0
    sent = declared(fake)
    assert [m for m, _ in sent] == ["GetModelMetadata"] + ["Predict"] * 5
    assert {p for _, p in sent} == {"online"}
