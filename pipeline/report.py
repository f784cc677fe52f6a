"""Stage 7, report: reports/report.md with figures, for reading on GitHub.

Reads every params section (the report lists the params used), data/features/summary.json
(each split's size; texts truncated), data/prepared/ (the test
examples with the highest loss, which the modality shows: a figure of images, image files
under data/raw/; a table of texts), the metrics under metrics/
(metrics/test_predictions.csv for those examples), the per-epoch dvclive logs under
reports/live/ and models/backbone.pt (for its hash); writes reports/report.md and
reports/figures/*.png.
Run: ``python -m pipeline.report``.
"""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from pipeline import modalities
from pipeline.core.common import (
    BACKBONE_FILE,
    FEATURES_SUMMARY,
    FIGURES_DIR,
    LIVE_DIR,
    METRICS_DIR,
    ONNX_FILE,
    PREDICTIONS_FILE,
    PREPARED_DIR,
    REPORT_FILE,
    STAGE_TIMES_DIR,
    atomic_path,
    file_sha256,
    read_json,
    write_text,
)
from pipeline.core.entry import recorded_stage_times, run_stage
from pipeline.core.epoch_log import read_epoch_log
from pipeline.core.errors import StageError
from pipeline.core.metrics import highest_losses, most_confused_pairs, probe_comparison_note
from pipeline.core.selection import kept_note
from pipeline.modalities import load_params

if TYPE_CHECKING:
    from pipeline.modalities.contract import Modality

MISTAKES_SHOWN = 16  # test examples with the highest loss the report shows
LABELS = {"linear_probe": "Linear probe", "finetuned": "Fine-tuned", "random_init_probe": "Random-init probe"}


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


def reliability_figure(details: dict[str, Any]) -> str:
    """Accuracy per confidence bin, for both models, against the bin's mean confidence and
    the diagonal: a bar below its marker is an overconfident bin, above it underconfident."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, name in zip(axes, ("linear_probe", "finetuned"), strict=True):
        reliability = details[name]["calibration"]
        filled = [row for row in reliability["bins"] if row["count"]]
        ax.bar(
            [row["lower"] for row in filled],
            [row["accuracy"] for row in filled],
            width=[row["upper"] - row["lower"] for row in filled],
            align="edge",
            edgecolor="black",
            label="accuracy of the bin",
        )
        centres = [(row["lower"] + row["upper"]) / 2 for row in filled]
        ax.plot(centres, [row["confidence"] for row in filled], "o", color="tab:red", label="mean confidence")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (predicted class's probability)")
        ax.set_title(f"{LABELS[name]}: ECE {reliability['ece']:.4f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    return save_figure(fig, "reliability.png")


def read_predictions() -> list[dict[str, str]]:
    if not PREDICTIONS_FILE.is_file():
        raise StageError(f"{PREDICTIONS_FILE}: not found; run the evaluate stage first (dvc repro)")
    with open(PREDICTIONS_FILE, newline="") as file:
        return list(csv.DictReader(file))


def highest_loss_rows(rows: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """The ``count`` test predictions with the highest loss, highest first."""
    return [rows[i] for i in highest_losses([float(row["loss"]) for row in rows], count)]


def confused_pairs_table(details: dict[str, Any]) -> str:
    pairs = most_confused_pairs(details["finetuned"]["confusion_matrix"], details["classes"])
    if not pairs:
        return "The fine-tuned model confused no two classes on the test split."
    rows = ["| classes | mistakes between them | true class taken for the other |", "|---|---:|---|"]
    for pair in pairs:
        a, b = pair["a"], pair["b"]
        ways = f"{a} as {b}: {pair['a_as_b']}; {b} as {a}: {pair['b_as_a']}"
        rows.append(f"| {a} and {b} | {pair['total']} | {ways} |")
    return "\n".join(rows)


def splits_note(summary: dict[str, dict[str, int]], items: str, max_length: int) -> str:
    """Each split's size, and how many texts were cut to ``max_length`` tokens."""
    sizes = ", ".join(f"{split} {counts['examples']:,}" for split, counts in summary.items())
    note = f" Splits: {sizes} {items}."
    if any("truncated" in counts for counts in summary.values()):
        cut = {split: counts["truncated"] for split, counts in summary.items()}
        each = ", ".join(f"{split} {count:,}" for split, count in cut.items())
        note += f" {sum(cut.values()):,} of them longer than {max_length} tokens, truncated ({each})."
    return note


def export_note(result: dict[str, Any], items: str) -> str:
    agreement = "agrees" if not result["top1_disagreements"] else "disagrees"
    return (
        f"`{ONNX_FILE}` (described by `{ONNX_FILE.with_suffix('.json')}`) {agreement} with PyTorch on "
        f"all {result['examples']} test {items}: largest |logit difference| "
        f"{result['max_abs_logit_difference']:.3g}, {result['top1_disagreements']} different top-1 "
        "classes. `python -m pipeline predict --onnx models/model.onnx PATH...` runs it."
    )


def summary_table(test: dict[str, Any], baseline: dict[str, Any]) -> str:
    rows = ["| model | test accuracy | test macro-F1 |", "|---|---:|---:|"]
    scored = {**baseline, **test}
    for name in ("random_init_probe", "linear_probe", "finetuned"):
        scores = scored[name]
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


def stage_times_table() -> str:
    """Each stage's wall time (metrics/time/), start-up apart, and its share of the run."""
    times = recorded_stage_times()
    if not times:
        return f"No stage recorded its time under `{STAGE_TIMES_DIR}/`."
    total = sum(timing["seconds"] for timing in times.values())
    rows = ["| stage | seconds | of which start-up | share of the run |", "|---|---:|---:|---:|"]
    for stage, timing in times.items():
        seconds, startup = timing["seconds"], timing["startup_seconds"]
        rows.append(f"| {stage} | {seconds:.1f} | {startup:.1f} | {seconds / total:.0%} |")
    startup = sum(timing["startup_seconds"] for timing in times.values())
    rows.append(f"| the run, all but the report | {total:.1f} | {startup:.1f} | 100% |")
    return "\n".join(rows)


def recipe_note(finetune: dict[str, Any]) -> str:
    """The recipe finetune used, ``auto`` resolved (its metrics record it)."""
    if "augment" not in finetune:
        return ""
    note = f", augmentation {finetune['augment']}, BatchNorm {finetune['bn']}, mixing {finetune['mix']}"
    if "steps" in finetune:
        note += f", {finetune['steps']} optimizer steps ({finetune['schedule']})"
    if finetune.get("ema_epochs"):
        note += f", weights averaged over {finetune['ema_epochs']:g} epochs (EMA)"
    elif "ema_epochs" in finetune:
        note += ", no weight average"
    if finetune.get("interpolate", 1) < 1:
        note += f", then {finetune['interpolate']:g} of the way from the starting model (WiSE-FT)"
    return note


def determinism_note(finetune: dict) -> str:
    """What a rerun gives, by params ``deterministic`` (recorded in finetune's metrics)."""
    if finetune.get("deterministic", True):
        return "a CPU run is bit-exact from run to run, a GPU run uses torch's deterministic kernels"
    return "deterministic: false, so on a GPU cuDNN picked its fastest kernels; a rerun may differ a little"


def run_notes(modality: Modality, config: dict[str, Any], backbone: dict[str, Any]) -> str:
    """What the report says after its first line: the inputs (and texts truncated), the
    pretraining, the processes and device each training ran on, what fine-tuning trained and
    kept, what prepare skipped."""
    skipped = read_json(PREPARED_DIR / "skipped.json")
    skipped_note = (
        f"\n\n**{len(skipped)} {modality.SKIPPED}**, listed in `{PREPARED_DIR}/skipped.json`."
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
            + (f" on {run['device']}" if "device" in run else "")
            for what, run in runs
        )
        + f" (results depend on the world size and the device: {determinism_note(finetune)})."
    )
    trained = (
        f" Fine-tuning (strategy {finetune['strategy']}{recipe_note(finetune)}) trained "
        f"{finetune['trainable_params']:,} parameters; {kept_note(finetune)}."
    )
    inputs = splits_note(read_json(FEATURES_SUMMARY), modality.ITEMS, config["max_length"])
    return inputs + pretrain + processes + trained + skipped_note


def run_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params a run's stages read: all but ``launch``, which says where jobs run (Slurm),
    not what they compute, and which no stage declares."""
    return {section: values for section, values in params.items() if section != "launch"}


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
    modality = modalities.get(params["data"]["modality"])
    predictions = read_predictions()
    worst = highest_loss_rows(predictions, MISTAKES_SHOWN)
    worst_view = modality.mistakes_view(worst, PREPARED_DIR, save_figure)
    reliability = reliability_figure(details)
    mistakes = sum(row["actual"] != row["predicted"] for row in predictions)
    config = params["backbone"]
    notes = run_notes(modality, config, backbone)
    return f"""# Transfer-learning report

Dataset **{params["data"]["dataset"]}**, backbone **{config["arch"]}** with weights
**{config["weights"]}** ({backbone["parameters"]:,} parameters) {modality.describe(config)}.{notes}

## Test results

{summary_table(test, baseline)}

{probe_comparison_note(test["finetuned_vs_probe"], modality.ITEMS)}

The random-init probe trains the same head on features of the same architecture left at
random init: what the pretrained features add is the gap to the linear probe.

## Training curves

![training curves]({curves})

## Confusion matrices

![confusion matrices]({confusion})

## Per class

![per-class F1]({per_class})

{per_class_table(details)}

## What the fine-tuned model gets wrong

{mistakes} of {len(predictions)} test {modality.ITEMS} are misclassified. The classes most confused
with each other:

{confused_pairs_table(details)}

{worst_view}

Every test example's prediction, its probability and its loss: `{PREDICTIONS_FILE}`.

## Calibration

Expected calibration error over 15 confidence bins: fine-tuned
{test["finetuned"]["ece"]:.4f}, linear probe {test["linear_probe"]["ece"]:.4f} (0 is perfectly
calibrated: among predictions made with 80% confidence, 80% are right).

![reliability diagrams]({reliability})

## Export

{export_note(read_json(METRICS_DIR / "export.json"), modality.ITEMS)}

## Where the time went

Each stage's wall time as it ran (a stage DVC restored from its run-cache shows the run that
computed it); start-up is the imports before the stage's work.

{stage_times_table()}

## Reproducibility

Backbone file `{BACKBONE_FILE}` sha256 `{backbone_hash}`.

Params used:

```yaml
{yaml.safe_dump(run_params(params), sort_keys=False).rstrip()}
```
"""


def main() -> None:
    params = load_params(check_models=False)  # builds no model; the stages that do check them
    write_text(REPORT_FILE, render_report(params, file_sha256(BACKBONE_FILE)))
    print(f"report: {REPORT_FILE}")


if __name__ == "__main__":
    # Untimed: the report reruns on every revisit (outside the run-cache, dvc.yaml says why),
    # and a new time each rerun would leave git a changed file where nothing else changed.
    run_stage(main, "report", timed=False)
