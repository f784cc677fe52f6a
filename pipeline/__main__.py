"""The project's commands, beside the DVC stages: ``python -m pipeline <command> [args]``,
or ``dvc-tl <command> [args]`` once the project is installed. ``python -m pipeline`` alone
lists them; ``python -m pipeline <command> --help`` says what one takes."""

from __future__ import annotations

import importlib
import sys

from pipeline.tools import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: python -m pipeline <command> [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; the commands are: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    tool = importlib.import_module(f"pipeline.tools.{COMMANDS[name][0]}")
    from pipeline.core.entry import run_tool

    run_tool(lambda: tool.main(rest))
    return 0


def console() -> None:
    """The ``dvc-tl`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
