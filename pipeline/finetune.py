"""Stage 5, finetune: unfreeze the backbone and train it with the linear-probe head.

Starts from the trained head (linear probe, then fine-tune), not a fresh one. Reads params
``seed``, ``lr`` (the head's learning rate; ``dvc exp run -S lr=1e-4``), ``device``,
``class_weighted_loss``, ``data.num_workers`` and ``finetune.*``; reads data/prepared/ (and
the image files it lists), models/backbone.pt and models/head.pt; writes
models/finetuned.pt (best on val) and, through dvclive, reports/live/finetune/ (per-epoch
losses, accuracies and the learning rates the schedule used; metrics.json with the latest
and the best epoch, live while the stage runs).
Run: ``python -m pipeline.finetune``.
"""

from __future__ import annotations

from typing import Any

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
    epoch_record,
    evaluate_epoch,
    grad_scaler,
    make_loader,
    train_epoch,
    warmup_cosine,
)


def finetune(
    model: Classifier,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    lr: float,
    config: dict[str, Any],
    device: torch.device,
    class_weight: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train the unfrozen part of the model; returns the best-on-val weights and the history.

    The head learns at ``lr`` and the backbone at ``lr * backbone_lr_ratio``, with linear
    warmup then cosine decay per batch; the history records the rates the schedule gave
    each epoch's last step. Best means highest val accuracy, then lowest val loss.
    """
    frozen = unfreeze_last_blocks(model.backbone, config["unfreeze"])
    model.to(device, memory_format=torch.channels_last)
    backbone_lr = lr * config["backbone_lr_ratio"]
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": backbone_lr},
        {"params": list(model.head.parameters()), "lr": lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config["weight_decay"])
    steps = config["epochs"] * len(train_loader)
    scheduler = warmup_cosine(optimizer, config["warmup_epochs"] * len(train_loader), steps)
    weight = class_weight.to(device) if class_weight is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config["label_smoothing"])
    scaler = grad_scaler(device, config["amp"])
    best_state, history = None, []
    for epoch in range(1, config["epochs"] + 1):
        train = train_epoch(
            model, train_loader, loss_fn, device, optimizer, scaler, scheduler, config["amp"], frozen
        )
        val = evaluate_epoch(model, val_loader, loss_fn, device, amp=config["amp"])
        rates = dict(zip(("lr_backbone", "lr_head"), train["lr"], strict=True))
        history.append(epoch_record(epoch, train, val, rates))
        if on_epoch is not None:
            on_epoch(history[-1])
        print(f"finetune epoch {epoch}: train loss {train['loss']:.4f}, val accuracy {val['accuracy']:.4f}")
        if best_val_accuracy(history) is history[-1]:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return best_state, history


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
    best_state, history = finetune(model, train_loader, val_loader, lr, config, device, class_weight, log)
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
            "params": {"lr": lr, "seed": seed, **config},
            "state_dict": best_state,
        },
    )
    log.close(best)
    print(f"finetune: best val accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}")


if __name__ == "__main__":
    run_stage(main)
