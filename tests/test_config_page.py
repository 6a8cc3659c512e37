"""The configuration page is generated from Settings, never edited by hand.

scripts/config_page.py renders docs/operations/configuration.md from server/settings.py;
here it renders the page in memory and compares it with the checked-in file, so a setting
added, renamed or re-described without regenerating the page fails with the command that
regenerates it. The rows are also checked against what `mnist-serve --help` really accepts.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from mnist_serving.server.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "config_page.py"
PAGE = REPO / "docs" / "operations" / "configuration.md"
ROW = re.compile(r'^\| <a id="[a-z-]+"></a>`(--[a-z-]+)`.*? \| `(MNIST_SERVING_[A-Z_]+)` \|', re.M)


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_page", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_up_to_date(generator: ModuleType) -> None:
    expected = str(generator.render())
    actual = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    assert actual == expected, (
        f"{PAGE.relative_to(REPO)} is out of date with server/settings.py; "
        f"regenerate it with: {generator.COMMAND}"
    )


def test_every_setting_has_one_row_with_the_flag_and_variable_the_server_reads() -> None:
    rows = ROW.findall(PAGE.read_text(encoding="utf-8"))
    assert [flag for flag, _ in rows] == [
        "--" + name.replace("_", "-") for name in Settings.model_fields
    ]
    for flag, variable in rows:
        assert variable == "MNIST_SERVING_" + flag[2:].replace("-", "_").upper()
    shown = subprocess.run(
        [sys.executable, "-m", "mnist_serving.server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    accepted = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", shown)) - {"--help"}
    negated = {f for f in accepted if f.startswith("--no-")}
    assert accepted - negated == {flag for flag, _ in rows}


def test_a_variable_from_the_page_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's naming rule is the one pydantic-settings applies (flag > variable > default)."""
    monkeypatch.setenv("MNIST_SERVING_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("MNIST_SERVING_BATCHING", "false")
    from mnist_serving.server.__main__ import parse_settings

    assert parse_settings([]).max_batch_size == 7
    assert parse_settings([]).batching is False
    assert parse_settings(["--max-batch-size", "9"]).max_batch_size == 9
