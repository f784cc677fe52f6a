"""Training and inference loops shared by the stages: GPU-ready, seeded, with progress bars."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pipeline.common import progress
from pipeline.errors import StageError
from pipeline.models import build_head

EpochCallback = Callable[[dict[str, float]], None]


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


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """One loss scaler per training run: active only for float16 autocast on CUDA."""
    enabled = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=enabled)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: bool = False,
    frozen: list[nn.Module] = (),
) -> dict[str, float | list[float]]:
    """One pass of training; returns the mean loss, the accuracy, and ``lr``: each param
    group's rate in the epoch's last optimizer step, as the scheduler set it.

    The scheduler steps only after a real optimizer step: a float16 step that the scaler
    skips (inf or NaN gradients) leaves the schedule where it was.
    """
    model.train()
    for module in frozen:
        module.eval()
    total_loss, correct, seen, rates = 0.0, 0, 0, []
    for images, targets in progress(loader, "train"):
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        rates = [group["lr"] for group in optimizer.param_groups]
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None and scaler.get_scale() >= scale:
            scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return {"loss": total_loss / seen, "accuracy": correct / seen, "lr": rates}


@torch.inference_mode()
def evaluate_epoch(
    model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Mean loss and accuracy over a loader, in eval mode."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in progress(loader, "val"):
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits, targets)
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return {"loss": total_loss / seen, "accuracy": correct / seen}


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
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a head on cached features with AdamW; stop when val loss stops improving.

    Returns the head at its best val loss and the per-epoch history; ``on_epoch`` gets each
    epoch's record as it ends (the stage's dvclive log).
    """
    device = torch.device("cpu")  # features are small; the head trains in moments on a CPU
    train_loader = make_loader(TensorDataset(*train), batch_size, device, shuffle=True, seed=seed)
    val_loader = make_loader(TensorDataset(*val), 4096, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight)
    scaler = grad_scaler(device, amp=False)
    best_loss, best_state, waited, history = math.inf, None, 0, []
    for epoch in range(1, max_epochs + 1):
        train = train_epoch(head, train_loader, loss_fn, device, optimizer, scaler)
        val = evaluate_epoch(head, val_loader, loss_fn, device)
        history.append(epoch_record(epoch, train, val, {"lr_used": train["lr"][0]}))
        if on_epoch is not None:
            on_epoch(history[-1])
        val_loss = val["loss"]
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
    on_epoch: EpochCallback | None = None,
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
        on_epoch=on_epoch,
    )


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


def lowest_val_loss(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the lowest val loss (the head's early-stopping rule)."""
    return min(history, key=lambda record: record["val_loss"])


def best_val_accuracy(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch with the highest val accuracy, ties to the lower val loss (fine-tuning's rule)."""
    return max(history, key=lambda record: (record["val_accuracy"], -record["val_loss"]))


class EpochLog:
    """A stage's per-epoch log through dvclive, DVC's own logger.

    Writes ``<directory>/metrics.json`` after every epoch (the latest epoch, and at the end
    the best one: what ``dvc exp show`` and DVC Studio show while a stage runs) and one TSV
    per metric under ``<directory>/plots/metrics/<stage>/`` (``dvc plots``). Metric names
    start with the stage, so columns read ``finetune.val_accuracy``. dvc.yaml declares these
    files itself (``dvcyaml=False``), and a ``dvc repro`` run is no experiment of its own
    (``save_dvc_exp=False``).
    """

    def __init__(self, directory: Path, stage: str) -> None:
        from dvclive import Live

        self.stage = stage
        self.live = Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False, report=None)

    def __call__(self, record: dict[str, float]) -> None:
        self.live.step = int(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                self.live.log_metric(f"{self.stage}/{name}", value)
        self.live.next_step()

    def close(self, best: dict[str, float]) -> None:
        """Add the best epoch to the summary and write it."""
        summary = self.live.summary.setdefault(self.stage, {})
        summary["best_epoch"] = int(best["epoch"])
        for name in ("val_loss", "val_accuracy"):
            summary[f"best_{name}"] = best[name]
        self.live.end()
