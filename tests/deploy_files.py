"""Reading the deployment files, for tests/test_deploy.py (compose) and tests/test_k8s.py.

Parsers for the Dockerfile and the Grafana dashboard, a PromQL name extractor, durations,
and the tools the checks run (promtool, the CLIs' --help): what both sets of deployment
tests judge the same way.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mnist.json"


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def seconds(duration: str | int | float) -> float:
    """A compose duration ('30s', '1m30s', '1m0s') in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts, f"bad duration {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; ARGs declared before the first FROM are substituted."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continued instruction.
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            image = re.sub(
                r"\$\{?(\w+)\}?", lambda match: global_args.get(match.group(1), ""), words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name.lower(), image))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, root first."""
    found = [stages[name]]
    while found[0].base in stages:
        found.insert(0, stages[found[0].base])
    return found


def effective(stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """The image setting (USER, ENTRYPOINT, ...) in force at the end of a stage."""
    value = None
    for stage in chain(stages, name):
        for instruction in stage.all(keyword):
            value = instruction.args
    return value


def exec_form(args: str) -> list[str]:
    """An instruction's JSON (exec) form; fails on shell form, which hides signals behind sh."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not in exec (JSON) form: {args}")
    assert isinstance(value, list), args
    assert all(isinstance(item, str) for item in value), args
    return value


def dashboard_panels() -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")


_FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "ceil", "changes", "clamp_max", "clamp_min",
    "count", "delta", "deriv", "floor", "histogram_quantile", "increase", "irate",
    "label_replace", "max", "max_over_time", "min", "min_over_time", "quantile", "rate",
    "resets", "round", "scalar", "sort", "sort_desc", "stddev", "sum", "sum_over_time",
    "time", "topk", "bottomk", "vector",
}  # fmt: skip


_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series selected, label names used) in a PromQL expression; fails on unknown words."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels: set[str] = set()
    series: set[str] = set()
    for match in GROUPING.finditer(text):
        labels |= {name.strip() for name in match.group(2).split(",") if name.strip()}
    text = GROUPING.sub(" ", text)
    for match in _SELECTOR.finditer(text):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2)))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", " ", text)
    for match in re.finditer(r"[a-zA-Z_:][\w:]*(\s*\()?", text):
        word = match.group(0).rstrip("( \t")
        if match.group(1):
            assert word in _FUNCTIONS, f"unknown function {word!r} in {expr}"
        elif word not in _KEYWORDS:
            series.add(word)
    return series, labels


def import_or_skip(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            pytest.skip(f"{module} is not on this branch yet")
        raise


def mentions(help_output: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_output) is not None


def help_text(module: str, script: str, *args: str) -> str:
    import_or_skip(module)
    code = f"import sys; from {module} import main; sys.argv = {[script, *args]!r}; main()"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
