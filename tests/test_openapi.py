"""The HTTP port's OpenAPI document: one source (server/api/openapi.py), served at
/openapi.json and copied to docs/openapi.json, and true: schemathesis runs every operation
against a live server. Also the pages' routes, --no-ui and CORS (--cors-origins).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest

from mnist_serving.server.api import openapi
from mnist_serving.server.settings import Settings

from .support import ServerProcess

REPO = Path(__file__).resolve().parent.parent
CHECKED_IN = REPO / "docs" / "openapi.json"
REGENERATE = "make openapi (python -m mnist_serving.server.api.openapi > docs/openapi.json)"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
EXAMPLES_PER_OPERATION = 5
ORIGIN = "http://page.example:8080"


def get(
    server: ServerProcess, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(server.http_url + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_docs_openapi_json_is_the_generated_document() -> None:
    assert CHECKED_IN.read_text() == openapi.text(), (
        f"docs/openapi.json differs from server/api/openapi.py; rewrite it with: {REGENERATE}"
    )


def test_the_document_is_openapi_3_1_and_covers_the_http_port() -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    document = openapi.document()
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    paths = document["paths"]
    for path in (
        "/v1/models/{name}:predict",
        "/v1/models/{name}/versions/{version}/metadata",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/infer",
        "/metrics",
    ):
        assert path in paths
    infer = paths["/v2/models/{name}/infer"]["post"]
    # The binary tensor extension, both ways, and the errors of errors.HTTP_STATUS_OF.
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert "application/octet-stream" in infer["responses"]["200"]["content"]
    assert {"400", "404", "413", "429", "500", "503", "504"} <= set(infer["responses"])
    # API keys: bearer tokens, optional (auth is off by default), never on health routes.
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert {"401", "403", "429"} <= set(infer["responses"])
    assert infer["security"] == [{"bearerAuth": []}, {}]
    for health in ("/v2/health/live", "/v2/health/ready"):
        assert paths[health]["get"]["security"] == []
        assert "401" not in paths[health]["get"]["responses"]


def test_the_server_serves_the_document(served_tiny: ServerProcess) -> None:
    status, headers, body = get(served_tiny, "/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body.decode() == openapi.text()


def test_schemathesis_finds_nothing(served_tiny: ServerProcess, tmp_path: Path) -> None:
    """Every operation, a fixed number of generated cases each (the same ones every run:
    deterministic generation), and the four checks; tests/schemathesis.toml says which
    documented 5xx answers are not server errors."""
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(REPO / "tests" / "schemathesis.toml"),
        "run", served_tiny.http_url + "/openapi.json",
        "--checks", ",".join(CHECKS),
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--phases", "examples,coverage,fuzzing",
        "--generation-database", "none",
        "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    summary = run.stdout[run.stdout.find("SUMMARY") :]
    print(summary)  # shown with -s, and kept in the report on failure
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
    assert "Selected: 17/17" in run.stdout
    assert re.search(r"\d+ generated, \d+ passed", run.stdout), summary


# The pages, --no-ui and CORS.


def test_the_pages_are_served_from_the_package(served_tiny: ServerProcess) -> None:
    status, headers, page = get(served_tiny, "/")
    assert (status, headers["Content-Type"]) == (200, "text/html; charset=utf-8")
    assert b'<canvas id="digit"' in page
    assert b'id="predicted-class"' in page
    status, _, docs = get(served_tiny, "/docs")
    assert status == 200
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page + docs)
    assert b"/docs/swagger-ui-bundle.js" in assets
    for asset in assets:
        # Nothing from elsewhere: the pages work offline.
        assert asset.startswith(b"/"), asset
        status, _, body = get(served_tiny, asset.decode())
        assert status == 200, asset
        assert body
    for name in ("app.js", "docs.js", "style.css"):
        body = get(served_tiny, f"/ui/{name}")[2]
        assert not re.search(rb"https?://", body), name
    config = json.loads(get(served_tiny, "/ui/config.json")[2])
    assert config == {"model_name": "mnist", "samples": 0}
    assert get(served_tiny, "/ui/samples.json")[0] == 404  # no --ui-samples: no picker


def test_cors_is_off_by_default(served_tiny: ServerProcess) -> None:
    _, headers, _ = get(served_tiny, "/v2/health/ready", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = get(
        served_tiny,
        "/v2/models/mnist/infer",
        "OPTIONS",
        {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert status == 405
    assert "Access-Control-Allow-Origin" not in headers


@pytest.fixture(scope="module")
def served_cors_no_ui(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tiny_model_dir, "--poll-interval", "0", "--no-ui", "--cors-origins", ORIGIN
    )
    yield server
    assert server.stop() == 0, server.log


def test_no_ui_turns_the_pages_off_but_not_the_document(served_cors_no_ui: ServerProcess) -> None:
    for path in ("/", "/docs", "/ui/app.js", "/ui/config.json", "/docs/swagger-ui-bundle.js"):
        status, _, body = get(served_cors_no_ui, path)
        assert status == 404, path
        assert "error" in json.loads(body)
    assert get(served_cors_no_ui, "/openapi.json")[0] == 200


def test_cors_answers_the_allowed_origin_only(served_cors_no_ui: ServerProcess) -> None:
    status, headers, _ = get(
        served_cors_no_ui,
        "/v2/models/mnist/infer",
        "OPTIONS",
        {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,inference-header-content-length",
        },
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Methods"] == "GET, POST"
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "inference-header-content-length", "x-request-timeout-ms"} <= allowed
    assert headers["Vary"] == "Origin"
    for path in ("/v2/models/mnist", "/v2/models/other"):  # an answer and an error
        status, headers, _ = get(served_cors_no_ui, path, headers={"Origin": ORIGIN})
        assert status in (200, 404)
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        assert headers["Access-Control-Expose-Headers"] == "Inference-Header-Content-Length"
    _, headers, _ = get(served_cors_no_ui, "/v2", headers={"Origin": "http://other.example"})
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = get(
        served_cors_no_ui,
        "/v2",
        "OPTIONS",
        {"Origin": "http://other.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 405
    assert "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize(
    ("origins", "ok"),
    [
        (["*"], True),
        (["https://a.example", "http://localhost:3000"], True),
        (["a.example"], False),
        (["https://a.example/"], False),
        (["https://a.example/app"], False),
    ],
)
def test_cors_origins_are_checked_at_start_up(origins: list[str], ok: bool) -> None:
    settings: dict[str, Any] = {"cors_origins": origins}
    if ok:
        assert Settings(**settings).cors_origins == origins
    else:
        with pytest.raises(pydantic.ValidationError, match="scheme://host"):
            Settings(**settings)


# What schemathesis found in the server, fixed there.


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/models/mnist:predict", "POST"),
        ("GET", "/v1/models/mnist/versions/1:predict", "POST"),
        ("POST", "/v1/models/mnist", "GET"),
        ("POST", "/v1/models/mnist/metadata", "GET"),
    ],
)
def test_the_wrong_method_on_a_tfserving_path_is_405(
    served_tiny: ServerProcess, method: str, path: str, allow: str
) -> None:
    status, headers, body = get(served_tiny, path, method)
    assert status == 405, body  # was 501, a server error to schemathesis
    assert allow in headers["Allow"]
    assert "error" in json.loads(body)


def test_a_v2_request_id_must_be_a_string(served_tiny: ServerProcess) -> None:
    tensor = {"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}
    for request_id, status in (("abc", 200), (7, 400), (None, 400)):
        request = urllib.request.Request(
            served_tiny.http_url + "/v2/models/mnist/infer",
            data=json.dumps({"id": request_id, "inputs": [tensor]}).encode(),
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                got, body = answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            got, body = error.code, json.loads(error.read())
        assert got == status, body
        if status == 200:
            assert body["id"] == request_id
        else:
            assert "must be a string" in body["error"]
