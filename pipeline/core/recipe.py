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

finetune records the resolved values in its metrics, and the report shows them. Torch-free:
params validation and the report import it.
"""

from __future__ import annotations

from typing import Any

AUGMENTS = ("auto", "none", "jitter", "photo", "strong")
FLIPPING = ("photo", "strong")  # policies that flip images left to right
BN_MODES = ("auto", "train", "frozen")
MIXES = ("none", "mixup", "cutmix")


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
