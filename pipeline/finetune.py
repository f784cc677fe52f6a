"""Stage 5, finetune: unfreeze the backbone and train it with the linear-probe head.

Starts from the trained head (linear probe, then fine-tune), not a fresh one, and keeps
that starting model when no epoch beats it on val: finetune never hands on a model worse
on val than the probe it was given. Reads params ``seed``, ``lr`` (the head's learning
rate; ``dvc exp run -S lr=1e-4``), ``device``, ``amp``, ``deterministic``, ``class_weighted_loss``,
``data.num_workers``, ``data.dataset`` (what ``finetune.augment: auto`` resolves by),
``finetune.*`` and ``distributed.*``; reads data/prepared/ (and the
image files it lists), models/backbone.pt and models/head.pt; writes models/finetuned.pt
(the best on val of the starting model and each epoch, by ``finetune.select``; with
``finetune.ema_epochs``, each epoch's moving average of the weights; with
``finetune.interpolate`` below 1, the kept epoch moved back toward the starting model, if
that still beats the start on val) and, through
dvclive, reports/live/finetune/ (per-epoch losses, accuracies and the learning rates the
schedule used; metrics.json with the latest and the best epoch, which of the starting model
and the fine-tuned one was kept and the start's val scores, the world size and the
backend, live while the stage runs) and metrics/finetune_time.json (the wall time of the
training loop; the only output that is not the same bit for bit on a rerun, so no stage
depends on it).

With ``distributed.nproc_per_node`` (or ``nnodes``) above 1 it runs in that many processes
under DistributedDataParallel; ``finetune.batch_size`` stays the global batch.
``finetune.epochs`` and ``batch_size: auto`` resolve from the training set's size once it is
read (pipeline.core.recipe.resolved_schedule, the modality's rule); the metrics record the
values and the reason (``epochs``, ``batch_size``, ``steps``, ``schedule``).
Run: ``python -m pipeline.finetune``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from pipeline import modalities
from pipeline.core import distributed, resume
from pipeline.core.checkpoints import (
    BackboneCheckpoint,
    HeadCheckpoint,
    classifier_checkpoint,
    read_backbone,
    read_head,
)
from pipeline.core.common import (
    FINETUNED_FILE,
    LIVE_DIR,
    METRICS_DIR,
    device_name,
    save_torch,
    seed_everything,
    write_json,
)
from pipeline.core.data import SeededAugmentation, SeededBatchTransform
from pipeline.core.entry import run_stage
from pipeline.core.epoch_log import EpochLog
from pipeline.core.loaders import loader_workers, make_loader, optimizer_steps
from pipeline.core.models import (
    Classifier,
    batchnorm_layers,
    frozen_modules,
    head_from_config,
    load_head,
    trainable_parameters,
    unfreeze_last_blocks,
)
from pipeline.core.optim import (
    balanced_class_weights,
    ema_decay,
    l2sp_penalty,
    make_optimizer,
    moving_average,
    warmup_cosine,
)
from pipeline.core.recipe import resolved, resolved_schedule
from pipeline.core.selection import SELECTIONS, Selection, kept_note, selection_summary, start_record
from pipeline.core.training import (
    BatchTransform,
    EpochCallback,
    Fitted,
    evaluate_epoch,
    fit,
    interpolated_weights,
    unwrap,
    weights_on_cpu,
)
from pipeline.modalities import load_params

TIME_FILE = METRICS_DIR / "finetune_time.json"
# Below this many val examples one example moves val accuracy by more than a point, and
# which epoch wins says more about the split than about the epochs.
FEW_VAL_EXAMPLES = 100


@dataclass(frozen=True)
class FinetuneRecipe:
    """What finetune() trains with: the head's rate ``lr`` (params' top-level ``lr``), the
    top-level ``amp``, the ``bn`` mode resolved from ``auto``, and the other keys of params'
    ``finetune`` section of the same names (docs/reference/params.md says what each does).
    The defaults here are the plain recipe that tests build on; a run takes every value
    from params.yaml (finetune_recipe)."""

    lr: float
    epochs: int
    backbone_lr_ratio: float
    warmup_epochs: int
    weight_decay: float
    label_smoothing: float
    amp: str
    select: str
    bn: str = "train"
    optimizer: str = "adamw"
    momentum: float = 0.9
    l2sp: float = 0.0
    layer_decay: float = 1.0
    ema_epochs: float = 0.0
    interpolate: float = 1.0


def finetune_recipe(params: dict[str, Any], used: dict[str, Any]) -> FinetuneRecipe:
    """The recipe of a run: params' ``lr``, ``amp`` and ``finetune`` section, with the
    resolved values of ``used`` (resolved(), resolved_schedule()) in place of ``auto``."""
    given = {**params["finetune"], **used, "lr": params["lr"], "amp": params["amp"]}
    return FinetuneRecipe(**{field.name: given[field.name] for field in fields(FinetuneRecipe)})


def finetune(
    model: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    device: torch.device,
    recipe: FinetuneRecipe,
    *,
    accumulate: int = 1,
    class_weight: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
    blocks: list[nn.Module] = (),
    batch_transform: BatchTransform | None = None,
    resume_from: resume.Resume | None = None,
) -> Fitted:
    """Train the trainable part of a Classifier (possibly wrapped in DistributedDataParallel)
    with ``recipe``; returns fit()'s result: the best-on-val weights, the history, whose
    epoch 0 is the model as given, and the kept epoch's record.

    The head learns at ``recipe.lr`` and the backbone at ``lr * backbone_lr_ratio``, with
    linear warmup then cosine decay per optimizer step (``accumulate`` batches each); the
    history records the rates the schedule gave each epoch's last step. Best is by
    ``select`` (selection.SELECTIONS: lowest val loss, or highest val accuracy then lowest
    loss) among the epochs and the starting model: a fine-tune that never beats the start on
    val gives back the start's weights unchanged (the linear probe's head on the pretrained
    backbone, with ``head_init: probe``). With ``bn="frozen"`` every BatchNorm layer keeps
    the backbone's running statistics. With ``l2sp`` > 0 the backbone is pulled toward its
    weights at the start (L2-SP) and has no weight decay toward zero; the head keeps
    ``weight_decay``. With ``layer_decay`` below 1 each of the backbone's ``blocks`` learns
    that much slower than the block above it (layer-wise rate decay), the layers below the
    first block slower still. ``batch_transform`` (MixUp, CutMix) mixes each training batch.
    With ``ema_epochs`` above 0 each epoch is judged, and the kept weights are, a moving
    average of the weights over about that many epochs of steps, starting at the starting
    model. With ``interpolate`` below 1 the kept epoch's weights are then moved back toward
    the starting model's (interpolate_with_start), and judged against the start on val again.
    """
    classifier = unwrap(model)
    backbone = [p for p in classifier.backbone.parameters() if p.requires_grad]
    decay = 0.0 if recipe.l2sp else recipe.weight_decay
    groups = [
        {"params": params, "lr": recipe.lr * recipe.backbone_lr_ratio * scale, "weight_decay": decay}
        for params, scale in backbone_groups(backbone, blocks, recipe.layer_decay)
    ]
    head = list(classifier.head.parameters())
    groups.append({"params": head, "lr": recipe.lr, "weight_decay": recipe.weight_decay})
    steps = optimizer_steps(train_loader, accumulate)
    optimizer = make_optimizer(groups, recipe.optimizer, recipe.momentum)
    scheduler = warmup_cosine(optimizer, recipe.warmup_epochs * steps, recipe.epochs * steps)
    weight = class_weight.to(device) if class_weight is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing)
    average = moving_average(classifier, ema_decay(recipe.ema_epochs, steps)) if recipe.ema_epochs else None
    start = weights_on_cpu(classifier) if recipe.interpolate < 1 else None
    frozen = frozen_modules(classifier) + (batchnorm_layers(classifier) if recipe.bn == "frozen" else [])
    fitted = fit(
        model,
        train_loader,
        val_loader,
        loss_fn,
        optimizer,
        recipe.epochs,
        device,
        select=SELECTIONS[recipe.select],
        scheduler=scheduler,
        amp=recipe.amp,
        frozen=frozen,
        rate_names=("",) * (len(groups) - 2) + ("lr_backbone", "lr_head"),  # the top block's rate
        on_epoch=on_epoch,
        accumulate=accumulate,
        penalty=l2sp_penalty(backbone, recipe.l2sp) if recipe.l2sp else None,
        start_is_candidate=True,
        batch_transform=batch_transform,
        average=average,
        resume=resume_from,
    )
    if start is None:
        return fitted
    return interpolate_with_start(
        model,
        fitted,
        start,
        recipe.interpolate,
        val_loader,
        loss_fn,
        device,
        recipe.amp,
        SELECTIONS[recipe.select],
    )


def interpolate_with_start(
    model: nn.Module,
    fitted: Fitted,
    start: dict[str, torch.Tensor],
    share: float,
    val_loader: torch.utils.data.DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str,
    select: Selection,
) -> Fitted:
    """WiSE-FT: the kept weights moved back toward the starting model's, ``start + share *
    (kept - start)``. Val, drawn from the training data, cannot see the shift this guards
    against, so the share is the user's, not searched on val; the blend still has to beat
    the starting model on val, as any epoch does, or the start is kept. Its record is the
    kept epoch's number with the blend's val scores and ``interpolate``: the share."""
    if fitted.kept["epoch"] == 0:
        return fitted
    weights = interpolated_weights(start, fitted.weights, share)
    classifier = unwrap(model)
    classifier.load_state_dict(weights)
    val = evaluate_epoch(classifier, val_loader, loss_fn, device, amp)
    blend = {**start_record(val), "epoch": fitted.kept["epoch"], "interpolate": share}
    if select([fitted.history[0], blend]) is fitted.history[0]:
        return Fitted(start, fitted.history, fitted.history[0])
    return Fitted(weights, fitted.history, blend)


def backbone_groups(
    trainable: list[nn.Parameter], blocks: list[nn.Module], layer_decay: float
) -> list[tuple[list[nn.Parameter], float]]:
    """The backbone's trainable parameters in groups, bottom to top, each with its share of
    the backbone's rate: one group at 1 without layer decay; with it, a group per block,
    the top block at 1 and each below at ``layer_decay`` times the one above, and what no
    block holds (the stem, the embeddings) one step below the lowest. Groups with nothing
    trainable (frozen blocks) are left out."""
    if layer_decay == 1.0 or not blocks:
        return [(trainable, 1.0)]
    wanted = {id(p) for p in trainable}
    in_blocks = [[p for p in block.parameters() if id(p) in wanted] for block in blocks]
    placed = {id(p) for params in in_blocks for p in params}
    rest = [p for p in trainable if id(p) not in placed]
    top = len(blocks) - 1
    groups = [(rest, layer_decay ** (top + 1))] + [
        (params, layer_decay ** (top - index)) for index, params in enumerate(in_blocks)
    ]
    return [(params, scale) for params, scale in groups if params]


def starting_classifier(
    backbone_checkpoint: BackboneCheckpoint, head_checkpoint: HeadCheckpoint, config: dict
) -> Classifier:
    """The backbone with the trained linear probe (``finetune.head_init: probe``) or a new
    head (``fresh``, drawn from the seeded generator), set up for ``finetune.strategy``:
    ``full`` trains the last ``unfreeze`` blocks, ``adapters`` freezes the backbone and adds
    its modality's adapters."""
    if config["head_init"] == "probe":
        head = load_head(head_checkpoint)
    else:
        head = head_from_config(head_checkpoint, len(head_checkpoint["classes"]))
    modality = modalities.for_checkpoint(backbone_checkpoint)
    classifier = Classifier(modalities.load_backbone(backbone_checkpoint), head)
    if config["strategy"] == "adapters":
        modality.add_adapters(classifier.backbone, backbone_checkpoint, config)
    else:
        unfreeze_last_blocks(classifier.backbone, modality.blocks(classifier.backbone), config["unfreeze"])
    return classifier


def few_val_examples_warning(val_examples: int) -> str | None:
    """A warning when the val split is too small for the choice of epoch to mean much."""
    if val_examples >= FEW_VAL_EXAMPLES:
        return None
    return (
        f"finetune: warning: the val split has {val_examples} examples, so one of them is "
        f"{100 / val_examples:.1f} points of val accuracy and the kept epoch is a noisy choice; "
        f"hold out at least {FEW_VAL_EXAMPLES} (data.val_fraction) for a choice that means something"
    )


def finetune_time(seconds: float, epochs: int, train_examples: int, world_size: int) -> dict[str, float]:
    """What ``dvc exp show`` and the strategy table report of the training loop's wall time
    (validation included): total, per epoch, the examples (images or texts) trained on, and
    examples per second. Each rate is computed from the rounded total written beside it, so
    the file's figures agree with each other exactly:
    examples_per_second == round(examples / seconds, 1)."""
    seconds = max(round(seconds, 3), 0.001)
    examples = epochs * train_examples
    return {
        "seconds": seconds,
        "seconds_per_epoch": round(seconds / epochs, 3),
        "examples": examples,
        "examples_per_second": round(examples / seconds, 1),
        "world_size": world_size,
    }


def training_splits(
    backbone_checkpoint: BackboneCheckpoint, augment: str, seed: int
) -> tuple[SeededAugmentation, torch.utils.data.Dataset]:
    """The training split, augmented by ``augment`` and seeded per example, and the val split."""
    train = SeededAugmentation(modalities.split_dataset("train", backbone_checkpoint, augment), seed)
    return train, modalities.split_dataset("val", backbone_checkpoint)


def training_loaders(
    train: SeededAugmentation,
    val: torch.utils.data.Dataset,
    params: dict[str, Any],
    ranks: distributed.Ranks,
    batch_size: int,
    per_process: int,
    device: torch.device,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The train and val loaders: this process's share (``per_process``) of each global
    batch of ``batch_size``, and of the val split."""
    workers = loader_workers(train.dataset, params["data"]["num_workers"])
    lengths = getattr(train, "lengths", None)
    sampler = distributed.GlobalBatchSampler(
        len(train), batch_size, ranks, params["seed"], lengths, step=per_process
    )
    train_loader = make_loader(train, per_process, device, num_workers=workers, sampler=sampler)
    val_sampler = distributed.ShardSampler(len(val), ranks, getattr(val, "lengths", None), "the val split")
    return train_loader, make_loader(val, per_process, device, num_workers=workers, sampler=val_sampler)


def epoch_printer(log: EpochLog | None) -> EpochCallback:
    """What each epoch does when it ends: its record to dvclive (on the main process, the
    one with a log) and a line to the terminal."""

    def on_epoch(record: dict[str, float]) -> None:
        if log is not None:
            log(record)
        print(
            f"finetune epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
            f"val accuracy {record['val_accuracy']:.4f}"
        )

    return on_epoch


def main() -> None:
    params = load_params()
    config, lr, seed, settings = params["finetune"], params["lr"], params["seed"], params["distributed"]
    plan, ranks, device = distributed.start("finetune", settings, params["device"])
    seed_everything(seed, params["deterministic"])
    backbone_checkpoint, head_checkpoint = read_backbone(), read_head()
    modality = modalities.for_checkpoint(backbone_checkpoint)
    classifier = starting_classifier(backbone_checkpoint, head_checkpoint, config)
    trainable, total = trainable_parameters(classifier), sum(p.numel() for p in classifier.parameters())
    classifier.to(device, memory_format=torch.channels_last)
    model = distributed.parallel(classifier, ranks, device, settings["sync_batchnorm"])

    used = resolved(config, modality.auto_augment(params["data"]["dataset"]), backbone_checkpoint["weights"])
    train, val = training_splits(backbone_checkpoint, used["augment"], seed)
    schedule = resolved_schedule(
        config["epochs"], config["batch_size"], modality.AUTO_SCHEDULE, len(train), ranks.world_size
    )
    used.update(schedule.as_metrics())
    per_process, accumulate = distributed.split_batch(
        schedule.batch_size, ranks.world_size, settings["max_batch_per_process"], "finetune.batch_size"
    )
    train_loader, val_loader = training_loaders(
        train, val, params, ranks, schedule.batch_size, per_process, device
    )
    mixing = modality.batch_mixing(used["mix"], config["mix_alpha"], len(head_checkpoint["classes"]))
    class_weight = None
    if params["class_weighted_loss"]:
        class_weight = balanced_class_weights(train.labels, len(head_checkpoint["classes"]))
    log = EpochLog(LIVE_DIR / "finetune", "finetune") if ranks.main else None
    warning = few_val_examples_warning(len(val_loader.dataset))
    if ranks.main:
        print(f"finetune: {schedule.steps} optimizer steps ({schedule.reason})")
        if warning:
            print(warning)

    saved = resume.for_stage("finetune", ranks.main)
    started = time.perf_counter()
    fitted = finetune(
        model,
        train_loader,
        val_loader,
        device,
        finetune_recipe(params, used),
        accumulate=accumulate,
        class_weight=class_weight,
        on_epoch=epoch_printer(log),
        blocks=modality.blocks(classifier.backbone),
        batch_transform=SeededBatchTransform(mixing, seed, ranks.rank) if mixing else None,
        resume_from=saved,
    )
    seconds = time.perf_counter() - started
    if not ranks.main:
        return
    history, best = fitted.history, fitted.kept
    classifier.load_state_dict(fitted.weights)
    classifier = modality.fold_adapters(classifier)  # a plain model, read as any other
    save_torch(
        FINETUNED_FILE,
        classifier_checkpoint(
            classifier.state_dict(),
            backbone_checkpoint,
            head_checkpoint,
            params={"lr": lr, "seed": seed, "amp": params["amp"], **config, **used},
            world_size=ranks.world_size,
            backend=plan.backend,
        ),
    )
    chosen = selection_summary(history, best, config["select"], config["interpolate"])
    log.live.summary.setdefault("finetune", {}).update(
        world_size=ranks.world_size,
        backend=plan.backend,
        device=device_name(device),
        deterministic=params["deterministic"],
        strategy=config["strategy"],
        **used,
        schedule=schedule.reason,
        ema_epochs=config["ema_epochs"],
        interpolate=config["interpolate"],
        trainable_params=trainable,
        **chosen,
    )
    log.close(best)
    write_json(TIME_FILE, {"finetune": finetune_time(seconds, schedule.epochs, len(train), ranks.world_size)})
    print(
        f"finetune: {config['strategy']} trained {trainable:,} of {total:,} parameters in {seconds:.1f} s "
        f"(augment {used['augment']}, bn {used['bn']}, mix {used['mix']}, "
        f"ema_epochs {config['ema_epochs']:g}, interpolate {config['interpolate']:g})"
    )
    best_scores = {f"best_{name}": best[name] for name in ("val_loss", "val_accuracy")}
    kept = {**chosen, **best_scores, "best_epoch": best["epoch"], "interpolate": config["interpolate"]}
    print(f"finetune: {kept_note(kept)}")
    if saved is not None:
        saved.clear()


if __name__ == "__main__":
    run_stage(main, "finetune", distributed=True)
