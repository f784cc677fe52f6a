"""Compare this workspace's run with another git revision, as markdown for a pull request.

Not a stage: run it after ``dvc repro``, locally or in CI. It writes reports/compare.md
(params changed, test-metric deltas of the fine-tuned model, the linear probe and the
random-init probe, the classes whose F1 moved most, and, given ``dvc repro``'s output, the
stages that reran) and reports/compare/*.png (confusion matrices and training curves of
both sides). Metrics and figures are kept in git (``cache: false``); the per-class scores
of the base side come from the DVC cache.

A fair diff compares two runs made on one machine: .ci/model-diff reproduces the base
branch beside this one and passes its commit here. Run: ``python -m pipeline compare --base main``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.core.common import FIGURES_DIR, METRICS_DIR, atomic_path, read_json, write_text
from pipeline.core.entry import run_tool
from pipeline.core.errors import StageError

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


def base_per_class(rev: str) -> dict | None:
    """The base side's per-class scores, from the DVC cache (None where it lacks them)."""
    import dvc.api

    try:
        return json.loads(dvc.api.read((METRICS_DIR / "per_class.json").as_posix(), rev=rev, repo="."))
    except Exception:  # absent at that revision, or its data not in this cache
        return None


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

### Classes whose F1 moved most

Fine-tuned:

{f1_movers(old_details, new_details, "finetuned")}

Linear probe:

{f1_movers(old_details, new_details, "linear_probe")}

{figures_section(rev, base, out_dir)}
"""


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    check_revision(args.base)
    log = args.repro_log.read_text() if args.repro_log else None
    with atomic_path(COMPARE_DIR) as tmp:
        tmp.mkdir()
        markdown = render(args.base, tmp, args.base_name, log)
    write_text(COMPARE_FILE, markdown)
    print(f"compare: {COMPARE_FILE} (against {args.base})")


if __name__ == "__main__":
    run_tool(main)
