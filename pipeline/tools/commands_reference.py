"""Write the commands reference, docs/reference/commands.md, from the commands' own argument
parsers: ``python -m pipeline commands-reference [--check]``.

Each command of ``python -m pipeline`` gets a section: what it does and a row for each of its
arguments (what it takes, its default, its help), read from the ``parser()`` of its module.
The page cannot drift from the code: tests/test_commands_reference.py fails where the
committed page is not what this writes, and ``--check`` writes nothing and exits 1 where it
is stale. Read from the parsers' arguments rather than their ``--help`` text, whose wrapping
and wording differ between Python versions.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from pipeline.core.entry import run_tool
from pipeline.tools import COMMANDS, page_parser, write_or_check

REFERENCE_FILE = Path("docs/reference/commands.md")


def command_parser(module: str) -> argparse.ArgumentParser:
    """The argument parser of the command in ``module`` (under pipeline.tools)."""
    return importlib.import_module(f"pipeline.tools.{module}").parser()


def cell(text: str) -> str:
    """``text`` in a markdown table cell: pipes escaped, <angle brackets> shown, not read as HTML."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def takes(action: argparse.Action) -> str:
    """What an argument takes, in words: its choices, a value, several, or nothing (a flag)."""
    if action.nargs == 0:
        return "a flag"
    if action.choices:
        return "one of: " + ", ".join(f"`{choice}`" for choice in action.choices)
    name = action.metavar or action.dest.upper()
    if action.nargs in ("*", "+"):
        return f"`{name}` …"
    repeat = " (repeatable)" if isinstance(action, argparse._AppendAction) else ""
    return f"`{name}`{repeat}"


def default_of(action: argparse.Action) -> str:
    if action.default in (None, [], False) or action.nargs == 0:
        return "–"
    return f"`{action.default}`"


def arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | takes | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = (
            ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.metavar or action.dest}`"
        )
        rows.append(
            f"| {name} | {cell(takes(action))} | {cell(default_of(action))} | {cell(action.help or '')} |"
        )
    return rows


def reference() -> str:
    """The commands reference page."""
    lines = [
        "# Commands reference",
        "",
        "The project's commands beside the DVC stages: `python -m pipeline <command> [args]`,",
        "or `dvc-tl <command> [args]` once the project is installed; `python -m pipeline` alone",
        "lists them, and `python -m pipeline <command> --help` prints what one takes. Written by",
        "`python -m pipeline commands-reference` from the commands' argument parsers; a test",
        "fails where this page is not what it writes.",
        "",
    ]
    for name, (module, summary) in COMMANDS.items():
        lines += [f"## `{name}`", "", f"{summary[0].upper()}{summary[1:]}.", ""]
        lines += [f"`python -m pipeline {name} [args]`", "", *arguments_table(command_parser(module)), ""]
    return "\n".join(lines).rstrip() + "\n"


def parser() -> argparse.ArgumentParser:
    return page_parser("commands-reference", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    page = reference()
    return write_or_check(REFERENCE_FILE, page, args.check, "commands-reference")


if __name__ == "__main__":
    run_tool(main)
