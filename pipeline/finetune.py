"""Stage 5, finetune: unfreeze the backbone and train it with the linear-probe head.

Starts from the trained head (linear probe, then fine-tune), not a fresh one. Reads params
``seed``, ``lr`` (the head's learning rate; ``dvc exp run -S lr=1e-4``), ``device``, ``amp``,
``class_weighted_loss``, ``data.num_workers`` and ``finetune.*``; reads data/prepared/ (and
the image files it lists), models/backbone.pt and models/head.pt; writes
models/finetuned.pt (best on val) and, through dvclive, reports/live/finetune/ (per-epoch
losses, accuracies and the learning rates the schedule used; metrics.json with the latest
and the best epoch, live while the stage runs).
Run: ``python -m pipeline.finetune``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.common import (
    BACKBONE_FILE,
    FINETUNED_FILE,
    HEAD_FILE,
    LIVE_DIR,
    PREPARED_DIR,
    load_torch,
    resolve_device,
    run_stage,
    save_torch,
    seed_everything,
)
from pipeline.data import checkpoint_transform, loader_workers, split_dataset
from pipeline.models import Classifier, load_backbone, load_head, unfreeze_last_blocks
from pipeline.params import load_params
from pipeline.training import (
    EpochCallback,
    EpochLog,
    balanced_class_weights,
    best_val_accuracy,
    fit,
    make_loader,
    warmup_cosine,
)


def finetune(
    model: Classifier,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    device: torch.device,
    lr: float,
    epochs: int,
    unfreeze: str | int,
    backbone_lr_ratio: float,
    warmup_epochs: int,
    weight_decay: float,
    label_smoothing: float,
    amp: str,
    class_weight: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train the unfrozen part of the model; returns the best-on-val weights and the history.

    The head learns at ``lr`` and the backbone at ``lr * backbone_lr_ratio``, with linear
    warmup then cosine decay per batch; the history records the rates the schedule gave
    each epoch's last step. Best means highest val accuracy, then lowest val loss.
    """
    frozen = unfreeze_last_blocks(model.backbone, unfreeze)
    model.to(device, memory_format=torch.channels_last)
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr * backbone_lr_ratio},
        {"params": list(model.head.parameters()), "lr": lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_epochs * len(train_loader), epochs * len(train_loader))
    weight = class_weight.to(device) if class_weight is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    return fit(
        model,
        train_loader,
        val_loader,
        loss_fn,
        optimizer,
        epochs,
        device,
        select=best_val_accuracy,
        scheduler=scheduler,
        amp=amp,
        frozen=frozen,
        rate_names=("lr_backbone", "lr_head"),
        on_epoch=on_epoch,
    )


def main() -> None:
    params = load_params()
    config, lr, seed = params["finetune"], params["lr"], params["seed"]
    seed_everything(seed)
    device = resolve_device(params["device"])
    backbone_checkpoint, head_checkpoint = load_torch(BACKBONE_FILE), load_torch(HEAD_FILE)
    model = Classifier(load_backbone(backbone_checkpoint), load_head(head_checkpoint))
    train = split_dataset(PREPARED_DIR, "train", checkpoint_transform(backbone_checkpoint, config["augment"]))
    val = split_dataset(PREPARED_DIR, "val", checkpoint_transform(backbone_checkpoint))
    workers = loader_workers(train, params["data"]["num_workers"])
    train_loader = make_loader(
        train, config["batch_size"], device, shuffle=True, seed=seed, num_workers=workers
    )
    val_loader = make_loader(val, config["batch_size"], device, num_workers=workers)
    class_weight = None
    if params["class_weighted_loss"]:
        class_weight = balanced_class_weights(train.labels, len(head_checkpoint["classes"]))
    log = EpochLog(LIVE_DIR / "finetune", "finetune")

    def on_epoch(record: dict[str, float]) -> None:
        log(record)
        print(
            f"finetune epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
            f"val accuracy {record['val_accuracy']:.4f}"
        )

    best_state, history = finetune(
        model,
        train_loader,
        val_loader,
        device,
        lr=lr,
        epochs=config["epochs"],
        unfreeze=config["unfreeze"],
        backbone_lr_ratio=config["backbone_lr_ratio"],
        warmup_epochs=config["warmup_epochs"],
        weight_decay=config["weight_decay"],
        label_smoothing=config["label_smoothing"],
        amp=params["amp"],
        class_weight=class_weight,
        on_epoch=on_epoch,
    )
    best = best_val_accuracy(history)
    head_config = {k: v for k, v in head_checkpoint.items() if k != "state_dict"}
    save_torch(
        FINETUNED_FILE,
        {
            **{
                k: backbone_checkpoint[k]
                for k in ("arch", "weights", "image_size", "resize_size", "mean", "std")
            },
            "classes": head_checkpoint["classes"],
            "head": head_config,
            "params": {"lr": lr, "seed": seed, "amp": params["amp"], **config},
            "state_dict": best_state,
        },
    )
    log.close(best)
    print(f"finetune: best val accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}")


if __name__ == "__main__":
    run_stage(main)
