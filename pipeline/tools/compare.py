"""Compare this workspace's run with another git revision, as markdown for a pull request.

Not a stage: run it after ``dvc repro``, locally or in CI. It writes reports/compare.md
(params changed, test-metric deltas of the fine-tuned model, the linear probe and the
random-init probe, the test examples the fine-tuned model newly gets right and newly gets
wrong with the exact McNemar test on them, the classes whose F1 moved most, and, given
``dvc repro``'s output, the stages that reran) and reports/compare/*.png (confusion
matrices and training curves of both sides). Metrics and figures are kept in git
(``cache: false``); the per-class scores and per-example predictions of the base side come
from the DVC cache.

A fair diff compares two runs made on one machine: .ci/model-diff reproduces the base
branch beside this one and passes its commit here. Run: ``python -m pipeline compare --base main``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.common import (
    FIGURES_DIR,
    METRICS_DIR,
    PREDICTIONS_FILE,
    PREPARED_DIR,
    atomic_path,
    read_json,
    write_text,
)
from pipeline.core.entry import run_tool
from pipeline.core.errors import StageError
from pipeline.core.metrics import exact_mcnemar, mcnemar_verdict, only_right, p_text, probe_comparison_note

COMPARE_FILE = Path("reports/compare.md")
COMPARE_DIR = Path("reports/compare")
MARKER = "<!-- dvc-transfer-learning: model diff -->"
KEY_METRICS = {
    (METRICS_DIR / "test.json").as_posix(): {
        "finetuned.accuracy": "fine-tuned accuracy",
        "finetuned.macro_f1": "fine-tuned macro-F1",
        "linear_probe.accuracy": "linear-probe accuracy",
        "linear_probe.macro_f1": "linear-probe macro-F1",
    },
    (METRICS_DIR / "baseline.json").as_posix(): {
        "random_init_probe.accuracy": "random-init probe accuracy",
        "random_init_probe.macro_f1": "random-init probe macro-F1",
    },
}
RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run", re.MULTILINE)
FIGURES = {"confusion_matrices.png": "Confusion matrices (test)", "training_curves.png": "Training curves"}


def dvc_json(*args: str) -> dict[str, Any]:
    """Run a dvc command with --json and return what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args, "--json"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise StageError(f"dvc {' '.join(args)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def git_show(base: str, path: Path) -> bytes | None:
    """A file's content at ``base``, or None where it did not exist."""
    result = subprocess.run(["git", "show", f"{base}:{path.as_posix()}"], capture_output=True, check=False)
    return result.stdout if result.returncode == 0 else None


def check_revision(base: str) -> None:
    result = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], check=False)
    if result.returncode != 0:
        raise StageError(
            f"--base: {base!r} is not a commit here; fetch it first "
            "(in CI: actions/checkout with fetch-depth: 0)"
        )


def signed(delta: float | None, percent: bool) -> str:
    if delta is None:
        return "—"
    return f"{delta * 100:+.2f} pp" if percent else f"{delta:+.4f}"


def value(number: float | None, percent: bool) -> str:
    if number is None:
        return "—"
    return f"{number:.2%}" if percent else f"{number:.4f}"


def params_section(changes: dict[str, Any], base: str) -> str:
    rows = [
        (key, change.get("old"), change.get("new"))
        for file in changes.values()
        for key, change in file.items()
    ]
    if not rows:
        return f"No params changed against `{base}`."
    lines = [f"| param | `{base}` | this branch |", "|---|---|---|"]
    lines += [f"| `{key}` | `{old}` | `{new}` |" for key, old, new in sorted(rows)]
    return "\n".join(lines)


def metrics_rows(diff: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, old, new, delta) of the key test metrics."""
    rows = []
    for file, metrics in KEY_METRICS.items():
        for key, label in metrics.items():
            entry = diff.get(file, {}).get(key, {})
            old, new = entry.get("old"), entry.get("new")
            delta = new - old if old is not None and new is not None else None
            rows.append((label, old, new, delta))
    return rows


def stages_section(log: str | None) -> str:
    """Which stages ``dvc repro`` ran and which it restored from the run-cache."""
    if log is None:
        return "No `dvc repro` output given (`--repro-log`)."
    ran, restored = RAN.findall(log), RESTORED.findall(log)
    lines = [f"Reran: {', '.join(f'`{name}`' for name in ran) or 'none'}."]
    if restored:
        lines.append(f"Restored from the run-cache: {', '.join(f'`{name}`' for name in restored)}.")
    lines.append("Every other stage matched the base run and was reused as it was.")
    return " ".join(lines)


def from_dvc_cache(path: Path, rev: str) -> str | None:
    """A DVC-tracked file's text at ``rev``, from the DVC cache (None where it is absent at
    that revision or its data is not in this cache)."""
    import dvc.api

    try:
        return dvc.api.read(path.as_posix(), rev=rev, repo=".")
    except Exception:  # absent at that revision, or its data not in this cache
        return None


def base_per_class(rev: str) -> dict | None:
    """The base side's per-class scores, from the DVC cache (None where it lacks them)."""
    text = from_dvc_cache(METRICS_DIR / "per_class.json", rev)
    return json.loads(text) if text is not None else None


def prediction_rows(text: str | None) -> list[dict[str, str]] | None:
    """The rows of a test_predictions.csv (index, source, actual, predicted, ...)."""
    return list(csv.DictReader(io.StringIO(text))) if text is not None else None


def prepared_md5(lock_text: str | bytes | None) -> str | None:
    """The hash dvc.lock records for the prepare stage's data/prepared: one split of the
    data, the same examples in the same order, wherever it is equal."""
    if not lock_text:
        return None
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    outs = stages.get("prepare", {}).get("outs", [])
    return next((out.get("md5") for out in outs if out.get("path") == PREPARED_DIR.as_posix()), None)


def same_test_examples(old: list[dict[str, str]], new: list[dict[str, str]], same_prepared: bool) -> bool:
    """Whether both sides scored the same test examples, in the same order: the same
    (index, source, label) rows, and either a source for each (image files, text lines) or
    the same prepared data (digits and CIFAR are held in memory, with no source)."""

    def examples(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
        return [(row["index"], row["source"], row["actual"]) for row in rows]

    if examples(old) != examples(new):
        return False
    return same_prepared or all(row["source"] for row in new)


def examples_section(
    old: list[dict[str, str]] | None, new: list[dict[str, str]], same_prepared: bool, base: str
) -> str:
    """Whether the fine-tuned model's accuracy change is more than chance: the test examples
    it newly gets right and newly gets wrong against the base's, and the exact McNemar test
    on them. An accuracy delta alone cannot say whether a point is real on a small split."""
    if old is None:
        return (
            f"No per-example predictions of `{base}` in this DVC cache ({PREDICTIONS_FILE.as_posix()}), "
            "so the two fine-tuned models are not compared example by example."
        )
    if not same_test_examples(old, new, same_prepared):
        return (
            f"`{base}` scored other test examples (the data or its split changed), so the two fine-tuned "
            "models are not compared example by example: the accuracy change mixes the model with the data."
        )
    actual = [row["actual"] for row in new]  # the same on both sides (same_test_examples)
    fixed, broken = only_right(actual, [row["predicted"] for row in new], [row["predicted"] for row in old])
    if not fixed + broken:
        return f"This branch's fine-tuned model gets the same {len(new):,} test examples right as `{base}`'s."
    p_value = exact_mcnemar(fixed, broken)
    verdict = f"this branch's model is {'better' if fixed > broken else 'worse'} on this test split"
    return (
        f"Of the {len(new):,} test examples, this branch's fine-tuned model gets {fixed} right that "
        f"`{base}`'s got wrong, and {broken} wrong that it got right. Exact McNemar test on those "
        f"{fixed + broken}: {p_text(p_value)}, " + mcnemar_verdict(p_value, verdict, "examples")
    )


def probe_section(old: dict[str, Any] | None, new: dict[str, Any], base: str) -> str:
    """Whether each side's fine-tuned model beats its own linear probe on test (evaluate's
    ``finetuned_vs_probe``): the examples only one of the two gets right, the exact McNemar
    p-value, and what it says of this branch. The metric deltas above cannot: a branch can
    raise fine-tuned accuracy by a point and still not tell the fine-tuned model from the probe."""
    old = (old or {}).get("finetuned_vs_probe") or {}
    lines = [f"| fine-tuned model vs linear probe, test | `{base}` | this branch |", "|---|---:|---:|"]
    for label, key in (
        ("only the fine-tuned model right", "only_finetuned_right"),
        ("only the linear probe right", "only_probe_right"),
    ):
        lines.append(f"| {label} | {old.get(key, '—')} | {new[key]} |")
    old_p = p_text(old["p_value"]) if "p_value" in old else "—"
    lines.append(f"| exact McNemar test | {old_p} | {p_text(new['p_value'])} |")
    note = probe_comparison_note(new, "examples")
    return "\n".join(lines) + f"\n\nOn this branch, {note[0].lower()}{note[1:]}"


def metrics_section(rows: list, base: str) -> str:
    lines = [f"| test metric | `{base}` | this branch | change |", "|---|---:|---:|---:|"]
    for label, old, new, delta in rows:
        percent = label.endswith("accuracy")
        lines.append(
            f"| {label} | {value(old, percent)} | {value(new, percent)} | {signed(delta, percent)} |"
        )
    return "\n".join(lines)


def f1_movers(old: dict | None, new: dict, model: str, top: int = 5) -> str:
    """The classes whose test F1 changed most, for one model."""
    if old is None:
        return "No per-class metrics on the base side."
    moves = []
    for name, scores in new[model]["per_class"].items():
        before = old.get(model, {}).get("per_class", {}).get(name)
        if before is not None and before["f1"] != scores["f1"]:
            moves.append((abs(scores["f1"] - before["f1"]), name, before["f1"], scores["f1"]))
    if not moves:
        return "No class's F1 changed."
    lines = ["| class | base F1 | this branch F1 | change |", "|---|---:|---:|---:|"]
    for _, name, before, after in sorted(moves, key=lambda move: (-move[0], move[1]))[:top]:
        lines.append(f"| {name} | {before:.3f} | {after:.3f} | {after - before:+.3f} |")
    return "\n".join(lines)


def figures_section(rev: str, base: str, out_dir: Path) -> str:
    """Copy both sides' figures next to the markdown; return their side-by-side tables."""
    sections = []
    for name, title in FIGURES.items():
        cells = []
        for side, content in (("base", git_show(rev, FIGURES_DIR / name)), ("head", None)):
            path = out_dir / f"{side}_{name}"
            if side == "head" and (FIGURES_DIR / name).is_file():
                shutil.copyfile(FIGURES_DIR / name, path)
            elif content is not None:
                path.write_bytes(content)
            cells.append(f"![{side}]({COMPARE_DIR.name}/{path.name})" if path.is_file() else "—")
        sections.append(f"### {title}\n\n| `{base}` | this branch |\n|---|---|\n| {cells[0]} | {cells[1]} |")
    return "\n\n".join(sections)


def render(rev: str, out_dir: Path, base: str | None = None, repro_log: str | None = None) -> str:
    """The markdown diff of the workspace against the commit ``rev``, called ``base`` in it."""
    base = base or rev
    params = dvc_json("params", "diff", rev)
    rows = metrics_rows(dvc_json("metrics", "diff", rev, "--all"))
    old_details = base_per_class(rev)
    new_details = read_json(METRICS_DIR / "per_class.json")
    same_prepared = prepared_md5(git_show(rev, Path("dvc.lock"))) == prepared_md5(
        Path("dvc.lock").read_text() if Path("dvc.lock").is_file() else None
    )
    examples = examples_section(
        prediction_rows(from_dvc_cache(PREDICTIONS_FILE, rev)),
        prediction_rows(PREDICTIONS_FILE.read_text()),
        same_prepared,
        base,
    )
    probe = probe_section(
        json.loads(git_show(rev, METRICS_DIR / "test.json") or "null"),
        read_json(METRICS_DIR / "test.json")["finetuned_vs_probe"],
        base,
    )
    unchanged = not any(file for file in params.values()) and all(delta == 0 for *_, delta in rows)
    headline = (
        f"**No change**: the params and the test metrics are the same as on `{base}`."
        if unchanged
        else f"What this branch does to the model, against `{base}`."
    )
    return f"""{MARKER}
## Model diff

{headline}

### Stages

{stages_section(repro_log)}

### Params

{params_section(params, base)}

### Test metrics

{metrics_section(rows, base)}

### Fine-tuned model, example by example

{examples}

### Fine-tuned model against the linear probe

{probe}

### Classes whose F1 moved most

Fine-tuned:

{f1_movers(old_details, new_details, "finetuned")}

Linear probe:

{f1_movers(old_details, new_details, "linear_probe")}

{figures_section(rev, base, out_dir)}
"""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline compare",
        description="Markdown diff of params, metrics and figures against a git revision.",
    )
    parser.add_argument("--base", default="main", help="git revision to compare with (default: main)")
    parser.add_argument(
        "--base-name",
        help="what to call the base in the markdown (default: --base), e.g. the branch "
        "whose reproduced run --base is",
    )
    parser.add_argument(
        "--repro-log", type=Path, help="the output of this side's `dvc repro`, to list the stages that reran"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check_revision(args.base)
    log = args.repro_log.read_text() if args.repro_log else None
    with atomic_path(COMPARE_DIR) as tmp:
        tmp.mkdir()
        markdown = render(args.base, tmp, args.base_name, log)
    write_text(COMPARE_FILE, markdown)
    print(f"compare: {COMPARE_FILE} (against {args.base})")


if __name__ == "__main__":
    run_tool(main)
