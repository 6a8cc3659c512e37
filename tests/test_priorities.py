"""Priority classes: online calls go ahead of batch work, batch work still gets its share,
each class is shed by its own limit, and every API declares the class its own way.

The scheduler on its own (a numpy model the test holds), then a real server: in the test's
process where the test must hold the model (test_shutdown.py's fixture), and a server
process for what each API accepts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient import grpc as triton_grpc

from mnist_serving.protos.inference import grpc_service_pb2 as v2_pb
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.mnist.v1 import predict_pb2_grpc
from mnist_serving.server.batcher import Batcher
from mnist_serving.server.call_context import BATCH, ONLINE
from mnist_serving.server.errors import DeadlineExpired, Overloaded
from mnist_serving.server.runtimes import Prediction

from .support import ServerProcess, scrape
from .test_batcher import RecordingModel, holding, tagged
from .test_shutdown import Held, queued, started, until
from .test_tfserving import predict_request

# --- the scheduler on its own ----------------------------------------------------------


class TagRecordingModel(RecordingModel):
    """Also remembers which requests (first pixels) each model call held, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[list[int]] = []

    def __call__(self, images: np.ndarray) -> Any:
        answer = super().__call__(images)
        self.tags.append(sorted({int(t) for t in images[:, 0, 0]}))
        return answer


def scheduler(model: RecordingModel, **kw: int) -> Batcher:
    settings = {
        "max_batch_size": 8,
        "max_queued_images": 64,
        "max_queued_batch_images": 64,
        "batch_chunk_images": 4,
        "batch_every": 4,
    }
    settings.update(kw)
    return Batcher(
        model,
        ThreadPoolExecutor(max_workers=1),
        timeout=0.0,
        max_batch_size=settings["max_batch_size"],
        max_queued_images=settings["max_queued_images"],
        max_queued_batch_images=settings["max_queued_batch_images"],
        batch_chunk_images=settings["batch_chunk_images"],
        batch_every=settings["batch_every"],
    )


async def model_held(model: RecordingModel, batcher: Batcher, images: int) -> asyncio.Future[Any]:
    """An online request of `images` images (tag 9) that the model is stalled on."""
    model.release.clear()
    held = asyncio.ensure_future(batcher.submit(tagged(9, images)))
    await holding(model)
    return held


async def queued_in(batcher: Batcher, priority: str, images: int) -> None:
    """Until `images` images of the class wait in the batcher's queue."""
    await until(lambda: batcher._queued[priority] == images, f"{images} {priority} images")  # type: ignore[index]


async def test_an_online_request_runs_before_the_rest_of_a_queued_batch_request() -> None:
    model = TagRecordingModel()
    batcher = scheduler(model)
    model.release.clear()
    batch = asyncio.ensure_future(batcher.submit(tagged(1, 12), priority=BATCH))
    await holding(model)  # its first chunk of 4 is in the model
    online = asyncio.ensure_future(batcher.submit(tagged(2), priority=ONLINE))
    await queued_in(batcher, ONLINE, 1)
    model.release.set()
    whole, one = await asyncio.gather(batch, online)
    assert model.tags == [[1], [2], [1], [1]]
    assert model.calls == [4, 1, 4, 4]  # chunks: the online call waited for one chunk only
    assert whole.classes.tolist() == [1] * 12
    assert one.classes.tolist() == [2]
    await batcher.close()


async def test_batch_work_keeps_one_model_call_in_batch_every() -> None:
    model = TagRecordingModel()
    batcher = scheduler(model, max_batch_size=4, batch_every=2)
    first = await model_held(model, batcher, 4)
    batch = asyncio.ensure_future(batcher.submit(tagged(1, 8), priority=BATCH))
    online = [asyncio.ensure_future(batcher.submit(tagged(t, 4))) for t in (2, 3, 4)]
    await queued_in(batcher, ONLINE, 12)
    model.release.set()
    await asyncio.gather(first, batch, *online)
    # Online work always waiting, yet every second call is a batch chunk.
    assert model.tags == [[9], [2], [1], [3], [1], [4]]
    await batcher.close()


async def test_chunks_merge_batch_requests_in_order_and_split_back() -> None:
    model = TagRecordingModel()
    batcher = scheduler(model)
    held = await model_held(model, batcher, 8)
    requests = [batcher.submit(tagged(t, 6), priority=BATCH) for t in (1, 2)]
    answers = asyncio.ensure_future(asyncio.gather(*requests))
    await queued_in(batcher, BATCH, 12)
    model.release.set()
    await held
    first, second = await answers
    assert model.tags[1:] == [[1], [1, 2], [2]]
    assert first.classes.tolist() == [1] * 6
    assert second.classes.tolist() == [2] * 6
    assert first.probabilities.shape == (6, 10)
    await batcher.close()


async def test_each_class_is_shed_by_its_own_limit() -> None:
    model = RecordingModel()
    batcher = scheduler(model, max_queued_images=8, max_queued_batch_images=8)
    held = await model_held(model, batcher, 8)
    batch = asyncio.ensure_future(batcher.submit(tagged(1, 8), priority=BATCH))
    await queued_in(batcher, BATCH, 8)
    with pytest.raises(Overloaded, match="batch queue is full"):
        await batcher.submit(tagged(2), priority=BATCH)
    online = asyncio.ensure_future(batcher.submit(tagged(3, 8)))  # its room is untouched
    await queued_in(batcher, ONLINE, 8)
    with pytest.raises(Overloaded, match="online queue is full"):
        await batcher.submit(tagged(4))
    model.release.set()
    await asyncio.gather(held, batch, online)
    await batcher.close()


async def test_a_cancelled_batch_request_loses_its_remaining_chunks() -> None:
    model = RecordingModel()
    batcher = scheduler(model)
    model.release.clear()
    gone = asyncio.ensure_future(batcher.submit(tagged(1, 12), priority=BATCH))
    await holding(model)
    gone.cancel()
    model.release.set()
    assert (await batcher.submit(tagged(2, 4), priority=BATCH)).classes.tolist() == [2] * 4
    assert model.calls == [4, 4]
    assert batcher._queued == {ONLINE: 0, BATCH: 0}
    await batcher.close()


async def test_a_batch_request_whose_deadline_passes_between_chunks_is_dropped() -> None:
    model = RecordingModel()
    batcher = scheduler(model)
    model.release.clear()
    deadline = time.monotonic() + 0.05
    late = asyncio.ensure_future(batcher.submit(tagged(1, 12), deadline, priority=BATCH))
    await holding(model)
    await until(lambda: time.monotonic() > deadline, "the deadline to pass")
    model.release.set()
    with pytest.raises(DeadlineExpired):
        await late
    assert model.calls == [4]
    await batcher.close()


class BigCallsHeldModel(TagRecordingModel):
    """Holds only calls of `held_from` images or more (batch chunks); small ones answer at
    once, on whichever thread calls."""

    def __init__(self, held_from: int) -> None:
        super().__init__()
        self.held_from = held_from
        self.big = threading.Event()

    def __call__(self, images: np.ndarray) -> Any:
        if len(images) >= self.held_from:
            self.big.set()
            assert self.release.wait(60)
        self.entered.set()
        self.calls.append(len(images))
        self.tags.append(sorted({int(t) for t in images[:, 0, 0]}))
        classes = images[:, 0, 0].astype(np.int64) % 10
        return Prediction(np.eye(10, dtype=np.float32)[classes], classes)


async def test_a_small_online_request_runs_beside_a_batch_chunk_instead_of_after_it() -> None:
    model = BigCallsHeldModel(held_from=4)
    batcher = Batcher(
        model,
        ThreadPoolExecutor(max_workers=1),
        timeout=0.0,
        max_batch_size=8,
        max_queued_images=64,
        inline_max_images=2,
        batch_chunk_images=4,
    )
    model.release.clear()
    batch = asyncio.ensure_future(batcher.submit(tagged(1, 8), priority=BATCH))
    assert await asyncio.to_thread(model.big.wait, 60)  # a chunk holds the inference thread
    online = await batcher.submit(tagged(2))  # answered while the chunk is still held
    assert online.classes.tolist() == [2]
    assert model.tags == [[2]]
    model.release.set()
    assert (await batch).classes.tolist() == [1] * 8
    assert model.tags == [[2], [1], [1]]
    await batcher.close()


# --- a real server -----------------------------------------------------------------------

BATCH_METADATA = (("mnist-priority", "batch"),)
BATCH_OK = ("batch", "OK")


def native_request(count: int) -> pb.PredictRequest:
    images = np.random.default_rng(count).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    return pb.PredictRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, content=images.tobytes())
    )


async def test_an_online_call_is_answered_ahead_of_queued_batch_work(
    tiny_model_dir: Any,
) -> None:
    async with started(
        tiny_model_dir, max_batch_size=1024, max_queued_images=4096, batch_chunk_images=256
    ) as held:
        held.hold_inference()
        batch = held.stub.Predict(native_request(1024), metadata=BATCH_METADATA)
        await until(lambda: queued() == 1024 - 256, "the first chunk to wait for the model")
        online = held.stub.Predict(native_request(1))
        await until(lambda: queued() == 1024 - 256 + 1, "the online call to queue")
        # Hold the model again behind the first chunk: the call after it is the scheduler's
        # choice, and it stays put for the test to read.
        second = Held(held.server, held.channel)
        second.hold_inference()
        held.release.set()
        await until(lambda: queued() in (1024 - 256, 1024 - 512 + 1), "the next model call")
        assert queued() == 1024 - 256, "the online call went ahead of the batch's chunks"
        second.release.set()
        answer = await online
        assert len(np.frombuffer(answer.classes.content, "<i8")) == 1
        assert len(np.frombuffer((await batch).classes.content, "<i8")) == 1024


async def test_batch_work_completes_while_online_calls_never_stop(tiny_model_dir: Any) -> None:
    async with started(tiny_model_dir, max_batch_size=64, batch_chunk_images=64) as held:
        done = asyncio.Event()
        answered = 0

        async def online_client() -> None:
            nonlocal answered
            while not done.is_set():
                await held.stub.Predict(native_request(1))
                answered += 1

        clients = [asyncio.ensure_future(online_client()) for _ in range(4)]
        await until(lambda: answered >= 20, "online calls to flow")
        before = answered
        batch = await held.stub.Predict(native_request(2048), metadata=BATCH_METADATA)
        assert answered > before  # online calls went on while the batch ran
        done.set()
        await asyncio.gather(*clients)
        assert len(np.frombuffer(batch.classes.content, "<i8")) == 2048


async def test_a_full_batch_queue_sheds_batch_calls_and_online_calls_keep_their_room(
    tiny_model_dir: Any,
) -> None:
    async with started(tiny_model_dir, max_queued_images=64, max_queued_batch_images=64) as held:
        held.hold_inference()
        running = held.stub.Predict(native_request(64))  # taken to the (stalled) model
        await until(
            lambda: held.server.admission.in_flight == 1 and queued() == 0, "the model's call"
        )
        waiting = held.stub.Predict(native_request(64), metadata=BATCH_METADATA)
        await until(lambda: queued() == 64, "the batch queue to fill")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await held.stub.Predict(native_request(1), metadata=BATCH_METADATA)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "batch queue is full" in (refused.value.details() or "")
        url = f"http://127.0.0.1:{held.server.http_port}/v2/models/mnist/infer"
        status, _ = await asyncio.to_thread(post, url, v2_body(), {"Mnist-Priority": "batch"})
        assert status == 429
        online = held.stub.Predict(native_request(64))  # the online queue is empty
        await until(lambda: queued() == 128, "the online call to queue")
        held.release.set()
        await asyncio.gather(running, waiting, online)


def v2_body(**parameters: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}],
        **({"parameters": parameters} if parameters else {}),
    }


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def batch_calls(server: ServerProcess) -> collections.Counter[str]:
    """mnist_requests_total of batch-class calls answered OK, by API."""
    calls: collections.Counter[str] = collections.Counter()
    for (name, labels), value in scrape(server).items():
        label = dict(labels)
        if (
            name == "mnist_requests_total"
            and label["priority"] == "batch"
            and label["code"] == "OK"
        ):
            calls[label["api"]] += int(value)
    return calls


def test_every_api_declares_the_class_its_own_way(served_tiny: ServerProcess) -> None:
    before = batch_calls(served_tiny)
    with grpc.insecure_channel(served_tiny.target) as channel:
        stub = predict_pb2_grpc.MnistServiceStub(channel)
        stub.Predict(native_request(1), metadata=BATCH_METADATA)
        stub.Predict(native_request(1), metadata=(("mnist-priority", "online"),))
        tfserving = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=lambda request: request.SerializeToString(),
            response_deserializer=None,
        )
        tfserving(predict_request(np.zeros((1, 28, 28), np.uint8)), metadata=BATCH_METADATA)
    triton = triton_grpc.InferenceServerClient(served_tiny.target)
    images = triton_grpc.InferInput("images", [1, 784], "UINT8")
    images.set_data_from_numpy(np.zeros((1, 784), np.uint8))
    triton.infer("mnist", [images], headers={"mnist-priority": "batch"})
    triton.infer("mnist", [images], priority=2)  # the request parameter, as Triton sends it
    triton.infer("mnist", [images], priority=1)  # online
    base = served_tiny.http_url
    assert post(f"{base}/v2/models/mnist/infer", v2_body(), {"Mnist-Priority": "batch"})[0] == 200
    assert post(f"{base}/v2/models/mnist/infer", v2_body(priority=3), {})[0] == 200
    tf_body = {"instances": [[0] * 784]}
    headers = {"Mnist-Priority": "BATCH"}
    assert post(f"{base}/v1/models/mnist:predict", tf_body, headers)[0] == 200
    after = batch_calls(served_tiny)
    assert after - before == {
        "native": 1,
        "v2": 2,
        "v2_rest": 2,
        "tfserving_rest": 1,
        "tfserving": 1,
    }


@pytest.mark.parametrize(
    ("transport", "value"),
    [("metadata", "urgent"), ("metadata", ""), ("parameter", -1), ("parameter", "soon")],
)
def test_a_priority_that_is_not_a_class_is_invalid_argument(
    served_tiny: ServerProcess, transport: str, value: Any
) -> None:
    request = v2_pb.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 784])
    request.raw_input_contents.append(bytes(784))
    metadata = (("mnist-priority", value),) if transport == "metadata" else ()
    if transport == "parameter" and isinstance(value, int):
        request.parameters["priority"].int64_param = value
    elif transport == "parameter":
        request.parameters["priority"].string_param = value
    with grpc.insecure_channel(served_tiny.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=v2_pb.ModelInferRequest.SerializeToString,
            response_deserializer=v2_pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            infer(request, metadata=metadata, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "online" in (refused.value.details() or "")
    assert "batch" in (refused.value.details() or "")


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v2/models/mnist/infer", v2_body(), {"Mnist-Priority": "high"}),
        ("/v2/models/mnist/infer", v2_body(priority=-2), {}),
        ("/v2/models/mnist/infer", v2_body(priority=True), {}),
        ("/v1/models/mnist:predict", {"instances": [[0] * 784]}, {"Mnist-Priority": "2"}),
    ],
)
def test_a_bad_priority_over_http_is_400_with_the_accepted_values(
    served_tiny: ServerProcess, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    status, answer = post(served_tiny.http_url + path, body, headers)
    assert status == 400
    assert "online" in answer["error"]
    assert "batch" in answer["error"]


def thread_nice_values(pid: int) -> list[int]:
    """The nice value of each thread of process `pid` (field 19 of /proc/PID/task/TID/stat)."""
    values = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            values.append(int(fields[16]))
    return values


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_batch_chunks_run_on_one_thread_at_the_batch_nice_value(tiny_model_dir: Path) -> None:
    server = ServerProcess(tiny_model_dir, "--poll-interval", "0", "--batch-nice", "7")
    try:
        pid = server.process.pid
        base = os.getpriority(os.PRIO_PROCESS, pid)  # the server's own (the test's, inherited)
        with grpc.insecure_channel(server.target) as channel:
            stub = predict_pb2_grpc.MnistServiceStub(channel)
            stub.Predict(native_request(3), metadata=(("mnist-priority", "online"),))
            assert set(thread_nice_values(pid)) == {base}  # online work runs at the server's
            stub.Predict(native_request(600), metadata=BATCH_METADATA)  # three chunks
        assert thread_nice_values(pid).count(base + 7) == 1
        assert set(thread_nice_values(pid)) == {base, base + 7}
    finally:
        assert server.stop() == 0, server.log
