"""The README's curl examples, run with real curl against the real server.

Every ```sh block of README.md that talks to localhost:8501 is run by bash (errexit,
pipefail) with the port of a test server substituted; the `# {...}` lines under a command
say what it prints, and their beginnings (up to the first "..." or model-dependent value)
must appear in the output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .support import ServerProcess

README = Path(__file__).resolve().parent.parent / "README.md"
ADDRESS = "localhost:8501"
# Where a documented answer stops being exact: elided parts and the model's own figures.
VARIABLE = re.compile(r'\.\.\.|"data":\[|"classes":\d|"probabilities":\[\d')


def http_blocks() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    return [block for block in blocks if ADDRESS in block]


def test_the_readme_has_curl_examples_for_both_rest_apis() -> None:
    text = "".join(http_blocks())
    assert "/v1/models/mnist:predict" in text
    assert "/v2/models/mnist/infer" in text
    assert "Inference-Header-Content-Length" in text


@pytest.mark.parametrize("block", http_blocks(), ids=lambda b: b.split("\n", 1)[0][:60])
def test_readme_curl_example_runs(served_tiny: ServerProcess, tmp_path: Path, block: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = block.replace(ADDRESS, f"{served_tiny.host}:{served_tiny.http_port}")
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"error"' not in result.stdout
    for line in block.splitlines():
        if line.startswith("# {"):
            expected = VARIABLE.split(line.removeprefix("# "), maxsplit=1)[0]
            assert expected in result.stdout, (expected, result.stdout[:2000])
