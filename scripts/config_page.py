"""Write the configuration reference, docs/operations/configuration.md, from `Settings`.

    .venv/bin/python scripts/config_page.py           # rewrite the page
    .venv/bin/python scripts/config_page.py --check   # exit 1 when the page is out of date

Every field of server/settings.py's Settings becomes one row: its flag (the field name in
kebab case), its environment variable (the prefix plus the name in capitals), its default,
the values it takes (from the field's type and bounds) and its description. The page is
never edited by hand: tests/test_config_page.py fails when it differs from what this
script writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from mnist_serving.server.settings import Settings

PAGE = Path(__file__).resolve().parent.parent / "docs" / "operations" / "configuration.md"
COMMAND = ".venv/bin/python scripts/config_page.py"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{name.upper()}"


def default_text(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list | tuple):
        return "empty" if not value else "`" + ",".join(str(v) for v in value) + "`"
    return f"`{value}`"


def values_text(name: str, schema: Mapping[str, Any]) -> str:
    """What a field accepts, in words, from its JSON schema."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    return " or ".join(_kind(name, option) for option in options) or "any"


def _kind(name: str, schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if "enum" in schema:
        choices = [f"`{choice}`" for choice in schema["enum"]]
        return "one of " + ", ".join(choices)
    if kind == "boolean":
        return "`true` or `false` in the environment"
    if kind in ("integer", "number"):
        return ("whole number" if kind == "integer" else "number") + _bounds(schema)
    if kind == "array":
        item = schema.get("items", {}).get("type", "value")
        example = "1,3" if item == "integer" else "a,b"
        quoted = "[1,3]" if item == "integer" else '["a","b"]'
        return (
            f"list of {item}s: `{flag(name)} {example}`, or `{env_var(name)}='{quoted}'` "
            "(JSON) in the environment"
        )
    if kind == "string":
        fmt = schema.get("format")
        if fmt == "file-path":
            return "path of an existing file"
        if fmt in ("path", "directory-path"):
            return "path"
        return "text" + (", not empty" if schema.get("minLength") else "")
    return str(kind or "value")


def _bounds(schema: Mapping[str, Any]) -> str:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f", {low} to {high}"
    parts = []
    if low is not None:
        parts.append(f"≥ {low}")
    if schema.get("exclusiveMinimum") is not None:
        parts.append(f"> {schema['exclusiveMinimum']}")
    if high is not None:
        parts.append(f"≤ {high}")
    if schema.get("exclusiveMaximum") is not None:
        parts.append(f"< {schema['exclusiveMaximum']}")
    return (", " + ", ".join(parts)) if parts else ""


# Characters that Markdown or HTML would read as markup in a description.
ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "|": "\\|",
        "*": "\\*",
        "_": "\\_",
        "`": "\\`",
        "[": "\\[",
        "]": "\\]",
    }
)


def cell(text: str) -> str:
    """Plain text (a description) as one table cell: one line, nothing read as markup."""
    return " ".join(text.split()).translate(ESCAPES) or "—"


def render() -> str:
    """The whole page, as the checked-in file must read."""
    properties = Settings.model_json_schema()["properties"]
    lines = [
        "<!-- Generated from server/settings.py by scripts/config_page.py; do not edit.",
        f"     After changing Settings, run: {COMMAND} -->",
        "",
        "# Configuration",
        "",
        "`mnist-serve` takes every setting as a command-line flag or as an environment",
        "variable: the flag is the setting's name in kebab case (`--model-dir`), the variable",
        f"is `{env_var('')}` and the name in capitals (`{env_var('model_dir')}`). A flag wins",
        "over the variable, and the variable over the default. A bad value, or a combination",
        "the server refuses, stops start-up with one line naming the flag (exit code 2).",
        "`mnist-serve --help` prints the same list.",
        "",
        "```sh",
        "mnist-serve --model-dir models/mnist --workers 2 --no-batching",
        f"{env_var('model_dir')}=models/mnist {env_var('workers')}=2 \\",
        f"  {env_var('batching')}=false mnist-serve   # the same",
        "```",
        "",
        "| flag | environment variable | default | values | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        schema = properties[name]
        anchor = flag(name)[2:]
        shown = f"`{flag(name)}`"
        if schema.get("type") == "boolean":
            shown += f" / `--no-{anchor}`"
        row = [
            f'<a id="{anchor}"></a>{shown}',
            f"`{env_var(name)}`",
            default_text(field),
            values_text(name, schema),
            cell(field.description or ""),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"{len(Settings.model_fields)} settings. Where each one matters: "
        "[batching](../concepts/batching.md), [versions](../concepts/versions.md), "
        "[runtimes](../concepts/runtimes.md), [workers](workers.md), "
        "[shutdown](shutdown.md), [TLS](tls.md), [connection limits](connection-limits.md), "
        "[metrics](metrics.md).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the page differs; write nothing"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is out of date; run: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
