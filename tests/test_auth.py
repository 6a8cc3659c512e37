"""API keys (`mnist-serve --auth-keys`), against real server processes.

Every API over gRPC and HTTP refuses a call without a token or with a bad one
(UNAUTHENTICATED / 401 and a Bearer challenge), refuses a read key's inference call
(PERMISSION_DENIED / 403) and answers a predict key; health stays open; /metrics is open,
or needs a key with --metrics-auth; keys rotate without a restart and a broken file keeps
the previous ones; a key's rate limit answers RESOURCE_EXHAUSTED / 429 with a retry hint,
counted apart from shedding; the caller's key name labels the request metrics; the
official TF Serving stubs, tritonclient and mnist-client send the token; no token or hash
reaches the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_serving.client import (
    MnistClient,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from mnist_serving.client.__main__ import main as client_main
from mnist_serving.protos.inference import grpc_service_pb2 as v2
from mnist_serving.protos.mnist.v1 import predict_pb2 as pb
from mnist_serving.protos.tensorflow.core.framework import (
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from mnist_serving.protos.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
)
from mnist_serving.protos.tensorflow_serving.apis import predict_pb2 as tfs_predict
from mnist_serving.server.auth import keys_main

from .support import ServerProcess, scrape

WAIT_SECONDS = 60.0  # a generous bound on waiting for an event (a reload), never a proof
SLOW = 0.001  # a rate no test outlasts: a key with it passes one call, then is refused
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
OK = grpc.StatusCode.OK


def add_key(keys: Path, name: str, role: str, *limits: str) -> str:
    """`mnist-serve keys add` as a user runs it; the token is its last line of stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", "keys", "add", name,
         "--role", role, "--file", str(keys), *limits],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Keys:
    file: Path
    predict: str
    read: str
    limited: str  # predict, SLOW requests per second
    images: str  # predict, SLOW images per second

    @property
    def tokens(self) -> list[str]:
        return [self.predict, self.read, self.limited, self.images]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    file = tmp_path_factory.mktemp("auth") / "keys.json"
    return Keys(
        file,
        add_key(file, "scorer", "predict"),
        add_key(file, "viewer", "read"),
        add_key(file, "limited", "predict", "--requests-per-second", str(SLOW)),
        add_key(file, "imagey", "predict", "--images-per-second", str(SLOW)),
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, keys: Keys) -> Iterator[ServerProcess]:
    access_log = keys.file.parent / "access.jsonl"
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--auth-keys", str(keys.file),
        "--access-log", str(access_log),
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- every API, by its own messages ------------------------------------------------------


def tf_tensor() -> tensor_pb2.TensorProto:
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in (1, 28, 28)]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_UINT8, tensor_shape=shape, tensor_content=bytes(784)
    )


def tfs_predict_request() -> tfs_predict.PredictRequest:
    request = tfs_predict.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf_tensor())
    return request


def tfs_metadata_request() -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    return request


def tfs_status_request() -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    return request


def v2_infer_request() -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name="mnist",
        inputs=[
            v2.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=[1, 784])
        ],
        raw_input_contents=[bytes(784)],
    )


NAME = "mnist"
NATIVE_PREDICT = pb.PredictRequest(
    images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[1, 28, 28], content=bytes(784))
)
# (full method name, request, the role it needs)
RPCS: list[tuple[str, Callable[[], Message], str]] = [
    ("/mnist.v1.MnistService/Predict", lambda: NATIVE_PREDICT, "predict"),
    ("/mnist.v1.MnistService/GetModelMetadata", pb.GetModelMetadataRequest, "read"),
    ("/tensorflow.serving.PredictionService/Predict", tfs_predict_request, "predict"),
    ("/tensorflow.serving.PredictionService/GetModelMetadata", tfs_metadata_request, "read"),
    ("/tensorflow.serving.ModelService/GetModelStatus", tfs_status_request, "read"),
    ("/inference.GRPCInferenceService/ModelInfer", v2_infer_request, "predict"),
    ("/inference.GRPCInferenceService/ModelMetadata", lambda: v2.ModelMetadataRequest(name=NAME),
     "read"),
    ("/inference.GRPCInferenceService/ModelReady", lambda: v2.ModelReadyRequest(name=NAME), "read"),
    ("/inference.GRPCInferenceService/ServerMetadata", v2.ServerMetadataRequest, "read"),
]  # fmt: skip
V2_INFER_BODY = {
    "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]
}
# (HTTP method, path, body, the role it needs)
ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("POST", "/v1/models/mnist:predict", {"instances": [[0] * 784]}, "predict"),
    ("GET", "/v1/models/mnist", None, "read"),
    ("GET", "/v1/models/mnist/metadata", None, "read"),
    ("POST", "/v2/models/mnist/infer", V2_INFER_BODY, "predict"),
    ("GET", "/v2/models/mnist", None, "read"),
    ("GET", "/v2/models/mnist/ready", None, "read"),
    ("GET", "/v2", None, "read"),
]


def rpc(
    server: ServerProcess, method: str, request: Message, token: str | None
) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, details, trailing metadata) of one unary call."""
    with grpc.insecure_channel(server.target) as channel:
        stub = channel.unary_unary(
            method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=lambda data: data,
        )
        metadata = () if token is None else bearer(token)
        try:
            _, call = stub.with_call(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details() or "", text_pairs(error.trailing_metadata())
        return OK, "", text_pairs(call.trailing_metadata())


def text_pairs(metadata: Any) -> dict[str, str]:
    return {str(key): str(value) for key, value in metadata or ()}


def http(
    server: ServerProcess,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    authorization: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    if authorization is not None:
        headers["Authorization"] = authorization
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.http_url + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize(("method", "request_of", "needs"), RPCS, ids=[r[0] for r in RPCS])
def test_every_rpc_needs_a_key_whose_role_covers_it(
    server: ServerProcess,
    keys: Keys,
    method: str,
    request_of: Callable[[], Message],
    needs: str,
) -> None:
    request = request_of()
    code, details, _ = rpc(server, method, request, None)
    assert code == UNAUTHENTICATED, details
    assert "Bearer" in details
    code, details, _ = rpc(server, method, request, "mnist_not-a-key")
    assert (code, details) == (UNAUTHENTICATED, "the bearer token is not a valid key")
    code, details, _ = rpc(server, method, request, keys.read)
    if needs == "read":
        assert code == OK, details
    else:
        assert code == PERMISSION_DENIED, details
        assert "'viewer'" in details
        assert "'read'" in details
    assert rpc(server, method, request, keys.predict)[0] == OK


def test_every_method_of_every_served_service_is_keyed(server: ServerProcess, keys: Keys) -> None:
    """All the unary methods the gRPC port serves, with an empty request: refused without a
    key (health alone open), refused to a read key unless the method only reads, and never
    refused for auth with a predict key (whatever the method then answers)."""
    from mnist_serving.server.app import SERVED
    from mnist_serving.server.auth import needed_role

    auth_codes = (UNAUTHENTICATED, PERMISSION_DENIED)
    seen = set()
    for service in SERVED:
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue  # not served (UNIMPLEMENTED from gRPC itself)
            path = f"/{service.full_name}/{method.name}"
            request = message_factory.GetMessageClass(method.input_type)()
            needs = needed_role(method.name)
            seen.add(needs)
            code = rpc(server, path, request, None)[0]
            assert code == (OK if needs is None else UNAUTHENTICATED), path
            code = rpc(server, path, request, keys.read)[0]
            assert (code == PERMISSION_DENIED) == (needs == "predict"), (path, code)
            assert rpc(server, path, request, keys.predict)[0] not in auth_codes, path
    assert seen == {None, "read", "predict"}


@pytest.mark.parametrize(("verb", "path", "body", "needs"), ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_needs_a_key_whose_role_covers_it(
    server: ServerProcess,
    keys: Keys,
    verb: str,
    path: str,
    body: dict[str, Any] | None,
    needs: str,
) -> None:
    for refused in (
        http(server, verb, path, body),
        http(server, verb, path, body, "mnist_not-a-key"),
        http(server, verb, path, body, authorization=f"Basic {keys.predict}"),
    ):
        status, headers, data = refused
        assert status == 401, data
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in json.loads(data)
    status, _, data = http(server, verb, path, body, keys.read)
    assert status == (200 if needs == "read" else 403), data
    if status == 403:
        assert "needs 'predict'" in json.loads(data)["error"]
    status, _, data = http(server, verb, path, body, keys.predict)
    assert status == 200, data


def test_health_stays_open(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    for method in ("ServerLive", "ServerReady"):
        request = getattr(v2, f"{method}Request")()
        assert rpc(server, f"/inference.GRPCInferenceService/{method}", request, None)[0] == OK
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert http(server, "GET", path)[0] == 200


def test_metrics_are_open_by_default_and_carry_the_caller(
    server: ServerProcess, keys: Keys
) -> None:
    def calls(samples: dict[Any, float], caller: str, code: str = "OK") -> float:
        labels = (
            ("api", "native"),
            ("caller", caller),
            ("code", code),
            ("method", "Predict"),
            ("priority", "online"),
        )
        return samples.get(("mnist_requests_total", labels), 0.0)

    before = scrape(server)  # no token: /metrics is open without --metrics-auth
    refused = ("mnist_auth_failures_total", (("reason", "missing"),))
    with MnistClient(server.target, token=keys.predict) as client:
        client.predict(np.zeros((2, 28, 28), np.uint8))
    assert rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, None)[0] != OK
    assert rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, keys.read)[0] != OK
    after = scrape(server)
    assert calls(after, "scorer") == calls(before, "scorer") + 1
    # A known key refused for its role is counted under its name, no token as anonymous.
    denied, missing = ("viewer", "PERMISSION_DENIED"), ("anonymous", "UNAUTHENTICATED")
    assert calls(after, *denied) == calls(before, *denied) + 1
    assert calls(after, *missing) == calls(before, *missing) + 1
    assert after[refused] == before.get(refused, 0.0) + 1
    callers = {dict(labels)["caller"] for name, labels in after if name == "mnist_requests_total"}
    assert callers <= {"anonymous", "scorer", "viewer", "limited", "imagey"}  # the file's


def test_the_access_log_names_the_caller(server: ServerProcess, keys: Keys) -> None:
    access_log = keys.file.parent / "access.jsonl"
    ids = {"scorer": "who-1", "anonymous": "who-2"}
    metadata = "/mnist.v1.MnistService/GetModelMetadata"
    for token, request_id in ((keys.predict, ids["scorer"]), (None, ids["anonymous"])):
        with grpc.insecure_channel(server.target) as channel:
            stub = channel.unary_unary(
                metadata,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda data: data,
            )
            sent = (("x-request-id", request_id), *(bearer(token) if token else ()))
            with contextlib.suppress(grpc.RpcError):
                stub(pb.GetModelMetadataRequest(), metadata=sent, timeout=30)

    def callers() -> dict[str, tuple[str, str]]:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        records = [json.loads(line) for line in lines]
        return {r["request_id"]: (r["caller"], r["status"]) for r in records}

    wait_for(lambda: set(ids.values()) <= set(callers()), "both calls logged")
    assert callers()[ids["scorer"]] == ("scorer", "OK")
    assert callers()[ids["anonymous"]] == ("anonymous", "UNAUTHENTICATED")
    for token in keys.tokens:
        assert token not in access_log.read_text()


def test_the_client_library_maps_auth_failures_to_exceptions(
    server: ServerProcess, keys: Keys
) -> None:
    image = np.zeros((1, 28, 28), np.uint8)
    with MnistClient(server.target) as client, pytest.raises(Unauthenticated):
        client.predict(image)
    with MnistClient(server.target, token=keys.read) as client:
        assert client.metadata().name == "mnist"
        with pytest.raises(PermissionDenied) as denied:
            client.predict(image)
    assert denied.value.request_id  # an error still carries its call's ID
    with pytest.raises(ValueError, match="printable ASCII"):
        MnistClient(server.target, token="two words")


def test_a_keys_request_rate_limit_answers_429_and_resource_exhausted(
    server: ServerProcess, keys: Keys
) -> None:
    before = scrape(server)
    # The bucket holds one call; it refills in 1 / SLOW seconds, longer than this test.
    first = rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, keys.limited)
    assert first[0] == OK
    code, details, trailing = rpc(
        server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, keys.limited
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'limited'" in details
    assert "requests_per_second" in details
    assert int(trailing["retry-after-ms"]) > 1000
    assert trailing["grpc-retry-pushback-ms"] == "-1"  # too long to wait: clients do not retry
    status, headers, data = http(server, "GET", "/v2", token=keys.limited)
    assert status == 429, data
    assert int(headers["Retry-After"]) > 1
    with (
        MnistClient(server.target, token=keys.limited) as client,
        pytest.raises(RateLimited) as limited,
    ):
        client.metadata()
    assert limited.value.retry_after > 1
    after = scrape(server)

    def delta(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta(("mnist_rate_limited_total", (("caller", "limited"), ("limit", "requests")))) == 3
    assert delta(("mnist_auth_failures_total", (("reason", "rate_limited"),))) == 3
    shed = [key for key in after if key[0] == "mnist_requests_shed_total"]
    assert all(delta(key) == 0 for key in shed)  # not counted as the queue's shedding


def test_a_keys_image_rate_limit_counts_images(server: ServerProcess, keys: Keys) -> None:
    with MnistClient(server.target, token=keys.images) as client:
        client.predict(np.zeros((1, 28, 28), np.uint8))  # the bucket's one image
        assert client.metadata().name == "mnist"  # no images: not limited
        with pytest.raises(RateLimited, match="images_per_second"):
            client.predict(np.zeros((1, 28, 28), np.uint8))
    status, headers, _ = http(server, "POST", "/v2/models/mnist/infer", V2_INFER_BODY, keys.images)
    assert status == 429
    assert "Retry-After" in headers


def test_tokens_and_hashes_never_reach_the_log(server: ServerProcess, keys: Keys) -> None:
    # Refused and answered calls of every kind were made above (module order); make some here
    # too, so that this test holds on its own.
    for token in [*keys.tokens, "mnist_not-a-key"]:
        rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, token)
        http(server, "POST", "/v2/models/mnist/infer", V2_INFER_BODY, token)
    log = server.log
    assert "call refused" in log  # the log does speak of refusals
    for token in [*keys.tokens, "mnist_not-a-key"]:
        assert token not in log
        assert hashlib.sha256(token.encode()).hexdigest() not in log
    assert "api keys over plaintext" in log  # the start-up warning without TLS


def test_the_official_tf_serving_stubs_send_the_token_as_metadata(
    server: ServerProcess, keys: Keys
) -> None:
    from mnist_serving.contract.tfquiet import import_tensorflow

    tf = import_tensorflow()
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 28, 28), np.uint8)))
    with grpc.insecure_channel(server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=30)
        assert refused.value.code() == UNAUTHENTICATED
        answer = stub.Predict(request, timeout=30, metadata=bearer(keys.predict))
    assert tf.make_ndarray(answer.outputs["probabilities"]).shape == (2, 10)


def test_tritonclient_sends_the_token_over_grpc_and_http(server: ServerProcess, keys: Keys) -> None:
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    images = np.zeros((1, 784), np.uint8)
    headers = {"authorization": f"Bearer {keys.predict}"}
    for module, url in (
        (triton_grpc, server.target),
        (triton_http, f"{server.host}:{server.http_port}"),
    ):
        client: Any = module.InferenceServerClient(url)
        try:
            infer_input = module.InferInput("images", [1, 784], "UINT8")
            infer_input.set_data_from_numpy(images)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("mnist", [infer_input])
            assert "401" in str(refused.value) or "UNAUTHENTICATED" in str(refused.value)
            assert client.is_server_live()  # health: no token needed
            answer = client.infer("mnist", [infer_input], headers=headers)
            assert answer.as_numpy("probabilities").shape == (1, 10)
            assert client.get_model_metadata("mnist", headers=headers)
        finally:
            client.close()


def test_the_cli_takes_the_token_from_a_file_or_mnist_token(
    server: ServerProcess,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digits = tmp_path / "digits.npy"
    np.save(digits, np.zeros((2, 28, 28), np.uint8))
    token_file = tmp_path / "token"
    token_file.write_text(keys.predict + "\n")
    predict = ["predict", "--target", server.target, str(digits)]
    monkeypatch.delenv("MNIST_TOKEN", raising=False)
    assert client_main(predict) != 0
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert client_main([*predict, "--token-file", str(token_file)]) == 0
    assert "digits.npy[1]" in capsys.readouterr().out
    monkeypatch.setenv("MNIST_TOKEN", keys.read)
    assert client_main(predict) != 0
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.setenv("MNIST_TOKEN", keys.predict)
    assert client_main(predict) == 0
    score = ["score", "--target", server.target, "--input", str(digits), "--output"]
    assert client_main([*score, str(tmp_path / "scored.csv"), "--no-progress"]) == 0
    assert len((tmp_path / "scored.csv").read_text().splitlines()) == 3  # a header, two rows
    assert client_main([*predict, "--token-file", str(tmp_path / "absent")]) != 0
    assert "--token-file" in capsys.readouterr().err


# --- the keys file: made by the command, rotated, broken; /metrics behind a key -----------


def test_keys_add_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    done = subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", "keys", "add", "job-7",
         "--role", "predict", "--file", str(keys), "--images-per-second", "5000"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    token = done.stdout.strip().splitlines()[-1]
    assert token.startswith("mnist_")
    assert len(token) > 40
    assert done.stdout.count(token) == 1
    text = keys.read_text()
    assert token not in text
    [entry] = json.loads(text)["keys"]
    assert entry == {
        "name": "job-7",
        "role": "predict",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
        "images_per_second": 5000,
    }
    assert os.stat(keys).st_mode & 0o077 == 0  # the owner's alone
    assert keys_main(["add", "job-7", "--role", "read", "--file", str(keys)]) == 1  # taken
    assert keys_main(["add", "anonymous", "--role", "read", "--file", str(keys)]) == 2
    assert keys_main(["remove", "job-7", "--file", str(keys)]) == 0
    assert json.loads(keys.read_text()) == {"keys": []}


def test_a_broken_keys_file_stops_start_up(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"name": "x", "role": "admin", "sha256": "00"}]}')
    done = subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", "--model-dir", str(tiny_model_dir),
         "--port", "0", "--http-port", "0", "--auth-keys", str(keys)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "role must be one of" in done.stderr
    assert "sha256" not in done.stderr.replace("sha256 must be", "")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition()` holds; fail after WAIT_SECONDS (a bound, not a proof)."""
    give_up = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < give_up, f"not within {WAIT_SECONDS:g} s: {what}"
        time.sleep(0.05)


def test_keys_rotate_without_a_restart_and_a_broken_file_keeps_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    old = add_key(keys, "old", "predict")
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--auth-keys", str(keys), "--metrics-auth"
    )
    try:

        def answers(token: str) -> bool:
            return rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, token)[0] == OK

        # /metrics needs a key now: any role.
        status, headers, _ = http(server, "GET", "/metrics")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, page = http(server, "GET", "/metrics", token=old)
        assert status == 200
        assert b"mnist_auth_failures_total" in page

        assert answers(old)
        new = add_key(keys, "new", "read")  # the file is replaced (a new inode)
        metadata = "/mnist.v1.MnistService/GetModelMetadata"
        wait_for(
            lambda: rpc(server, metadata, pb.GetModelMetadataRequest(), new)[0] == OK,
            "the new key works",
        )
        assert keys_main(["remove", "old", "--file", str(keys)]) == 0
        wait_for(lambda: not answers(old), "the removed key is refused")
        code = rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, old)[0]
        assert code == UNAUTHENTICATED

        # A broken file keeps the keys, and says so once.
        broken = tmp_path / "broken.json"
        broken.write_text('{"keys": [')
        os.replace(broken, keys)
        # The file is looked at on calls (at most once a second): call until it was.
        wait_for(
            lambda: (
                http(server, "GET", "/v2", token=new)[0] == 200
                and "keys file not reloaded" in server.log
            ),
            "the broken file is logged, the key still works",
        )
        assert http(server, "GET", "/v2", token=new)[0] == 200
        assert server.log.count("keys file not reloaded") == 1
        assert server.process.poll() is None
        for token in (old, new):
            assert token not in server.log
    finally:
        assert server.stop() == 0, server.log


def test_every_worker_reads_the_keys_and_the_supervisors_metrics_port_wants_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    token = add_key(keys, "scorer", "predict")
    with ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--workers", "2", "--auth-keys", str(keys),
        "--metrics-auth", "--metrics-port", "0",
    ) as server:  # fmt: skip
        # Each new channel is a new connection, which the kernel hands to either worker.
        for _ in range(8):
            assert rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, None)[0] == (
                UNAUTHENTICATED
            )
            assert rpc(server, "/mnist.v1.MnistService/Predict", NATIVE_PREDICT, token)[0] == OK
        request = urllib.request.Request(server.metrics_url)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
        request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            page = answer.read().decode()
        assert 'caller="scorer"' in page
        assert server.log.count("api keys on") == 2  # one line per worker
