"""Stage 4, train_head: the linear probe, trained on the cached features only.

Reads params ``seed``, ``class_weighted_loss`` and ``head.*``; reads data/features/; writes
models/head.pt and, through dvclive, reports/live/head/ (per-epoch losses, accuracies and
learning rate; metrics.json with the latest and the best epoch).
No backbone forward pass happens here, so head experiments take seconds.
Run: ``python -m pipeline.train_head``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.common import FEATURES_DIR, HEAD_FILE, LIVE_DIR, load_torch, save_torch, seed_everything
from pipeline.entry import run_stage
from pipeline.epoch_log import EpochLog
from pipeline.params import load_params
from pipeline.training import fit_new_head, lowest_val_loss


def head_checkpoint(
    head: nn.Module, config: dict[str, Any], in_features: int, classes: list[str]
) -> dict[str, Any]:
    """What rebuilds the head: its shape (from params' ``head`` section), the class names and
    the weights."""
    return {
        "type": config["type"],
        "in_features": in_features,
        "hidden_units": config["hidden_units"],
        "dropout": config["dropout"],
        "classes": classes,
        "state_dict": head.state_dict(),
    }


def main() -> None:
    params = load_params()
    config, seed = params["head"], params["seed"]
    seed_everything(seed)
    train, val = load_torch(FEATURES_DIR / "train.pt"), load_torch(FEATURES_DIR / "val.pt")
    log = EpochLog(LIVE_DIR / "head", "head")
    head, history = fit_new_head(
        (train["features"], train["labels"]),
        (val["features"], val["labels"]),
        len(train["classes"]),
        config,
        seed,
        class_weighted=params["class_weighted_loss"],
        on_epoch=log,
    )
    best = lowest_val_loss(history)
    in_features = train["features"].shape[1]
    checkpoint = head_checkpoint(head, config, in_features, train["classes"])
    save_torch(HEAD_FILE, checkpoint)
    log.close(best)
    print(f"train_head: val accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}/{len(history)}")


if __name__ == "__main__":
    run_stage(main)
