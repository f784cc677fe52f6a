"""Which epoch a training run keeps: the per-epoch records and the selection rules
(``finetune.select``, the head's early stopping)."""

from __future__ import annotations

import math
from collections.abc import Callable

Selection = Callable[[list[dict[str, float]]], dict[str, float]]


def epoch_record(
    epoch: int, train: dict[str, float], val: dict[str, float], rates: dict[str, float]
) -> dict[str, float]:
    """One row of a training log: losses and accuracies, and the learning rates used."""
    return {
        "epoch": epoch,
        "train_loss": round(train["loss"], 6),
        "train_accuracy": round(train["accuracy"], 6),
        "val_loss": round(val["loss"], 6),
        "val_accuracy": round(val["accuracy"], 6),
        **rates,
    }


def start_record(val: dict[str, float]) -> dict[str, float]:
    """The history's epoch 0: the model before any training, on val."""
    return {"epoch": 0, "val_loss": round(val["loss"], 6), "val_accuracy": round(val["accuracy"], 6)}


def lowest_val_loss(history: list[dict[str, float]], min_delta: float = 1e-6) -> dict[str, float]:
    """The epoch with the lowest val loss (the head's rule, with early stopping): a later
    epoch wins only by more than ``min_delta``, so a loss creeping down by millionths ends
    training; a loss that is not finite never wins."""
    best = history[0]
    for record in history:
        loss = record["val_loss"]
        beats = not math.isfinite(best["val_loss"]) or loss < best["val_loss"] - min_delta
        if math.isfinite(loss) and beats:
            best = record
    return best


def best_val_accuracy(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the highest val accuracy, ties to the lower val loss, then to the
    earlier epoch; an epoch whose loss is not finite wins only if every one's is not."""

    def rank(record: dict[str, float]) -> tuple[bool, float, float]:
        finite = math.isfinite(record["val_loss"])
        return finite, record["val_accuracy"], -record["val_loss"] if finite else 0.0

    return max(history, key=rank)


def last_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The latest epoch (pretraining's rule: the schedule ends at its best)."""
    return history[-1]


SELECTIONS: dict[str, Selection] = {"loss": lowest_val_loss, "accuracy": best_val_accuracy}


def decided_by(start: dict[str, float], best: dict[str, float], select: str) -> str:
    """The val score that decided between the starting model and the kept epoch: the rule's,
    or, when ``accuracy`` found them equal, the val loss that broke the tie."""
    if select == "accuracy" and best["epoch"] != 0 and best["val_accuracy"] == start["val_accuracy"]:
        return "loss, at equal accuracy"
    return select


def blend_lost(
    history: list[dict[str, float]], best: dict[str, float], select: str, interpolate: float
) -> bool:
    """Whether finetune kept the starting model although an epoch beat it on val, because
    that epoch's blend with the start (``finetune.interpolate`` below 1) did not."""
    return interpolate < 1 and best["epoch"] == 0 and SELECTIONS[select](history)["epoch"] != 0


def selection_summary(
    history: list[dict[str, float]], best: dict[str, float], select: str, interpolate: float = 1.0
) -> dict[str, float | str | bool]:
    """What the finetune metrics say of the choice: the starting model's val scores (epoch 0),
    whether it or a fine-tuned epoch was kept, and on which val score; with
    ``finetune.interpolate`` below 1, whether the blend lost to the start on val."""
    start = history[0]
    summary = {
        "selected": "start" if best["epoch"] == 0 else "fine-tuned",
        "decided_by": decided_by(start, best, select),
        "start_val_loss": start["val_loss"],
        "start_val_accuracy": start["val_accuracy"],
    }
    if interpolate < 1:
        summary["blend_lost_on_val"] = blend_lost(history, best, select, interpolate)
    return summary


def kept_note(finetune: dict) -> str:
    """Which model finetune kept, the starting one or an epoch, on which val score, and their
    val scores, from finetune's metrics (``selection_summary``, the best epoch's scores and
    ``interpolate``): what finetune's last line and the report both say."""
    start = f"val loss {finetune['start_val_loss']:.4f}, accuracy {finetune['start_val_accuracy']:.2%}"
    if finetune.get("blend_lost_on_val"):
        return (
            "an epoch beat the starting model on val, but its blend with it "
            f"(finetune.interpolate {finetune['interpolate']:g}) did not, so the fine-tuned model is the "
            f"starting one, unchanged ({start})"
        )
    if finetune["selected"] == "start":
        return (
            f"no epoch beat the starting model on val {finetune['decided_by']}, so the fine-tuned "
            f"model is the starting one, unchanged ({start})"
        )
    return (
        f"it kept epoch {finetune['best_epoch']} (val loss {finetune['best_val_loss']:.4f}, accuracy "
        f"{finetune['best_val_accuracy']:.2%}), better than the starting model on val "
        f"{finetune['decided_by']} ({start})"
    )
