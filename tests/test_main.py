"""`python -m pipeline`: one entry point that lists the tools and runs each; the stages stay
dvc.yaml's commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.__main__ import COMMANDS, main
from tests.conftest import ROOT


def test_every_tool_is_a_command_and_every_command_a_tool():
    tools = {path.stem for path in (ROOT / "pipeline" / "tools").glob("*.py") if path.stem != "__init__"}
    assert {module for module, _ in COMMANDS.values()} == tools


def test_alone_it_lists_the_commands_and_a_command_runs_its_tool(capsys):
    assert main([]) == 2
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m pipeline predict")


def test_an_unknown_command_names_the_commands(capsys):
    assert main(["train"]) == 2
    assert "unknown command 'train'; the commands are: predict, samples" in capsys.readouterr().err


def test_a_tools_bad_input_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", "x.png", "--model", str(tmp_path / "none.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_the_install_adds_the_same_entry_point_as_a_command():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dvc-tl": "pipeline.__main__:console"}
