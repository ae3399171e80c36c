"""Print the Markdown table of every ``lossd serve`` setting, generated from ``lossd_server.config.Settings``.

    python scripts/settings_table.py            # print the table
    python scripts/settings_table.py --write    # replace the table in README.md between the markers
    python scripts/settings_table.py --check    # exit 1 if README.md's table is stale

tests/test_deployment.py fails when README.md's table differs from this output.
"""

from __future__ import annotations

import argparse
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from lossd_server.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def _format_default(name: str, value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, int):
        if name.endswith("_bytes"):
            for size, unit in _UNITS:
                if value >= size and value % size == 0:
                    return f"{value // size} {unit}"
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return f"`{value}`"


def _choices(field: FieldInfo) -> list[str]:
    """The allowed values of a Literal field (also inside ``Literal[...] | None``)."""
    annotation = field.annotation
    members = [annotation, *typing.get_args(annotation)]
    for member in members:
        if typing.get_origin(member) is typing.Literal:
            return [str(choice) for choice in typing.get_args(member)]
    return []


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def settings_table() -> str:
    """The table, one row a Settings field in declaration order, ending with a newline."""
    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"{prefix}{name}".upper()
        meaning = field.description or ""
        choices = _choices(field)
        if choices:
            meaning = f"{meaning} One of {', '.join(f'`{choice}`' for choice in choices)}.".strip()
        rows.append(f"| `{flag}` | `{env}` | {_cell(_format_default(name, field.default))} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def readme_table(text: str) -> str:
    """The part of README.md between the markers (without them)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md must hold one {START} followed by one {END}")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replace_table(text: str, table: str) -> str:
    readme_table(text)  # validates the markers
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown table of the lossd serve settings.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update README.md in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = parser.parse_args(argv)
    table = settings_table()
    if args.write:
        text = README.read_text(encoding="utf-8")
        updated = replace_table(text, table)
        if updated != text:
            README.write_text(updated, encoding="utf-8")
            print(f"updated {README}")
        return 0
    if args.check:
        if readme_table(README.read_text(encoding="utf-8")) != table:
            print("README.md's settings table is stale: run python scripts/settings_table.py --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
