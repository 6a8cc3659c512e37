"""Fuzzing the HTTP port: any request to any route gets a JSON answer, never a server error.

Both REST APIs (TF Serving's /v1 and KServe v2's /v2) get paths with any model name and
version segment, any JSON value where a field goes (wrong types, huge or negative numbers,
NaN and Infinity, nested lists and objects), valid bodies with parts changed, bodies that
are not JSON, the binary tensor extension with any header length, and any
X-Request-Timeout-Ms. Each
answer must be 2xx, a 4xx, 501 or (for a deadline the caller set) 504, with a JSON body
{"error": "..."}; a valid call must keep its exact answer; and mnist_requests_total must
count no INTERNAL or UNKNOWN outcome.

Bounded for CI like tests/test_fuzz.py; MNIST_FUZZ_EXAMPLES raises the number of examples.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from .support import ServerProcess, scrape
from .test_fuzz import FUZZ

# What an HTTP request can earn: a client error, or 504 for a deadline the caller set
# (X-Request-Timeout-Ms or v2's timeout parameter) too short to run in. Any 500 is a server
# bug; 503 needs a stopping server, which this test does not make.
CLIENT_STATUSES = {400, 404, 405, 411, 413, 415, 429, 501, 504}
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 255, 256, -1, 0.5, 28, 784, "uint8", "UINT8", "FP32", "images"]),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=40,
)


def mostly(valid: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` about three times in four, else anything `other` draws: a valid request
    with a part or two changed, so that the search reaches past the first check."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), other)


NAMES = mostly("mnist", st.sampled_from(["", "other", "x" * 300, "mnist%00", "..", "%2F"]))
VERSIONS = mostly(
    "1",
    st.one_of(
        # "%C2%B2" is "²", "%D9%A3" an Arabic-Indic 3: str.isdigit() passes both.
        st.sampled_from(
            ["0", "-1", "2", "99999999999999999999", "1e3", "abc", "", "%C2%B2", "%D9%A3"]
        ),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
    ),
)


@st.composite
def image_rows(draw: st.DrawFn) -> Any:
    """Nested lists shaped like images: mostly [N, 28, 28] or [N, 784] of valid pixels."""
    count = draw(mostly(1, st.integers(min_value=0, max_value=3)))
    side = draw(mostly(28, st.sampled_from([27, 0, 1])))
    pixel = draw(mostly(7, st.sampled_from([0, 255, 0.5, -1, 256, 1e300, True, "7", None])))
    row = [pixel] * side
    flat = draw(st.booleans())
    return [[pixel] * side * side if flat else [row] * side for _ in range(count)]


@st.composite
def tfserving_bodies(draw: st.DrawFn) -> Any:
    body: dict[str, Any] = {}
    key = draw(mostly("instances", st.sampled_from(["inputs", "both", "neither"])))
    images = draw(mostly(draw(image_rows()), JSON_VALUES))
    if key in ("instances", "both"):
        body["instances"] = images
    if key in ("inputs", "both"):
        body["inputs"] = draw(st.one_of(st.just(images), st.just({"images": images}), JSON_VALUES))
    if draw(st.booleans()):
        body["signature_name"] = draw(mostly("serving_default", JSON_VALUES))
    return draw(mostly(body, JSON_VALUES))


@st.composite
def v2_bodies(draw: st.DrawFn, binary: bool = False) -> tuple[Any, bytes]:
    """A v2 infer body and, with `binary`, the tensor bytes that follow it (the binary
    tensor extension: the input's data replaced by parameters.binary_data_size)."""
    images = draw(image_rows())
    tensor: dict[str, Any] = {
        "name": draw(mostly("images", JSON_VALUES)),
        "datatype": draw(
            mostly("UINT8", st.one_of(st.sampled_from(["FP32", "INT64", "BYTES"]), JSON_VALUES))
        ),
        "shape": draw(
            mostly(
                list(np.shape(images)),
                st.one_of(st.lists(st.integers(-(2**64), 2**64), max_size=5), JSON_VALUES),
            )
        ),
        "data": draw(mostly(images, JSON_VALUES)),
    }
    tail = b""
    if binary:
        tail = draw(mostly(bytes(np.size(images)), st.binary(max_size=2000)))
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": draw(mostly(len(tail), JSON_VALUES))}
    if not draw(mostly(True, st.just(False))):
        del tensor[draw(st.sampled_from(list(tensor)))]
    body: dict[str, Any] = {"inputs": draw(mostly([tensor], JSON_VALUES))}
    if draw(st.booleans()):
        body["outputs"] = draw(
            mostly(
                [
                    {"name": "classes"},
                    {"name": "probabilities", "parameters": {"binary_data": True}},
                ],
                JSON_VALUES,
            )
        )
    if draw(st.booleans()):
        body["parameters"] = draw(mostly({"timeout": 30_000_000}, JSON_VALUES))
    if draw(st.booleans()):
        body["id"] = draw(JSON_VALUES)
    return draw(mostly(body, JSON_VALUES)), tail


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers) for one of the port's routes, or a near miss."""
    name, version = draw(NAMES), draw(VERSIONS)
    pinned = draw(st.booleans())
    headers: dict[str, str] = {}
    api = draw(st.sampled_from(["tfserving", "v2", "v2-binary", "get"]))
    if api == "tfserving":
        path = f"/v1/models/{name}" + (f"/versions/{version}" if pinned else "")
        path += draw(mostly(":predict", st.sampled_from([":classify", "", ":"])))
        body = json.dumps(draw(tfserving_bodies()), allow_nan=True).encode()
    elif api in ("v2", "v2-binary"):
        path = f"/v2/models/{name}" + (f"/versions/{version}" if pinned else "") + "/infer"
        document, tail = draw(v2_bodies(binary=api == "v2-binary"))
        body = json.dumps(document, allow_nan=True).encode()
        if api == "v2-binary":
            length = draw(
                mostly(
                    str(len(body)),
                    st.one_of(
                        st.integers(-(2**40), 2**40).map(str),
                        st.sampled_from(["", "abc", "1e3", " 5", "0x10"]),
                    ),
                )
            )
            body += tail
            headers["Inference-Header-Content-Length"] = length
    else:
        base = draw(st.sampled_from([f"/v1/models/{name}", f"/v2/models/{name}"]))
        path = base + draw(
            st.sampled_from(
                ["", "/metadata", "/ready", f"/versions/{version}", f"/versions/{version}/metadata"]
            )
        )
        return (
            draw(mostly("GET", st.sampled_from(["HEAD", "DELETE", "OPTIONS"]))),
            path,
            b"",
            headers,
        )
    if draw(st.integers(0, 7)) == 0:
        body = draw(st.binary(max_size=300))  # not JSON at all
    if draw(st.booleans()):
        headers["X-Request-Timeout-Ms"] = draw(
            mostly(
                "30000",
                st.one_of(
                    st.sampled_from(["0", "-5", "nan", "inf", "1e309", "", "abc"]),
                    st.floats(allow_nan=True).map(repr),
                ),
            )
        )
    return draw(mostly("POST", st.sampled_from(["PUT", "PATCH", "GET"]))), path, body, headers


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tiny_model_dir, "--poll-interval", "0")
    yield process
    assert process.stop() == 0, process.log


def send(
    server: ServerProcess, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type", ""), answer.read()
    finally:
        connection.close()


def reference_call(server: ServerProcess) -> list[float]:
    pixels = np.arange(784, dtype=np.int64).reshape(28, 28) % 256
    status, _, body = send(
        server,
        "POST",
        "/v1/models/mnist:predict",
        json.dumps({"instances": [pixels.tolist()]}).encode(),
        {},
    )
    assert status == 200, body
    probabilities: list[float] = json.loads(body)["predictions"][0]["probabilities"]
    return probabilities


def server_errors(server: ServerProcess) -> int:
    return sum(
        int(value)
        for (name, labels), value in scrape(server).items()
        if name == "mnist_requests_total" and dict(labels)["code"] in ("INTERNAL", "UNKNOWN")
    )


def test_every_route_answers_any_request_with_json(server: ServerProcess) -> None:
    expected = reference_call(server)
    statuses: dict[int, int] = {}

    @FUZZ
    @given(request=requests())
    def run(request: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, path, body, headers = request
        status, content_type, data = send(server, method, path, body, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert 200 <= status < 300 or status in CLIENT_STATUSES, (status, path, data[:500])
        if status >= 400 and method != "HEAD":  # a HEAD answer has no body
            assert content_type.startswith("application/json"), (status, path, content_type)
            error = json.loads(data)["error"]
            assert isinstance(error, str), (path, data[:500])
            assert error, path
        assert reference_call(server) == expected

    run()
    assert server_errors(server) == 0
    # The search reached both the answers and the refusals.
    assert any(200 <= s < 300 for s in statuses), statuses
    assert 400 in statuses, statuses
