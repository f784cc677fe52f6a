"""The commands ``python -m pipeline`` runs (pipeline/__main__.py) and the commands reference
lists (pipeline.tools.commands_reference): each a module of this package with ``main`` and
``parser()``."""

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
