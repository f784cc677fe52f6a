"""The commands ``python -m pipeline`` runs (pipeline/__main__.py) and the commands reference
lists (pipeline.tools.commands_reference): each a module of this package with ``main`` and
``parser()``; and what the commands that write a generated page share."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.core.common import write_text

# name: (module under pipeline.tools, what it does)
COMMANDS = {
    "predict": ("predict", "classify image files, folders or texts with the fine-tuned model (or its ONNX)"),
    "samples": ("samples", "write a prepared split to files, for predict to read"),
    "strategies": ("strategies", "turn a sweep of strategies over seeds into one table"),
    "launch": ("launch", "submit experiments as Slurm jobs, each in its own clone, resumed when requeued"),
    "push-runs": ("push_runs", "dvc push --run-cache, with the metrics and plots a restore elsewhere needs"),
    "compare": ("compare", "write the model diff of this run against a base commit (CI's comment)"),
    "params-reference": ("params_reference", "write docs/reference/params.md from the params schema"),
    "commands-reference": (
        "commands_reference",
        "write docs/reference/commands.md from these commands' arguments",
    ),
}


def page_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of a command that writes a generated page: its one option, ``--check``."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {command}", description=description)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 where the page is stale")
    return parser


def write_or_check(path: Path, page: str, check: bool, command: str) -> int:
    """Write the generated ``page`` to ``path``; with ``check``, write nothing and say (exit
    status 1) whether the committed page is stale, naming ``command``, which rewrites it."""
    if check:
        stale = not path.is_file() or path.read_text() != page
        print(f"{path}: {f'stale; run python -m pipeline {command}' if stale else 'up to date'}")
        return 1 if stale else 0
    write_text(path, page)
    print(f"{command.replace('-', '_')}: {path}")
    return 0
