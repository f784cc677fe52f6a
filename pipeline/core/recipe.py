"""What ``auto`` means in params' ``finetune`` section: the recipe a run actually uses.

``finetune.augment: auto`` and ``finetune.bn: auto`` resolve from the data and the
backbone, so a user who points the pipeline at photos gets a photo recipe without knowing
the flags, and the digits demo keeps what suits digits:

- augment: texts have none; digits (and other glyph-like data a user names with
  ``jitter``) a mild affine jitter, since a flip or a crop changes what a digit means;
  photos (an image folder, CIFAR) random resized crops and horizontal flips.
- bn: a backbone with published pretrained weights (a torchvision weights name, a
  checkpoint file) keeps its BatchNorm statistics (``frozen``): the linear probe was trained
  on features computed with them, and recomputing them from the batches of a small photo
  set wrecks the features in the first steps (measured on cifar10-dev, faces and photo
  patches: README). The glyph backbone this pipeline pretrains (``weights: pretrain``) and
  one at random init (``none``) train them: the first learnt its statistics at the task's
  own size from rendered glyphs, and on digits training them wins (also measured there);
  the second has statistics worth nothing.

- epochs and batch_size: a schedule sized to the training set (ScheduleRule, each
  modality's ``AUTO_SCHEDULE``). What a small set lacks is optimizer steps, not passes over
  the data: at the largest batch an epoch of 400 photos is 7 steps, so the batch halves (down
  to a floor) until an epoch has enough steps, which costs little (the same images are seen,
  in smaller batches), and then the epochs grow until the run has its minimum of steps, which
  costs time (BiT-HyperRule, Kolesnikov et al. 2020, trains 500 steps under 20k examples;
  half that gained as much on the sets measured). A set large enough keeps the rule's epochs
  at its largest batch. Measured: docs/guides/images.md.

finetune records the resolved values in its metrics, and the report shows them. Torch-free:
params validation and the report import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

AUGMENTS = ("auto", "none", "jitter", "photo", "strong")
FLIPPING = ("photo", "strong")  # policies that flip images left to right
BN_MODES = ("auto", "train", "frozen")
MIXES = ("none", "mixup", "cutmix")
AUTO = "auto"


@dataclass(frozen=True)
class ScheduleRule:
    """What ``finetune.epochs: auto`` and ``finetune.batch_size: auto`` pick for a modality:
    ``batch_size``, halved down to ``smallest_batch`` while an epoch has fewer than
    ``steps_per_epoch`` steps; ``epochs`` passes, more where they make fewer than
    ``min_steps`` optimizer steps (0: no minimum)."""

    epochs: int
    batch_size: int
    smallest_batch: int
    steps_per_epoch: int
    min_steps: int


@dataclass(frozen=True)
class Schedule:
    """The epochs and global batch a run trains with, and why (``auto`` resolved)."""

    epochs: int
    batch_size: int
    steps: int  # optimizer steps over the whole run
    reason: str

    def as_metrics(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "steps": self.steps}


def smallest_auto_batch(rule: ScheduleRule, world_size: int) -> int:
    """The smallest global batch ``batch_size: auto`` can give at ``world_size`` processes
    (what params checks hold BatchNorm's steps to before the data is known)."""
    return fitted_to(rule.smallest_batch, world_size)


def fitted_to(batch: int, world_size: int) -> int:
    """``batch`` rounded up to split evenly over ``world_size`` processes."""
    return math.ceil(batch / world_size) * world_size


def auto_batch(rule: ScheduleRule, train_examples: int, world_size: int) -> int:
    batch = rule.batch_size
    while batch > rule.smallest_batch and math.ceil(train_examples / batch) < rule.steps_per_epoch:
        batch //= 2
    return fitted_to(max(batch, rule.smallest_batch), world_size)


def resolved_schedule(
    epochs: int | str, batch_size: int | str, rule: ScheduleRule, train_examples: int, world_size: int = 1
) -> Schedule:
    """The schedule of ``finetune.epochs`` and ``finetune.batch_size`` (each a number, or
    ``auto``: ``rule`` applied to ``train_examples``) over ``world_size`` processes, with
    the reason for each value."""
    if batch_size == AUTO:
        batch = auto_batch(rule, train_examples, world_size)
        per_epoch = math.ceil(train_examples / batch)
        why_batch = (
            f"batch {batch} (auto): {per_epoch} steps an epoch on {train_examples:,} training examples"
        )
        if batch < rule.batch_size:
            why_batch += f", halved from {rule.batch_size} for at least {rule.steps_per_epoch}"
    else:
        batch, per_epoch = batch_size, math.ceil(train_examples / batch_size)
        why_batch = (
            f"batch {batch} as set: {per_epoch} steps an epoch on {train_examples:,} training examples"
        )
    if epochs != AUTO:
        return Schedule(epochs, batch, epochs * per_epoch, f"{why_batch}; {epochs} epochs as set")
    fewest = rule.epochs * per_epoch
    epochs = max(rule.epochs, math.ceil(rule.min_steps / per_epoch))
    why_epochs = f"{epochs} epochs (auto)"
    if epochs > rule.epochs:
        why_epochs += (
            f": {rule.epochs} would train {fewest} steps, under the {rule.min_steps} a small set needs; "
            f"{epochs / rule.epochs:.1f}x the time of finetune.epochs: {rule.epochs}, the cheaper setting"
        )
    return Schedule(epochs, batch, epochs * per_epoch, f"{why_batch}; {why_epochs}")


def resolved_bn(bn: str, weights: str) -> str:
    """The BatchNorm mode ``finetune.bn`` names for a backbone with ``backbone.weights``."""
    if bn != "auto":
        return bn
    return "train" if weights in ("pretrain", "none") else "frozen"


def resolved(config: dict[str, Any], auto_augment: str, weights: str) -> dict[str, str]:
    """The recipe values a run uses, ``auto`` resolved (``auto_augment``: the policy the
    data's modality picks for it): what finetune's metrics record."""
    return {
        "augment": auto_augment if config["augment"] == "auto" else config["augment"],
        "bn": resolved_bn(config["bn"], weights),
        "mix": config["mix"],
    }
