"""Compare transfer strategies from DVC experiments: ``python -m pipeline strategies``.

Reads ``dvc exp show --json`` (run here, or a file saved from it with ``--json``), groups the
experiments by their params other than ``seed``, and writes a markdown table and a figure:
test accuracy, macro-F1, trainable parameters and fine-tune time of each group, mean ± std
over its seeds. Each linear probe (train_head, on the same seeds) comes first, then the
groups that share its upstream stages.
A group is named by the params where it differs from the commit the experiments started
from, so any sweep works, not only the README's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.common import atomic_path
from pipeline.core.entry import run_tool
from pipeline.core.errors import StageError

# Beside the report, not in reports/figures/: that folder is the report stage's output,
# which the next `dvc repro` replaces whole.
STRATEGIES_FILE = Path("reports/strategies.md")
STRATEGIES_FIGURE = Path("reports/strategies.png")
TEST_METRICS = "metrics/test.json"
FINETUNE_SUMMARY = "reports/live/finetune/metrics.json"
FINETUNE_TIME = "metrics/finetune_time.json"
PROBE = "linear probe"


@dataclass(frozen=True)
class Run:
    """One experiment: its flattened params and the figures the table reports."""

    name: str
    params: dict[str, Any]
    accuracy: float
    macro_f1: float
    probe_accuracy: float
    probe_macro_f1: float
    trainable_params: int
    seconds: float | None  # the fine-tune loop's wall time; None from runs made before it was recorded


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as ``section.key`` -> value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_data(data: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    return ((data.get(kind) or {}).get(path) or {}).get("data") or {}


def experiment_runs(show: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Run]]:
    """The params of the commit the experiments started from, and each finished experiment."""
    base, runs = None, []
    for commit in show:
        if commit.get("rev") == "workspace":
            continue
        for experiment in commit.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                run = to_run(rev)
                if run is not None:
                    base = base or flatten(file_data(commit["data"], "params", "params.yaml"))
                    runs.append(run)
    if not runs:
        raise StageError(
            "strategies: no finished experiment with metrics in `dvc exp show`; run the sweep "
            "first (README, 'Which strategy for your data')"
        )
    return base, runs


def to_run(rev: dict[str, Any]) -> Run | None:
    data = rev.get("data") or {}
    test = file_data(data, "metrics", TEST_METRICS)
    summary = file_data(data, "metrics", FINETUNE_SUMMARY).get("finetune", {})
    if "finetuned" not in test or "trainable_params" not in summary:
        return None
    return Run(
        name=rev.get("name") or data.get("rev", "?")[:7],
        params=flatten(file_data(data, "params", "params.yaml")),
        accuracy=test["finetuned"]["accuracy"],
        macro_f1=test["finetuned"]["macro_f1"],
        probe_accuracy=test["linear_probe"]["accuracy"],
        probe_macro_f1=test["linear_probe"]["macro_f1"],
        trainable_params=int(summary["trainable_params"]),
        seconds=file_data(data, "metrics", FINETUNE_TIME).get("finetune", {}).get("seconds"),
    )


def group_label(params: dict[str, Any], base: dict[str, Any]) -> str:
    """The params (short names where unambiguous) where a group differs from ``base``."""
    changed = {key: value for key, value in params.items() if key != "seed" and base.get(key) != value}
    if not changed:
        return "as committed"
    short = {key: key.rsplit(".", 1)[-1] for key in changed}
    clash = {name for name in short.values() if list(short.values()).count(name) > 1}
    return ", ".join(
        f"{key if short[key] in clash else short[key]}={value}" for key, value in sorted(changed.items())
    )


@dataclass(frozen=True)
class Row:
    label: str
    seeds: list[int]
    accuracy: list[float]
    macro_f1: list[float]
    trainable_params: int | None
    seconds: list[float]


def upstream_label(params: dict[str, Any], base: dict[str, Any]) -> str:
    """What a run's linear probe depends on, where it differs from ``base``: every param but
    the fine-tuning ones (``finetune.*``, ``lr``) and the seed."""
    upstream = {
        key: value for key, value in params.items() if not key.startswith("finetune.") and key != "lr"
    }
    return group_label(upstream, base)


def grouped_rows(base: dict[str, Any], runs: list[Run]) -> list[Row]:
    """For each upstream setting (the committed one first), its linear probe (once per
    seed), then each group of fine-tuning runs on it, in the order they first appear."""
    groups: dict[str, list[Run]] = {}
    probes: dict[str, dict[Any, Run]] = {}
    upstream_of: dict[str, str] = {}
    for run in runs:
        label, upstream = group_label(run.params, base), upstream_label(run.params, base)
        groups.setdefault(label, []).append(run)
        probes.setdefault(upstream, {})[run.params.get("seed")] = run
        upstream_of[label] = upstream
    rows = []
    for upstream in sorted(probes, key=lambda label: label != "as committed"):  # stable: else as met
        by_seed = probes[upstream]
        seeds = sorted(by_seed)
        rows.append(
            Row(
                PROBE if upstream == "as committed" else f"{PROBE}, {upstream}",
                seeds,
                [by_seed[seed].probe_accuracy for seed in seeds],
                [by_seed[seed].probe_macro_f1 for seed in seeds],
                None,
                [],
            )
        )
        for label, members in groups.items():
            if upstream_of[label] != upstream:
                continue
            members = sorted(members, key=lambda run: run.params.get("seed"))
            rows.append(
                Row(
                    label,
                    [run.params.get("seed") for run in members],
                    [run.accuracy for run in members],
                    [run.macro_f1 for run in members],
                    members[0].trainable_params,
                    [run.seconds for run in members if run.seconds is not None],
                )
            )
    return rows


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| strategy | seeds | test accuracy (%) | test macro-F1 | trainable params | fine-tune time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        params = "–" if row.trainable_params is None else f"{row.trainable_params:,}"
        lines.append(
            f"| {row.label} | {len(row.seeds)} | {mean_std(row.accuracy, 100)} | "
            f"{mean_std(row.macro_f1, 1, 4)} | {params} | {mean_std(row.seconds, 1, 1)} |"
        )
    return "\n".join(lines) + "\n"


def save_figure(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [statistics.fmean(row.accuracy) * 100 for row in rows]
    errors = [statistics.stdev(row.accuracy) * 100 if len(row.accuracy) > 1 else 0.0 for row in rows]
    labels = [textwrap.fill(row.label, 34) for row in rows]  # params are named in full
    height = sum(0.25 * (label.count("\n") + 1) + 0.3 for label in labels) + 1.2
    figure, axis = plt.subplots(figsize=(9, height))
    axis.barh(range(len(rows)), means, xerr=errors, color="tab:blue", capsize=4)
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("test accuracy (%), mean ± std over seeds")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def exp_show_json() -> list[dict[str, Any]]:
    result = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StageError(f"strategies: `dvc exp show --json` failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline strategies", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="a saved `dvc exp show --json` (default: run it here)")
    parser.add_argument("--out", type=Path, default=STRATEGIES_FILE)
    parser.add_argument("--figure", type=Path, default=STRATEGIES_FIGURE)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    show = json.loads(args.json.read_text()) if args.json else exp_show_json()
    base, runs = experiment_runs(show)
    rows = grouped_rows(base, runs)
    save_figure(rows, args.figure)
    table = markdown_table(rows)
    link = os.path.relpath(args.figure, args.out.parent)
    with atomic_path(args.out) as temporary:
        temporary.write_text(f"# Transfer strategies\n\n{table}\n![test accuracy by strategy]({link})\n")
    print(table, end="")


if __name__ == "__main__":
    run_tool(main)
