"""Fuzzing every method the server serves: any request gets a client error, never a crash.

The methods come from the running server itself (server reflection, with the message
descriptors it reports), so an API added later is fuzzed without touching this file.
Requests are built from those descriptors (any value a field can hold: unknown enum
numbers, negative or huge dims and versions, NaN, empty and odd payloads), valid requests
with a few fields changed, and bytes that may not be a message at all. Each answer must be
OK or a client error with a message; the server must keep answering a valid call exactly
as before; and mnist_requests_total must count what the caller got.

Bounded for CI; MNIST_FUZZ_EXAMPLES=5000 (examples per method) runs a longer, random
search (docs/development/tests.md, "Fuzzing").
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_serving.protos.mnist.v1 import predict_pb2 as pb

from .support import ServerProcess, scrape

EXAMPLES = int(os.environ.get("MNIST_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 250,
    derandomize=not EXAMPLES,  # CI: the same examples every run; longer runs search anew
    deadline=None,  # no timing in tests: a slow machine is not a failure
    database=None,
    suppress_health_check=list(HealthCheck),
)
# What a request can earn. Never INTERNAL or UNKNOWN (a server bug), never CANCELLED.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
WORDS = ["", "mnist", "images", "serving_default", "serving_float", "probabilities", "classes",
         "signature_def", "1", "x" * 3000]  # fmt: skip
MAX_DEPTH = 4


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type[Message]

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def served_methods(channel: grpc.Channel) -> list[Method]:
    """The unary methods of every service the server lists (grpc.* ones aside), with
    message classes built from the descriptors the server itself sends."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listing,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name for s in listing.list_services_response.service]
    names = [name for name in names if not name.startswith("grpc.")]
    answers = stub.ServerReflectionInfo(
        iter(reflection_pb2.ServerReflectionRequest(file_containing_symbol=n) for n in names)
    )
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for answer in answers:
        assert answer.HasField("file_descriptor_response"), answer.error_response
        for data in answer.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(data)
            files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    methods = []
    for name in names:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            if not (method.client_streaming or method.server_streaming):
                request = message_factory.GetMessageClass(method.input_type)
                methods.append(Method(name, method.name, request))
    return methods


# Strategies: values of one field, messages of one type, and valid requests changed a little.

INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def scalars(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.cpp_type
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        edges = [v for v in (0, 1, -1, 2, 28, 784, 4096, 4097, low, high) if low <= v <= high]
        return st.one_of(
            st.sampled_from(edges), st.integers(max(low, -3), 5000), st.integers(low, high)
        )
    if kind == FieldDescriptor.CPPTYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.CPPTYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        known = [v.number for v in cast(EnumDescriptor, field.enum_type).values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.integers(0, 6).map(lambda n: bytes(784 * n)),
            st.integers(0, 3).map(lambda n: np.full(784 * n, 2.0, "<f4").tobytes()),
        )
    return st.one_of(st.sampled_from(WORDS), st.text(max_size=16))  # string


def values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """What one field can hold: a value, a list (repeated) or a dict (map)."""
    if _is_map(field):
        key_field, value_field = message_type(field).fields
        return st.dictionaries(scalars(key_field), single(value_field, depth + 1), max_size=3)
    if field.is_repeated:
        return st.one_of(
            st.lists(single(field, depth + 1), max_size=4),
            st.integers(1, 3).flatmap(lambda n: st.lists(single(field, depth + 1), min_size=n)),
        )
    return single(field, depth)


def single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return messages(message_type(field), depth + 1)
    return scalars(field)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: later(f, depth) for f in descriptor.fields}

    def build(chosen: dict[str, Any]) -> Message:
        message = cls()
        for name, value in chosen.items():
            assign(message, descriptor.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


def assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set `field` of `message` to a value drawn by values(); values the runtime refuses
    (a closed enum's unknown number) are left out."""
    message.ClearField(field.name)
    target = getattr(message, field.name)
    try:
        if _is_map(field):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, field.name, value)
    except (ValueError, TypeError):
        message.ClearField(field.name)


def later(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    return st.deferred(lambda: values(field, depth))  # built only when drawn: no deep recursion


def message_type(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return bool(
        field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
        and field.is_repeated
        and message_type(field).GetOptions().map_entry
    )


@st.composite
def changed(draw: st.DrawFn, seed: Message) -> Message:
    """`seed` with one to three fields, anywhere in it, set to any value they can hold."""
    request = type(seed)()
    request.CopyFrom(seed)
    for _ in range(draw(st.integers(1, 3))):
        target = request
        while True:
            fields = list(cast(Descriptor, target.DESCRIPTOR).fields)
            field = draw(st.sampled_from(fields))
            inner = getattr(target, field.name)
            if _is_map(field) and message_type(field).fields[1].message_type and len(inner):
                if draw(st.booleans()):
                    target = inner[draw(st.sampled_from(sorted(inner)))]
                    continue
            elif (
                field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
                and not field.is_repeated
                and target.HasField(field.name)
                and draw(st.booleans())
            ):
                target = inner
                continue
            break
        assign(target, field, draw(values(field, 1)))
    return request


# Valid requests to start from, where this file knows the method; any other method is
# fuzzed from its descriptors alone.


def native_predict(count: int = 2) -> pb.PredictRequest:
    return pb.PredictRequest(
        model_spec=pb.ModelSpec(name="mnist"),
        images=pb.Tensor(
            dtype=pb.DATA_TYPE_UINT8, shape=[count, 28, 28], content=bytes(784 * count)
        ),
    )


def seeds(method: Method) -> list[Message]:
    """Valid requests of `method`, built in its own (reflected) message class."""
    known: dict[str, list[Message]] = {
        "/mnist.v1.MnistService/Predict": [native_predict(1)],
        "/mnist.v1.MnistService/GetModelMetadata": [pb.GetModelMetadataRequest(name="mnist")],
    }
    if method.path == "/tensorflow.serving.PredictionService/Predict":
        request = method.request()
        request.model_spec.name = "mnist"  # type: ignore[attr-defined]
        tensor = request.inputs["images"]  # type: ignore[attr-defined]
        tensor.dtype = 4  # DT_UINT8
        for size in (1, 28, 28):
            tensor.tensor_shape.dim.add(size=size)
        tensor.tensor_content = bytes(784)
        return [request]
    return [method.request.FromString(s.SerializeToString()) for s in known.get(method.path, [])]


def requests(method: Method) -> st.SearchStrategy[bytes]:
    built = [messages(cast(Descriptor, method.request.DESCRIPTOR))]
    built += [changed(seed) for seed in seeds(method)]
    as_bytes = st.one_of(*built).map(lambda m: m.SerializeToString())
    return st.one_of(as_bytes, as_bytes, st.binary(min_size=1, max_size=300))


# The server and the checks.


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tiny_model_dir, "--poll-interval", "0")
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def call(channel: grpc.Channel, path: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    method: Callable[..., bytes] = channel.unary_unary(path, None, None)
    try:
        method(data, timeout=60)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def counted(server: ServerProcess) -> collections.Counter[str]:
    totals: collections.Counter[str] = collections.Counter()
    for (name, labels), value in scrape(server).items():
        if name == "mnist_requests_total":
            totals[dict(labels)["code"]] += int(value)
    return totals


def fuzz(
    channel: grpc.Channel,
    method: Method,
    still_serving: Callable[[], bool],
    seen: collections.Counter[str],
) -> None:
    """Run hypothesis over `method`, counting each status in `seen`."""

    @FUZZ
    @given(data=requests(method))
    def run(data: bytes) -> None:
        code, details = call(channel, method.path, data)
        seen[code.name] += 1
        assert code == grpc.StatusCode.OK or code in CLIENT_ERRORS, (method.path, details)
        if code != grpc.StatusCode.OK:
            assert details, (method.path, code)
            assert details != "Method not found!", f"{method.path} is listed but not served"
            assert len(details) <= 1000, (method.path, len(details))
        assert still_serving(), "a valid call no longer gets the same answer"
        seen["OK"] += 1

    run()


def test_every_method_answers_any_request_with_a_client_error(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    methods = served_methods(channel)
    paths = {m.path for m in methods}
    assert {"/mnist.v1.MnistService/Predict", "/tensorflow.serving.PredictionService/Predict"} <= (
        paths
    )
    reference = native_predict(2).SerializeToString()
    stub = channel.unary_unary("/mnist.v1.MnistService/Predict", None, None)
    expected = stub(reference, timeout=60)
    seen: collections.Counter[str] = collections.Counter({"OK": 1})
    before = counted(server)
    before["OK"] -= 1

    for method in methods:
        fuzz(channel, method, lambda: stub(reference, timeout=60) == expected, seen)
    print(f"statuses over {len(methods)} methods: {dict(seen)}")  # shown with pytest -s

    after = counted(server)
    assert {c: after[c] - before[c] for c in after if after[c] != before[c]} == {
        c: n for c, n in seen.items() if n
    }


def test_a_thousand_undecodable_calls_write_at_most_two_log_lines(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    lines = server.log.count("undecodable request")
    before = scrape(server)
    garbage = b"\xff\xff\xff\xff\xff"  # a tag whose varint never ends: no message parses it
    for _ in range(1000):
        code, details = call(channel, "/mnist.v1.MnistService/Predict", garbage)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid mnist.v1.PredictRequest" in details
    after = scrape(server)
    key = ("mnist_undecodable_requests_total", (("api", "native"), ("method", "Predict")))
    assert after[key] - before.get(key, 0.0) == 1000
    assert server.log.count("undecodable request") - lines <= 2


def test_tf_serving_methods_this_server_lacks_are_counted_unimplemented(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    key = (
        "mnist_requests_total",
        (
            ("api", "tfserving"),
            ("caller", "anonymous"),
            ("code", "UNIMPLEMENTED"),
            ("method", "Classify"),
            ("priority", "online"),
        ),
    )
    before = scrape(server).get(key, 0.0)
    code, details = call(channel, "/tensorflow.serving.PredictionService/Classify", b"")
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "PredictionService/Predict" in details
    assert scrape(server)[key] - before == 1


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        pytest.param({"dtype": 17}, "DataType 17", id="unknown-enum-number"),
        pytest.param({"dtype": -5}, "DataType -5", id="negative-enum-number"),
        pytest.param({"shape": [2**62, 784]}, "at most 4096", id="enormous-dim"),
        pytest.param({"shape": [-1, 784]}, "at least one image", id="negative-dim"),
        pytest.param({"shape": list(range(100_000))}, "100000 dims", id="many-dims"),
        pytest.param({"shape": [1, 784], "content": b""}, "0 bytes", id="empty-content"),
    ],
)
def test_native_predict_values_outside_what_it_takes(
    channel: grpc.Channel, tensor: dict[str, Any], words: str
) -> None:
    fields: dict[str, Any] = {"dtype": pb.DATA_TYPE_UINT8, "shape": [1, 784], "content": bytes(784)}
    request = pb.PredictRequest(images=pb.Tensor(**{**fields, **tensor}))
    code, details = call(channel, "/mnist.v1.MnistService/Predict", request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details
    assert len(details) <= 1000


def test_shapes_whose_product_overflows_int64_are_refused(channel: grpc.Channel) -> None:
    from mnist_serving.contract.tfquiet import import_tensorflow

    import_tensorflow()
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    tensor = request.inputs["images"]
    tensor.dtype = 4  # DT_UINT8
    for size in [2**40] * 3 + [2**62] * 20:
        tensor.tensor_shape.dim.add(size=size)
    assert math.prod(d.size for d in tensor.tensor_shape.dim) > 2**63
    path = "/tensorflow.serving.PredictionService/Predict"
    code, details = call(channel, path, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "[N, 28, 28] or [N, 784]" in details


def test_an_oversized_request_is_refused_and_the_server_keeps_serving(
    server: ServerProcess,
) -> None:
    options = [("grpc.max_send_message_length", 80 << 20)]
    with grpc.insecure_channel(server.target, options=options) as channel:
        huge = native_predict(1)
        huge.images.content = bytes(65 << 20)  # over the server's 64 MiB limit
        code, details = call(channel, "/mnist.v1.MnistService/Predict", huge.SerializeToString())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        code, _ = call(
            channel, "/mnist.v1.MnistService/Predict", native_predict(1).SerializeToString()
        )
        assert code == grpc.StatusCode.OK
