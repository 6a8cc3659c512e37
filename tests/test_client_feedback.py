"""`feedback()` of both clients, and `mnist-client feedback FILE.csv`, against a real gRPC
server: tests/fake_server.py, which implements MnistService.Feedback by the contract (the
real mnist-serve is used too where it implements Feedback)."""

from __future__ import annotations

import asyncio
import csv as csv_module
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_serving.client import (
    AsyncMnistClient,
    FeedbackResult,
    InvalidInput,
    MnistClient,
    RetryPolicy,
    Unavailable,
)
from mnist_serving.client.__main__ import main

from .fake_server import FakeServer, expected, running_fake_server
from .support import ServerProcess

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with running_fake_server() as server:
        yield server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[MnistClient]:
    with MnistClient(fake.target, retry=FAST_RETRY, timeout=10) as client:
        yield client


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def test_feedback_joins_labels_to_the_predictions_by_request_id_and_index(
    client: MnistClient, fake: FakeServer
) -> None:
    batch = images(5)
    prediction = client.predict(batch)
    (request_id,) = prediction.request_ids
    truth = [3, 1, 4, 1, 5]
    labels = [(request_id, i, label) for i, label in enumerate(truth)]
    labels.append(("never-issued", 0, 7))
    labels.append((request_id, 5, 2))  # the call had 5 images: index 5 is unknown
    labels.append((request_id, 0, 9))  # already labelled

    result = client.feedback(labels)

    assert result == FeedbackResult(accepted=5, unknown=2, duplicate=1, unknown_positions=(5, 6))
    assert result.sent == 8
    assert str(result) == "8 labels: 5 accepted, 2 unknown or expired, 1 duplicate"
    assert fake.service.labelled == {(request_id, i): t for i, t in enumerate(truth)}
    _, classes = expected(batch)
    assert [fake.service.predicted[(request_id, i)] for i in range(5)] == classes.tolist()


def test_feedback_is_sent_in_chunks_and_the_answers_are_summed(
    client: MnistClient, fake: FakeServer
) -> None:
    request_id = client.predict(images(3)).request_ids[0]
    labels = [(request_id, i % 3, 1) for i in range(23_456)]
    labels[12_000] = ("expired", 0, 1)
    labels[23_455] = ("expired", 0, 1)

    result = client.feedback(iter(labels))  # any iterable, read lazily

    assert fake.service.feedback_sizes == [10_000, 10_000, 3_456]
    assert result.accepted == 3
    assert result.unknown == 2
    assert result.duplicate == 23_456 - 5
    assert result.unknown_positions == (12_000, 23_455)  # across chunks, not per call


def test_smaller_chunks_and_numpy_integers(client: MnistClient, fake: FakeServer) -> None:
    prediction = client.predict(images(7))
    rid = prediction.request_id
    assert rid is not None
    labels = [(rid, np.int64(i), np.int8(c)) for i, c in enumerate(prediction.classes)]
    result = client.feedback(labels, chunk_size=3)
    assert fake.service.feedback_sizes == [3, 3, 1]
    assert result == FeedbackResult(accepted=7)
    with pytest.raises(ValueError, match="chunk_size"):
        client.feedback(labels, chunk_size=10_001)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (("", 0, 1), "feedback label 1: empty or missing request ID"),
        (("a", -1, 1), "feedback label 1: index must be a whole number >= 0, got -1"),
        (("a", 0, 10), "feedback label 1: label must be 0..9, got 10"),
        (("a", 0, 2.0), "feedback label 1: label must be 0..9, got 2.0"),
        (("a", 0), "feedback label 1: expected (request_id, index, label)"),
        (("\u00e9t\u00e9", 0, 1), "is not 1 to 128 printable ASCII"),
        (("x" * 129, 0, 1), "is not 1 to 128 printable ASCII"),
    ],
)
def test_a_bad_label_is_refused_before_its_chunk_is_sent(
    client: MnistClient, fake: FakeServer, label: tuple[object, ...], message: str
) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)) as raised:
        client.feedback([("a", 0, 1), label])  # type: ignore[list-item]
    assert raised.value.code is None  # the client's fault, not the server's answer
    assert fake.service.feedback_sizes == []


def test_a_bad_label_in_a_later_chunk_says_what_was_already_sent(
    client: MnistClient, fake: FakeServer
) -> None:
    rid = client.predict(images(2)).request_ids[0]
    labels = [(rid, 0, 1), (rid, 1, 2), ("other", 0, 3), (rid, 0, 11)]
    with pytest.raises(InvalidInput) as raised:
        client.feedback(labels, chunk_size=3)
    assert str(raised.value) == (
        "feedback label 3: label must be 0..9, got 11 (the 3 labels before it were sent: "
        "2 accepted, 1 unknown, 0 duplicate)"
    )
    assert fake.service.feedback_sizes == [3]


def test_the_server_refusing_a_call_is_a_typed_error(client: MnistClient) -> None:
    """The server's own checks (here: more than 10,000 labels, which the client never sends
    by itself) come back as INVALID_ARGUMENT with the server's message."""
    from mnist_serving.protos.mnist.v1 import predict_pb2, predict_pb2_grpc

    with grpc.insecure_channel(client.target) as channel:
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        request = predict_pb2.FeedbackRequest(
            labels=[predict_pb2.FeedbackLabel(request_id="a", index=0, label=1)] * 10_001
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.Feedback(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10001 labels exceed the limit of 10000" in str(raised.value.details())


def test_unavailable_is_retried_then_answered(client: MnistClient, fake: FakeServer) -> None:
    rid = client.predict(images(1)).request_ids[0]
    fake.service.fail_next(grpc.StatusCode.UNAVAILABLE, times=2, method="Feedback")
    assert client.feedback([(rid, 0, 4)]) == FeedbackResult(accepted=1)
    assert [c.method for c in fake.service.calls].count("Feedback") == 3


def test_a_failed_later_call_says_what_was_already_sent(
    client: MnistClient, fake: FakeServer
) -> None:
    rid = client.predict(images(4)).request_ids[0]
    fake.service.fail_next(grpc.StatusCode.UNAVAILABLE, times=3, after=1, method="Feedback")
    with pytest.raises(Unavailable) as raised:
        client.feedback([(rid, i, 1) for i in range(4)], chunk_size=2)
    assert str(raised.value) == (
        "UNAVAILABLE: injected UNAVAILABLE (the 2 labels before it were sent: 2 accepted, "
        "0 unknown, 0 duplicate)"
    )


def test_feedback_declares_the_clients_priority(fake: FakeServer) -> None:
    with MnistClient(fake.target, priority="batch") as client:
        client.feedback([("a", 0, 1)])
    (call,) = [c for c in fake.service.calls if c.method == "Feedback"]
    assert call.priority == "batch"


def test_async_feedback(fake: FakeServer) -> None:
    async def run() -> tuple[FeedbackResult, list[str]]:
        async with AsyncMnistClient(fake.target, retry=FAST_RETRY) as client:
            prediction = await client.predict(images(6), request_id="job-17")
            assert prediction.request_ids == ("job-17",)
            labels = [("job-17", i, 0) for i in range(6)] + [("job-18", 0, 0)]
            fake.service.fail_next(grpc.StatusCode.UNAVAILABLE, method="Feedback")
            return await client.feedback(labels, chunk_size=4), list(prediction.request_ids)

    result, _ = asyncio.run(run())
    assert result == FeedbackResult(accepted=6, unknown=1, unknown_positions=(6,))
    assert fake.service.feedback_sizes == [4, 3]


# --- the real server, where it implements Feedback ------------------------------------------


def _server_has_feedback() -> bool:
    from mnist_serving.server.api.native import MnistServicer

    return hasattr(MnistServicer, "Feedback")


@pytest.mark.skipif(
    not _server_has_feedback(), reason="this checkout's mnist-serve has no Feedback RPC yet"
)
def test_feedback_against_the_real_server(
    served_tiny: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = images(4, seed=5)
    with MnistClient(served_tiny.target, timeout=30) as client:
        prediction = client.predict(batch)
        rid = prediction.request_ids[0]
        labels = [(rid, i, int(c)) for i, c in enumerate(prediction.classes)]
        result = client.feedback([*labels, ("no-such-call", 0, 1), labels[0]])
    assert (result.accepted, result.unknown, result.duplicate) == (4, 1, 1)
    assert result.unknown_positions == (4,)

    csv = tmp_path / "labels.csv"
    csv.write_text("request_id,index,label\n" + "".join(f"{r},{i},{c}\n" for r, i, c in labels))
    assert main(["feedback", "--target", served_tiny.target, str(csv)]) == 0  # duplicates: fine
    assert capsys.readouterr().out == (
        "sent 4 labels: 0 accepted, 0 unknown or expired, 4 duplicate in 1 call\n"
    )

    # A scoring job's rows name their calls: its labels go back through the CLI.
    digits = images(300, seed=6)
    truth = np.random.default_rng(6).integers(0, 10, 300)
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_test=digits, y_test=truth, x_train=digits[:1], y_train=truth[:1])
    scores = tmp_path / "scores.csv"
    score = ["score", "--target", served_tiny.target, "--input", str(npz), "--output",
             str(scores), "--request-ids", "--batch-size", "128", "--no-progress"]  # fmt: skip
    assert main(score) == 0
    with scores.open(newline="") as stream:
        rows = list(csv_module.DictReader(stream))
    labelled = tmp_path / "labelled.csv"
    labelled.write_text(
        "request_id,request_index,label\n"
        + "".join(
            f"{r['request_id']},{r['request_index']},{t}\n"
            for r, t in zip(rows, truth, strict=True)
        )
    )
    capsys.readouterr()
    assert main(["feedback", "--target", served_tiny.target, str(labelled)]) == 0
    assert capsys.readouterr().out == (
        "sent 300 labels: 300 accepted, 0 unknown or expired, 0 duplicate in 1 call\n"
    )


# --- mnist-client feedback FILE.csv -----------------------------------------------------------


def test_cli_feedback_sends_a_csv_and_prints_a_summary(
    fake: FakeServer, client: MnistClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = client.predict(images(3)).request_ids[0]
    second = client.predict(images(1, seed=1), request_id='order, "17"').request_ids[0]
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "\ufefflabel,request_id,index,note\n"  # a BOM, any column order, extra columns
        f"7,{first},0,a\n"
        f"2,{first},2,\n"
        "\n"
        f'1,"order, ""17""",,no index: 0\n'
        f"5,{first},0,again\n"
        "3,gone,0,\n"
    )
    assert main(["feedback", "--target", fake.target, str(csv), "--chunk-size", "2"]) == 1
    out, err = capsys.readouterr()
    assert out == "sent 5 labels: 3 accepted, 1 unknown or expired, 1 duplicate in 3 calls\n"
    assert err == (
        f"mnist-client: {csv} line 7: no prediction remembered for request 'gone' index 0 "
        "(unknown or expired)\n"
    )
    assert fake.service.labelled == {(first, 0): 7, (first, 2): 2, (second, 0): 1}
    assert fake.service.feedback_sizes == [2, 2, 1]

    # Every label known: exit 0 (duplicates are no failure: a rerun of a file is safe).
    csv.write_text(f"request_id,label\n{first},7\n")
    assert main(["feedback", "--target", fake.target, str(csv)]) == 0
    assert capsys.readouterr().out == (
        "sent 1 labels: 0 accepted, 0 unknown or expired, 1 duplicate in 1 call\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file; expected a header: request_id,index,label"),
        ("request_id,index\n", "line 1: the header has no label column"),
        ("request_id,index,label\n", "no labels (only a header)"),
        ("request_id,index,label\na,0,1\nb,0,ten\n", "line 3: label 'ten' is not a whole number"),
        ("request_id,index,label\na,0,1\nb,x,1\n", "line 3: index 'x' is not a whole number"),
        ("request_id,index,label\na,0,1\nb,0,10\n", "line 3: label must be 0..9, got 10"),
        ("request_id,index,label\na,-2,1\n", "line 2: index must be a whole number >= 0, got -2"),
        ("request_id,index,label\n,0,1\n", "line 2: empty or missing request ID"),
        ("request_id,index,label\na,0,1,9\n", "line 2: 4 fields, the header has 3"),
        ('request_id,label,note\na,1,"two\nlines"\n\nc,x,\n', "line 5: label 'x'"),
        ('request_id,index,label\n"a\nb",0,1\n', "line 2: request ID 'a\\nb' is not 1 to 128"),
    ],
)
def test_cli_feedback_refuses_a_bad_file_before_sending_anything(
    fake: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    assert main(["feedback", "--target", fake.target, str(csv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mnist-client: {csv}")
    assert message in err
    assert err.count("\n") == 1
    assert fake.service.feedback_sizes == []


def test_cli_feedback_usage_errors(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["feedback", "--target", fake.target, str(tmp_path / "missing.csv")]) == 1
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "binary.csv").write_bytes(b"request_id,label\n\xff\xfe,1\n")
    assert main(["feedback", "--target", fake.target, str(tmp_path / "binary.csv")]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err
    (tmp_path / "ok.csv").write_text("request_id,label\na,1\n")
    args = ["feedback", "--target", fake.target, str(tmp_path / "ok.csv"), "--chunk-size", "20000"]
    assert main(args) == 2
    assert "--chunk-size is at most 10000" in capsys.readouterr().err


def test_cli_feedback_server_errors_exit_1(
    fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("request_id,label\na,1\n")
    fake.service.fail_next(grpc.StatusCode.PERMISSION_DENIED, details="role predict needed",
                           method="Feedback")  # fmt: skip
    assert main(["feedback", "--target", fake.target, str(csv)]) == 1
    assert capsys.readouterr().err == (
        f"mnist-client: {fake.target}: PERMISSION_DENIED: role predict needed\n"
    )


def test_image_request_ids_of_a_split_call(fake: FakeServer) -> None:
    with MnistClient(fake.target, max_images_per_request=4) as client:
        split = client.predict(images(10))
        assert split.part_sizes == (4, 4, 2)
        found = split.image_request_ids()
        assert found is not None
        ids, positions = found
        assert (
            ids
            == [split.request_ids[0]] * 4 + [split.request_ids[1]] * 4 + [split.request_ids[2]] * 2
        )
        assert positions == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
        labels = [(i, p, 0) for i, p in zip(ids, positions, strict=True)]
        assert client.feedback(labels).accepted == 10
        # One ID sent by the caller for every part: (id, position) would name two images.
        shared = client.predict(images(6), request_id="mine")
        assert shared.request_ids == ("mine", "mine")
        assert shared.image_request_ids() is None
    with running_fake_server(send_request_ids=False) as old, MnistClient(old.target) as client:
        assert client.predict(images(2)).image_request_ids() is None
