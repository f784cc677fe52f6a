"""Stage 7, report: reports/report.md with figures, for reading on GitHub.

Reads every params section (the report lists the params used), data/prepared/skipped.json,
the metrics under metrics/, the per-epoch dvclive logs under reports/live/ and
models/backbone.pt (for its hash); writes reports/report.md and reports/figures/*.png.
Run: ``python -m pipeline.report``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from pipeline.common import (
    BACKBONE_FILE,
    FIGURES_DIR,
    LIVE_DIR,
    METRICS_DIR,
    PREPARED_DIR,
    REPORT_FILE,
    atomic_path,
    read_epoch_log,
    read_json,
    run_stage,
    write_text,
)
from pipeline.params import load_params

LABELS = {"linear_probe": "Linear probe", "finetuned": "Fine-tuned", "random_init_probe": "Random-init probe"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_figure(fig: plt.Figure, name: str) -> str:
    """Save atomically under reports/figures/; return the path relative to the report."""
    with atomic_path(FIGURES_DIR / name) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}"


def training_curves_figure(histories: dict[str, dict[str, np.ndarray]]) -> str:
    """Loss, accuracy and the learning rates used, per epoch, for each training stage."""
    fig, axes = plt.subplots(3, len(histories), figsize=(5 * len(histories), 9), sharex="col", squeeze=False)
    for column, (stage, history) in enumerate(histories.items()):
        for row, metric in enumerate(("loss", "accuracy")):
            ax = axes[row, column]
            for split in ("train", "val"):
                ax.plot(history["epoch"], history[f"{split}_{metric}"], marker="o", ms=3, label=split)
            ax.set_title(f"{stage}: {metric}")
        ax = axes[2, column]
        for name in sorted(key for key in history if key.startswith("lr")):
            ax.plot(history["epoch"], history[name], marker="o", ms=3, label=name.replace("_", " "))
        ax.set_title(f"{stage}: learning rate (last step of each epoch)")
        ax.set_xlabel("epoch")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            ax.legend()
    return save_figure(fig, "training_curves.png")


def confusion_figure(details: dict[str, Any]) -> str:
    classes = details["classes"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, name in zip(axes, ("linear_probe", "finetuned"), strict=True):
        matrix = np.array(details[name]["confusion_matrix"])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                color = "white" if count > matrix.max() / 2 else "black"
                ax.text(j, i, count, ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{LABELS[name]} (test)")
    return save_figure(fig, "confusion_matrices.png")


def per_class_figure(details: dict[str, Any]) -> str:
    classes = details["classes"]
    positions = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(max(6, len(classes) * 0.6), 4))
    for offset, name in ((-0.2, "linear_probe"), (0.2, "finetuned")):
        scores = [details[name]["per_class"][c]["f1"] for c in classes]
        ax.bar(positions + offset, scores, width=0.4, label=LABELS[name])
    ax.set_xticks(positions, classes)
    ax.set_ylabel("test F1")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title("Per-class F1: linear probe vs fine-tuned")
    return save_figure(fig, "per_class_f1.png")


def summary_table(test: dict[str, Any], baseline: dict[str, Any]) -> str:
    rows = ["| model | test accuracy | test macro-F1 |", "|---|---:|---:|"]
    for name, scores in {**baseline, **test}.items():
        rows.append(f"| {LABELS[name]} | {scores['accuracy']:.2%} | {scores['macro_f1']:.4f} |")
    return "\n".join(rows)


def per_class_table(details: dict[str, Any]) -> str:
    rows = [
        "| class | support | probe precision | probe recall | probe F1 "
        "| fine-tuned precision | fine-tuned recall | fine-tuned F1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in details["classes"]:
        probe, tuned = details["linear_probe"]["per_class"][name], details["finetuned"]["per_class"][name]
        cells = [f"{m[k]:.3f}" for m in (probe, tuned) for k in ("precision", "recall", "f1")]
        rows.append(f"| {name} | {probe['support']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def render_report(params: dict[str, Any], backbone_hash: str) -> str:
    test, details = read_json(METRICS_DIR / "test.json"), read_json(METRICS_DIR / "per_class.json")
    baseline = read_json(METRICS_DIR / "baseline.json")
    backbone = read_json(METRICS_DIR / "backbone.json")
    histories = {stage: read_epoch_log(LIVE_DIR / stage, stage) for stage in ("head", "finetune")}
    curves, confusion, per_class = (
        training_curves_figure(histories),
        confusion_figure(details),
        per_class_figure(details),
    )
    config = params["backbone"]
    skipped = read_json(PREPARED_DIR / "skipped.json")
    skipped_note = (
        f"\n\n**{len(skipped)} unreadable image file(s) skipped** (`data.skip_bad_images: true`), "
        f"listed in `{PREPARED_DIR}/skipped.json`."
        if skipped
        else ""
    )
    pretrain = (
        f" Source-task accuracy after pretraining: {backbone['pretrain_accuracy']:.2%}."
        if "pretrain_accuracy" in backbone
        else ""
    )
    finetune = read_json(LIVE_DIR / "finetune" / "metrics.json")["finetune"]
    runs = [("Fine-tuned", finetune)] + ([("pretrained", backbone)] if "world_size" in backbone else [])
    processes = (
        " "
        + ", ".join(
            f"{what} in {run['world_size']} process{'es' if run['world_size'] > 1 else ''} ({run['backend']})"
            for what, run in runs
        )
        + " (results depend on the world size)."
    )
    trained = (
        f" Fine-tuning (strategy {finetune['strategy']}) trained {finetune['trainable_params']:,} parameters."
    )
    notes = pretrain + processes + trained + skipped_note
    return f"""# Transfer-learning report

Dataset **{params["data"]["dataset"]}**, backbone **{config["arch"]}** with weights
**{config["weights"]}** ({backbone["parameters"]:,} parameters) at {config["image_size"]} px.{notes}

## Test results

{summary_table(test, baseline)}

The random-init probe trains the same head on features of the same architecture left at
random init: what the pretrained features add is the gap to the linear probe.

## Training curves

![training curves]({curves})

## Confusion matrices

![confusion matrices]({confusion})

## Per class

![per-class F1]({per_class})

{per_class_table(details)}

## Reproducibility

Backbone file `{BACKBONE_FILE}` sha256 `{backbone_hash}`.

Params used:

```yaml
{yaml.safe_dump(params, sort_keys=False).rstrip()}
```
"""


def main() -> None:
    params = load_params(check_models=False)  # builds no model; the stages that do check them
    write_text(REPORT_FILE, render_report(params, sha256(BACKBONE_FILE)))
    print(f"report: {REPORT_FILE}")


if __name__ == "__main__":
    run_stage(main)
