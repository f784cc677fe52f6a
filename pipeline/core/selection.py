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
