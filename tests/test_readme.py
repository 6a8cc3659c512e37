"""The examples of README.md and of the docs (docs/**/*.md), run against a real server.

Every ```sh and ```python block that talks to localhost:8500 (gRPC) or localhost:8501
(HTTP) is run with the ports of a test server put in: sh blocks by bash (errexit,
pipefail), python blocks by this venv's Python, each in a fresh folder, with MNIST_PATH set
and the venv's commands (mnist-client, python) first on PATH. The `# {...}` lines under a
command say what it prints; their beginnings (up to the first "..." or model-dependent
value) must appear in the output. A block that cannot run here (certificates, grpcurl, Ray,
illustrative file names) says so on the line before its fence: `<!-- not run: why -->`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import ServerProcess

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").rglob("*.md"))]
GRPC, HTTP = "localhost:8500", "localhost:8501"
FENCE = re.compile(
    r"^(?P<skip><!-- not run:[^\n]*-->\n)?```(?P<lang>sh|python)\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
# Where a documented answer stops being exact: elided parts and the model's own figures.
VARIABLE = re.compile(r'\.\.\.|"data":\[|"classes":\d|"probabilities":\[\d')
# Programs a block may need that are not part of this project.
TOOLS = ("curl",)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def all_blocks() -> list[tuple[Block, bool]]:
    """Every sh/python block of the README and the docs, and whether it is marked not run."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start("lang")) + 1
            block = Block(path, line, match["lang"], match["code"])
            found.append((block, match["skip"] is not None))
    return found


def runnable_blocks() -> list[Block]:
    return [
        block
        for block, skipped in all_blocks()
        if not skipped and (GRPC in block.code or HTTP in block.code)
    ]


def test_the_examples_cover_every_api_and_the_readme_quickstart() -> None:
    blocks = runnable_blocks()
    text = "".join(block.code for block in blocks)
    for needed in (
        "/v1/models/mnist:predict",
        "/v2/models/mnist/infer",
        "Inference-Header-Content-Length",
        "predict_pb2_grpc.MnistServiceStub",
        "tritonclient.grpc",
        "tritonclient.http",
    ):
        assert needed in text, needed
    readme = "".join(block.code for block in blocks if block.path == README)
    for call in ("mnist-client predict", "curl", "MnistClient("):
        assert call in readme, f"the README's quickstart must run {call!r}"


def test_every_not_run_mark_gives_a_reason_and_sits_on_a_fence() -> None:
    marks = [
        (path, match[1])
        for path in DOCUMENTS
        for match in re.finditer(r"<!-- not run:(.*?)-->", path.read_text(encoding="utf-8"))
    ]
    assert all(reason.strip() for _, reason in marks), "a `not run` mark without a reason"
    # A mark anywhere but on the line before a ```sh or ```python fence would skip nothing.
    assert len(marks) == sum(skipped for _, skipped in all_blocks())


def test_the_readme_links_reach_files_of_the_checkout() -> None:
    """mkdocs checks the links between pages; the README lies outside the site."""
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    assert targets
    for target in targets:
        assert (REPO / target).is_file(), f"README.md links to {target}, which does not exist"


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda block: block.name)
def test_documented_example_runs(
    served_tiny: ServerProcess, tmp_path: Path, request: pytest.FixtureRequest, block: Block
) -> None:
    for tool in TOOLS:
        if re.search(rf"\b{tool}\b", block.code) and shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if "MNIST_PATH" in block.code:
        env["MNIST_PATH"] = str(request.getfixturevalue("mnist_path"))
    code = block.code.replace(GRPC, served_tiny.target).replace(
        HTTP, f"{served_tiny.host}:{served_tiny.http_port}"
    )
    if block.lang == "sh":
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        (tmp_path / "example.py").write_text(code, encoding="utf-8")
        command = [sys.executable, "example.py"]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"error"' not in result.stdout
    for line in block.code.splitlines():
        if line.startswith("# {"):
            expected = VARIABLE.split(line.removeprefix("# "), maxsplit=1)[0]
            assert expected in result.stdout, (expected, result.stdout[:2000])
