"""Training and inference loops shared by the stages: GPU-ready, seeded, with progress bars."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pipeline.common import StageError, progress, write_text
from pipeline.models import build_head

HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A seeded DataLoader (workers draw their seeds from it); pinned memory for a GPU."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; image batches go channels-last, the fast layout for convs."""
    inputs = inputs.to(device, non_blocking=True)
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs


@torch.inference_mode()
def extract_features(
    backbone: nn.Module, loader: DataLoader, device: torch.device, desc: str = "extract"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen backbone: pooled float32 features and labels, on the CPU."""
    backbone.eval().to(device, memory_format=torch.channels_last)
    features, labels = [], []
    for images, targets in progress(loader, desc):
        with autocast(device, enabled=True):
            features.append(backbone(to_device(images, device)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels over a loader."""
    model.eval().to(device, memory_format=torch.channels_last)
    predicted, actual = [], []
    for images, targets in progress(loader, "predict"):
        with autocast(device, enabled=True):
            logits = model(to_device(images, device))
        predicted.append(logits.argmax(1).cpu())
        actual.append(targets)
    return torch.cat(predicted).numpy(), torch.cat(actual).numpy()


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from 1% of the rate, then cosine decay to zero, stepped per batch."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def run_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: bool = False,
    frozen: list[nn.Module] = (),
) -> tuple[float, float]:
    """Train for one epoch when given an optimizer, else evaluate; returns (loss, accuracy)."""
    training = optimizer is not None
    model.train(training)
    for module in frozen:
        module.eval()
    scaler = torch.amp.GradScaler(
        enabled=training and amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for images, targets in progress(loader, "train" if training else "val"):
            images, targets = to_device(images, device), targets.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = model(images)
                loss = loss_fn(logits, targets)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
            total_loss += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
    return total_loss / seen, correct / seen


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weights of 1 / (a class's share of the labels), scaled so they average 1 over samples."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


def fit_head(
    head: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    seed: int,
    class_weight: torch.Tensor | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a head on cached features with AdamW; stop when val loss stops improving.

    Returns the head at its best val loss and the per-epoch history.
    """
    device = torch.device("cpu")  # features are small; the head trains in moments on a CPU
    train_loader = make_loader(TensorDataset(*train), batch_size, device, shuffle=True, seed=seed)
    val_loader = make_loader(TensorDataset(*val), 4096, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight)
    best_loss, best_state, waited, history = math.inf, None, 0, []
    for epoch in range(1, max_epochs + 1):
        train_loss, train_acc = run_epoch(head, train_loader, loss_fn, device, optimizer)
        val_loss, val_acc = run_epoch(head, val_loader, loss_fn, device)
        history.append(epoch_record(epoch, train_loss, train_acc, val_loss, val_acc, lr))
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, waited = val_loss, copy.deepcopy(head.state_dict()), 0
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is None:
        raise StageError(f"the head's val loss was never finite (last {val_loss}); lower head.lr")
    head.load_state_dict(best_state)
    return head, history


def fit_configured_head(
    config: dict,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    seed: int,
    class_weighted: bool = False,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Build the head that params' ``head`` section describes and fit it to features."""
    head = build_head(
        config["type"], train[0].shape[1], num_classes, config["hidden_units"], config["dropout"]
    )
    return fit_head(
        head,
        train,
        val,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        batch_size=config["batch_size"],
        max_epochs=config["max_epochs"],
        patience=config["patience"],
        seed=seed,
        class_weight=balanced_class_weights(train[1], num_classes) if class_weighted else None,
    )


def epoch_record(
    epoch: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float, lr: float
) -> dict[str, float]:
    return {
        "epoch": epoch,
        "train_loss": round(train_loss, 6),
        "train_accuracy": round(train_acc, 6),
        "val_loss": round(val_loss, 6),
        "val_accuracy": round(val_acc, 6),
        "lr": lr,
    }


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the lowest val loss."""
    return min(history, key=lambda record: record["val_loss"])


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch log as CSV, the format ``dvc plots`` reads."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())
