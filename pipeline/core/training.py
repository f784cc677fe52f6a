"""Training and inference loops shared by the stages: GPU-ready, seeded, with progress bars."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from pipeline.core.common import progress
from pipeline.core.errors import StageError
from pipeline.core.loaders import batch_sizes, in_dataset_order, make_loader, totals
from pipeline.core.models import build_head
from pipeline.core.optim import Penalty, balanced_class_weights
from pipeline.core.resume import Resume, generator_states, rng_state, set_generator_states, set_rng_state
from pipeline.core.selection import Selection, epoch_record, lowest_val_loss, start_record

EpochCallback = Callable[[dict[str, float]], None]


# A transform of a whole training batch (MixUp, CutMix): images and labels in, images and
# per-class label weights (N x C) out.
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Fitted(NamedTuple):
    """What fit() returns: the kept weights (on the CPU), the per-epoch history, and the
    history's record of the kept epoch, the one its selection rule chose."""

    weights: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    kept: dict[str, float]


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

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in progress(loader, desc):
            with autocast(device, amp):
                features = backbone(to_device(images, device)).float().cpu()
            yield features, targets

    return in_dataset_order(loader, batches())


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits and true labels over a loader, on the CPU, in dataset order."""
    model.eval().to(device, memory_format=torch.channels_last)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in progress(loader, "predict"):
            with autocast(device, amp):
                logits = model(to_device(images, device)).float().cpu()
            yield logits, targets

    return in_dataset_order(loader, batches())


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
    average: AveragedModel | None = None,
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
    counts a prediction right where it names the label with the largest weight. ``average``
    (a moving average of the weights) follows each optimizer step the scaler did not skip.
    """
    model.train()
    for module in frozen:
        module.eval()
    tally, rates = Tally(device), []
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
            if scaler.get_scale() >= scale:
                if scheduler is not None:
                    scheduler.step()
                if average is not None:
                    average.update_parameters(unwrap(model))
        tally.add(loss, logits, targets.argmax(1) if targets.dim() == 2 else targets)
    return {**tally.means(loader), "lr": rates}


class Tally:
    """A pass's summed loss and correct predictions, kept on the device: reading them back
    each step would make the CPU wait for the GPU to finish every batch before queueing the
    next. The loss sums in float64 (as Python's floats did), float32 on Apple's MPS, which
    has no float64."""

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss = torch.zeros((), dtype=dtype, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: its mean ``loss``, and ``logits`` scored against class ``labels``."""
        self.loss += loss.detach().to(self.loss.dtype) * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def means(self, loader: DataLoader) -> dict[str, float]:
        """Mean loss and accuracy over the pass (over every process where ``loader`` is sharded)."""
        loss, correct, seen = totals(loader, self.loss.item(), self.correct.item(), self.seen)
        return {"loss": loss / seen, "accuracy": correct / seen}


@torch.inference_mode()
def evaluate_epoch(
    model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device, amp: str = "off"
) -> dict[str, float]:
    """Mean loss and accuracy over a loader (over every process's share), in eval mode."""
    model.eval()
    tally = Tally(device)
    for images, targets in progress(loader, "val"):
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
            loss = loss_fn(logits, targets)
        tally.add(loss, logits, targets)
    return tally.means(loader)


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
    average: AveragedModel | None = None,
    resume: Resume | None = None,
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

    With ``average`` (optim.moving_average of the model, made before training) the average
    is what each epoch evaluates and what the kept weights are; the train loss and accuracy
    stay those of the model that trains.

    With ``resume`` (resume.Resume), each finished epoch saves everything the next one
    starts from (the weights, the optimizer, the schedule, the loss scaler, the moving
    average, the history and the kept weights, the random states and the loaders'
    generators), and a run that finds such a state goes on from the epoch after it, logging
    the finished epochs again through ``on_epoch``: on a CPU it ends with the very weights of
    a run that was never stopped.
    """
    scaler = grad_scaler(device, amp)
    evaluated = unwrap(model) if average is None else average.module
    loop = TrainingState(model, optimizer, scheduler, scaler, average, train_loader, val_loader)
    weights, kept, history, passed_over, first = None, None, [], 0, 1
    saved = resume.load() if resume is not None else None
    if saved is not None:
        history, passed_over, weights = saved["history"], saved["passed_over"], saved["weights"]
        kept, first = history[saved["kept"]], saved["epoch"] + 1
        loop.restore(saved)
        print(f"{resume.stage}: resumed from epoch {saved['epoch']} of {epochs} ({resume.path})")
        for record in history[1 if start_is_candidate else 0 :]:
            if on_epoch is not None:  # the per-epoch log again: DVC removed it before the rerun
                on_epoch(record)
        if patience is not None and passed_over >= patience:
            first = epochs + 1
    elif start_is_candidate:
        history.append(start_record(evaluate_epoch(unwrap(model), val_loader, loss_fn, device, amp)))
        weights, kept = weights_on_cpu(unwrap(model)), history[0]
    for epoch in range(first, epochs + 1):
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
            average,
        )
        val = evaluate_epoch(evaluated, val_loader, loss_fn, device, amp)
        rates = {name: rate for name, rate in zip(rate_names, train["lr"], strict=True) if name}
        history.append(epoch_record(epoch, train, val, rates))
        if select(history) is history[-1]:
            weights, kept, passed_over = weights_on_cpu(evaluated), history[-1], 0
        else:
            passed_over += 1
        if resume is not None:  # before the epoch is logged: a logged epoch is a saved one
            kept_at = next(index for index, record in enumerate(history) if record is kept)
            resume.save(loop.state(epoch, history, kept_at, passed_over, weights))
        if on_epoch is not None:
            on_epoch(history[-1])
        if patience is not None and passed_over >= patience:
            break
    return Fitted(weights, history, kept)


class TrainingState:
    """What fit() carries from one epoch to the next, saved and restored for resume."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        scaler: torch.amp.GradScaler,
        average: AveragedModel | None,
        train_loader: DataLoader,
        val_loader: DataLoader,
    ) -> None:
        self.model, self.optimizer, self.scheduler = unwrap(model), optimizer, scheduler
        self.scaler, self.average = scaler, average
        self.generators = (train_loader.generator, val_loader.generator)

    def state(
        self,
        epoch: int,
        history: list[dict[str, float]],
        kept: int,
        passed_over: int,
        weights: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "history": history,
            "kept": kept,
            "passed_over": passed_over,
            "weights": weights,
            "model": weights_on_cpu(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
            "rng": rng_state(),
            "generators": generator_states(*self.generators),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        set_rng_state(state["rng"])
        set_generator_states(state["generators"], *self.generators)


def weights_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state on the CPU, untouched by further training."""
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def interpolated_weights(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """``start + share * (end - start)`` for each float tensor of two states of one model
    (WiSE-FT's weight-space ensemble, Wortsman et al., CVPR 2022); integer buffers
    (BatchNorm's batch count) are ``end``'s."""
    if start.keys() != end.keys():
        raise ValueError(f"the two states differ in keys: {sorted(start.keys() ^ end.keys())[:3]}")
    return {
        key: torch.lerp(start[key], value, share) if value.is_floating_point() else value.clone()
        for key, value in end.items()
    }


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
