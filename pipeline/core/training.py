"""Training and inference loops shared by the stages: GPU-ready, seeded, with progress bars."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from pipeline.core.common import progress
from pipeline.core.distributed import gather_in_order, sharded, sum_over_ranks
from pipeline.core.errors import StageError
from pipeline.core.models import build_head

EpochCallback = Callable[[dict[str, float]], None]
Penalty = Callable[[], torch.Tensor]
# A transform of a whole training batch (MixUp, CutMix): images and labels in, images and
# per-class label weights (N x C) out.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Fitted(NamedTuple):
    """What fit() returns: the kept weights (on the CPU), the per-epoch history, and the
    history's record of the kept epoch, the one its selection rule chose."""

    weights: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    kept: dict[str, float]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A seeded DataLoader (workers draw their seeds from it); pinned memory for a GPU.

    ``sampler`` picks this process's items (distributed.GlobalBatchSampler for training,
    distributed.ShardSampler for inference) in place of a plain order or shuffle. A
    dataset's own ``collate`` (texts padded into one tensor) makes its batches.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=getattr(dataset, "collate", None),
    )


def loader_workers(dataset: Dataset, num_workers: int) -> int:
    """Worker processes for a dataset: decoding files needs them (a dataset that
    ``reads_files``); items already in memory do not."""
    return num_workers if getattr(dataset, "reads_files", False) else 0


def loader_indices(loader: DataLoader) -> torch.Tensor:
    """The dataset positions an inference loader visits, in its order."""
    return torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long)


def in_dataset_order(loader: DataLoader, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An inference loader's rows of ``tensors`` in dataset order: every process's share put
    together where the loader is sharded; this process's rows sorted back where its sampler
    ordered them otherwise (texts by length)."""
    indices = loader_indices(loader)
    if sharded(loader.sampler):
        return gather_in_order(indices, *tensors)
    order = indices.argsort()
    return tuple(tensor[order] for tensor in tensors)


def totals(loader: DataLoader, *values: float) -> list[float]:
    """Sums over a loader: over every process where the loader is sharded, else this one's."""
    return sum_over_ranks(*values) if sharded(loader.sampler) else list(values)


def batch_sizes(loader: DataLoader) -> list[int]:
    """How many items each batch of ``loader`` holds, in order (the last may be short)."""
    full, rest = divmod(len(loader.sampler), loader.batch_size)
    return [loader.batch_size] * full + ([rest] if rest else [])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of params' ``amp`` on ``device``; None runs in float32.

    ``auto`` is mixed precision on CUDA (bfloat16 where supported, else float16) and float32
    elsewhere; ``bfloat16`` and ``float16`` ask for that dtype on any device (bfloat16 on a
    CPU runs the very autocast path a GPU runs, which is how the tests check it).
    """
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype(device, amp)``; a no-op where that is float32."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; image batches go channels-last, the fast layout for convs."""
    inputs = inputs.to(device, non_blocking=True)
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs


@torch.inference_mode()
def extract_features(
    backbone: nn.Module, loader: DataLoader, device: torch.device, amp: str, desc: str = "extract"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the frozen backbone: pooled float32 features and labels, on the CPU."""
    backbone.eval().to(device, memory_format=torch.channels_last)
    features, labels = [], []
    for images, targets in progress(loader, desc):
        with autocast(device, amp):
            features.append(backbone(to_device(images, device)).float().cpu())
        labels.append(targets)
    return in_dataset_order(loader, torch.cat(features), torch.cat(labels))


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits and true labels over a loader, on the CPU, in dataset order."""
    model.eval().to(device, memory_format=torch.channels_last)
    logits, actual = [], []
    for images, targets in progress(loader, "predict"):
        with autocast(device, amp):
            logits.append(model(to_device(images, device)).float().cpu())
        actual.append(targets)
    return in_dataset_order(loader, torch.cat(logits), torch.cat(actual))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from 1% of the rate, then cosine decay to zero, stepped per batch."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """One loss scaler per training run: active for float16 autocast only (bfloat16 has
    float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: str = "off",
    frozen: list[nn.Module] = (),
    accumulate: int = 1,
    penalty: Penalty | None = None,
    batch_transform: BatchTransform | None = None,
) -> dict[str, float | list[float]]:
    """One pass of training; returns the mean loss and the accuracy (over every process),
    and ``lr``: each param group's rate in the epoch's last optimizer step.

    With ``accumulate`` > 1 an optimizer step follows that many batches, whose gradients
    add up (DistributedDataParallel synchronises on the last of them only), each batch's
    mean loss weighted by its share of its group's images: a group gives the gradient of
    its mean loss, the epoch's last, shorter group included. The scheduler
    steps only after a real optimizer step: a float16 step that the scaler skips (inf or
    NaN gradients) leaves the schedule where it was. ``penalty`` (e.g. L2-SP) is added to the
    loss that trains, not to the loss reported. ``batch_transform`` (MixUp, CutMix) mixes
    each batch and its labels: the loss is taken against the mixed labels, and accuracy
    counts a prediction right where it names the label with the largest weight.
    """
    model.train()
    for module in frozen:
        module.eval()
    total_loss, correct, seen, rates = 0.0, 0, 0, []
    sizes = batch_sizes(loader)
    groups = [sum(sizes[start : start + accumulate]) for start in range(0, len(sizes), accumulate)]
    optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(progress(loader, "train"), start=1):
        if batch_transform is not None:
            images, targets = batch_transform(images, targets)
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
        steps_now = step % accumulate == 0 or step == len(loader)
        share = len(targets) / groups[(step - 1) // accumulate]  # 1.0 without accumulation
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if steps_now or no_sync is None else no_sync():
            with autocast(device, amp):
                logits = model(images)
                loss = loss_fn(logits, targets)
            objective = loss if penalty is None else loss + penalty()
            scaler.scale(objective * share).backward()
        if steps_now:
            rates = [group["lr"] for group in optimizer.param_groups]
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None and scaler.get_scale() >= scale:
                scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == (targets.argmax(1) if targets.dim() == 2 else targets)).sum().item()
        seen += len(targets)
    total_loss, correct, seen = totals(loader, total_loss, correct, seen)
    return {"loss": total_loss / seen, "accuracy": correct / seen, "lr": rates}


@torch.inference_mode()
def evaluate_epoch(
    model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device, amp: str = "off"
) -> dict[str, float]:
    """Mean loss and accuracy over a loader (over every process's share), in eval mode."""
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
    total_loss, correct, seen = totals(loader, total_loss, correct, seen)
    return {"loss": total_loss / seen, "accuracy": correct / seen}


def l2sp_penalty(parameters: list[nn.Parameter], alpha: float) -> Penalty:
    """L2-SP (Li, Grandvalet and Davoine, ICML 2018): alpha/2 * sum ||theta - theta_pre||^2
    over ``parameters``, theta_pre being their values now. Its gradient, alpha * (theta -
    theta_pre), pulls the weights toward the pretrained ones instead of toward zero."""
    reference = [parameter.detach().clone() for parameter in parameters]

    def penalty() -> torch.Tensor:
        return alpha / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(parameters, reference, strict=True))

    return penalty


def make_optimizer(groups: list[dict], name: str, momentum: float) -> torch.optim.Optimizer:
    """AdamW, or SGD with ``momentum``, over param groups that carry their own lr and
    weight_decay."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    return torch.optim.AdamW(groups)


def optimizer_steps(loader: DataLoader, accumulate: int = 1) -> int:
    """Optimizer steps per epoch: one per ``accumulate`` batches, and one for a remainder."""
    return -(-len(loader) // accumulate)


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weights of 1 / (a class's share of the labels), scaled so they average 1 over samples."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))


Selection = Callable[[list[dict[str, float]]], dict[str, float]]


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    select: Selection,
    patience: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: str = "off",
    frozen: list[nn.Module] = (),
    rate_names: tuple[str, ...] = ("lr",),
    on_epoch: EpochCallback | None = None,
    accumulate: int = 1,
    penalty: Penalty | None = None,
    start_is_candidate: bool = False,
    batch_transform: BatchTransform | None = None,
) -> Fitted:
    """The project's one training loop: a train step and an eval step per epoch, one loss
    scaler, and ``select`` (a rule over the history so far) naming the epoch whose weights
    to keep. With ``patience``, training stops after that many epochs the rule passed over.
    With ``start_is_candidate`` the model as given is evaluated first and enters the
    history as epoch 0 (val loss and accuracy only, no ``on_epoch`` call): when no epoch
    beats it, its weights come back unchanged, bit for bit.

    ``model`` may be wrapped in DistributedDataParallel: the loaders' samplers then give each
    process its share (``set_epoch`` reshuffles, on the sampler and on a
    data.SeededAugmentation dataset), losses and accuracies are summed over the
    processes, so every process keeps the same epoch; evaluation runs the unwrapped model.

    Returns the kept weights, the per-epoch history, each record carrying the rates of the
    optimizer's param groups, named by ``rate_names`` (one per group; an empty name leaves
    its group's rate out), and the kept epoch's record;
    ``on_epoch`` gets each record as its epoch ends (a stage's dvclive log).
    """
    scaler = grad_scaler(device, amp)
    weights, kept, history, passed_over = None, None, [], 0
    if start_is_candidate:
        history.append(start_record(evaluate_epoch(unwrap(model), val_loader, loss_fn, device, amp)))
        weights, kept = weights_on_cpu(unwrap(model)), history[0]
    for epoch in range(1, epochs + 1):
        for reshuffled in (train_loader.sampler, train_loader.dataset, batch_transform):
            if hasattr(reshuffled, "set_epoch"):
                reshuffled.set_epoch(epoch)
        train = train_epoch(
            model,
            train_loader,
            loss_fn,
            device,
            optimizer,
            scaler,
            scheduler,
            amp,
            frozen,
            accumulate,
            penalty,
            batch_transform,
        )
        val = evaluate_epoch(unwrap(model), val_loader, loss_fn, device, amp)
        rates = {name: rate for name, rate in zip(rate_names, train["lr"], strict=True) if name}
        history.append(epoch_record(epoch, train, val, rates))
        if on_epoch is not None:
            on_epoch(history[-1])
        if select(history) is history[-1]:
            weights, kept, passed_over = weights_on_cpu(unwrap(model)), history[-1], 0
        else:
            passed_over += 1
            if patience is not None and passed_over >= patience:
                break
    return Fitted(weights, history, kept)


def weights_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state on the CPU, untouched by further training."""
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


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
) -> tuple[nn.Module, Fitted]:
    """Train a head on cached features with AdamW, early stopping on val loss.

    Returns the head, loaded with its weights at its lowest val loss, and fit()'s result.
    """
    device = torch.device("cpu")  # features are small; the head trains in moments on a CPU
    train_loader = make_loader(TensorDataset(*train), batch_size, device, shuffle=True, seed=seed)
    val_loader = make_loader(TensorDataset(*val), 4096, device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight)
    fitted = fit(
        head,
        train_loader,
        val_loader,
        loss_fn,
        optimizer,
        max_epochs,
        device,
        select=lowest_val_loss,
        patience=patience,
        rate_names=("lr_used",),
        on_epoch=on_epoch,
    )
    if not any(math.isfinite(record["val_loss"]) for record in fitted.history):
        raise StageError(
            f"the head's val loss was never finite (last {fitted.history[-1]['val_loss']}); lower head.lr"
        )
    head.load_state_dict(fitted.weights)
    return head, fitted


def fit_new_head(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    config: dict[str, Any],
    seed: int,
    class_weighted: bool = False,
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, Fitted]:
    """Build the head params' ``head`` section (``config``) describes for these features and
    fit it, as train_head and the random-init baseline both do."""
    head = build_head(
        config["type"], train[0].shape[1], num_classes, config["hidden_units"], config["dropout"]
    )
    weight = balanced_class_weights(train[1], num_classes) if class_weighted else None
    return fit_head(
        head,
        train,
        val,
        config["lr"],
        config["weight_decay"],
        config["batch_size"],
        config["max_epochs"],
        config["patience"],
        seed,
        weight,
        on_epoch,
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


SELECTIONS: dict[str, Selection] = {"loss": lowest_val_loss, "accuracy": best_val_accuracy}


def last_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The latest epoch (pretraining's rule: the schedule ends at its best)."""
    return history[-1]
