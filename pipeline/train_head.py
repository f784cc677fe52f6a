"""Stage 4, train_head: the linear probe, trained on the cached features only.

Reads params ``seed``, ``class_weighted_loss`` and ``head.*``; reads data/features/; writes
models/head.pt and, through dvclive, reports/live/head/ (per-epoch losses, accuracies and
learning rate; metrics.json with the latest and the best epoch).
No backbone forward pass happens here, so head experiments take seconds.
Run: ``python -m pipeline.train_head``.
"""

from __future__ import annotations

from pipeline.core.checkpoints import head_checkpoint, read_features
from pipeline.core.common import HEAD_FILE, LIVE_DIR, save_torch, seed_everything
from pipeline.core.entry import run_stage
from pipeline.core.epoch_log import EpochLog
from pipeline.core.params import load_params
from pipeline.core.training import fit_new_head


def main() -> None:
    params = load_params()
    config, seed = params["head"], params["seed"]
    seed_everything(seed)
    train, val = read_features("train"), read_features("val")
    log = EpochLog(LIVE_DIR / "head", "head")
    head, fitted = fit_new_head(
        (train["features"], train["labels"]),
        (val["features"], val["labels"]),
        len(train["classes"]),
        config,
        seed,
        class_weighted=params["class_weighted_loss"],
        on_epoch=log,
    )
    in_features = train["features"].shape[1]
    checkpoint = head_checkpoint(head.state_dict(), config, in_features, train["classes"])
    save_torch(HEAD_FILE, checkpoint)
    log.close(fitted.kept)
    best, epochs = fitted.kept, len(fitted.history)
    print(f"train_head: val accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}/{epochs}")


if __name__ == "__main__":
    run_stage(main, "train_head")
