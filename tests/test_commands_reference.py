"""docs/reference/commands.md is what pipeline.tools.commands_reference writes from the
commands' own argument parsers: a command added or gone, or an option changed, fails here."""

from __future__ import annotations

import argparse

from pipeline.tools import COMMANDS, commands_reference
from tests.conftest import ROOT


def test_the_committed_commands_reference_is_the_one_the_code_writes():
    committed = (ROOT / commands_reference.REFERENCE_FILE).read_text()
    assert committed == commands_reference.reference(), (
        "docs/reference/commands.md is stale: run python -m pipeline commands-reference"
    )


def test_every_command_has_a_section_with_a_row_for_each_option():
    page = commands_reference.reference()
    for name, (module, _) in COMMANDS.items():
        section = page.split(f"## `{name}`")[1].split("\n## ")[0]
        for action in commands_reference.command_parser(module)._actions:
            if not isinstance(action, argparse._HelpAction):
                flag = (action.option_strings or [action.metavar or action.dest])[-1]
                assert f"`{flag}`" in section, (name, flag)
    predict = page.split("## `predict`")[1].split("\n## ")[0]
    assert "| `--device` | one of: `auto`, `cpu`, `cuda`, `mps` | `auto` |" in predict
    assert "| `--text` | `TEXT` (repeatable) | – | a text to classify (repeatable) |" in predict


def test_an_option_added_to_a_command_changes_the_page(monkeypatch):
    from pipeline.tools import samples

    before = commands_reference.reference()
    original = samples.parser

    def with_one_more() -> argparse.ArgumentParser:
        parser = original()
        parser.add_argument("--shuffle", action="store_true", help="shuffle the files")
        return parser

    monkeypatch.setattr(samples, "parser", with_one_more)
    after = commands_reference.reference()
    assert after != before and "| `--shuffle` | a flag | – | shuffle the files |" in after
