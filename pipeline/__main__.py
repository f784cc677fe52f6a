"""The project's commands, beside the DVC stages: ``python -m pipeline <command> [args]``,
or ``dvc-tl <command> [args]`` once the project is installed. ``python -m pipeline`` alone
lists them; ``python -m pipeline <command> --help`` says what one takes."""

from __future__ import annotations

import importlib
import sys

# name: (module under pipeline.tools, what it does)
COMMANDS = {
    "predict": ("predict", "classify image files, folders or texts with the fine-tuned model (or its ONNX)"),
    "samples": ("samples", "write a prepared split to files, for predict to read"),
    "strategies": ("strategies", "turn a sweep of strategies over seeds into one table"),
    "launch": ("launch", "submit experiments as Slurm jobs, each in its own clone, resumed when requeued"),
    "push-runs": ("push_runs", "dvc push --run-cache, with the metrics and plots a restore elsewhere needs"),
    "compare": ("compare", "write the model diff of this run against a base commit (CI's comment)"),
    "params-reference": ("params_reference", "write docs/reference/params.md from the params schema"),
}


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
