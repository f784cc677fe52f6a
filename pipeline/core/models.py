"""What every modality's model shares: the head, the classifier that joins a backbone and a
head, and which of its parameters train. Building a backbone is the modality's
(pipeline.modalities)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.common import HEAD_FILE


def build_head(kind: str, in_features: int, num_classes: int, hidden_units: int, dropout: float) -> nn.Module:
    """A linear head, or a one-hidden-layer MLP."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Linear(in_features, hidden_units),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_units, num_classes),
    )


class Classifier(nn.Module):
    """A backbone that returns pooled features, and a head that classifies them."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(inputs))


def head_from_config(config: dict[str, Any], num_classes: int) -> nn.Module:
    """An untrained head of the shape a head checkpoint records."""
    return build_head(
        config["type"], config["in_features"], num_classes, config["hidden_units"], config["dropout"]
    )


def load_head(checkpoint: dict[str, Any], source: Path | str = HEAD_FILE) -> nn.Module:
    """The head a head checkpoint (read from ``source``) describes, with its weights."""
    from pipeline.core.checkpoints import load_weights

    head = head_from_config(checkpoint, len(checkpoint["classes"]))
    load_weights(head, checkpoint["state_dict"], source, "train_head")
    return head


def unfreeze_last_blocks(model: nn.Module, stages: list[nn.Module], blocks: str | int) -> list[nn.Module]:
    """Make trainable the last ``blocks`` of ``stages`` (the backbone's blocks in order, as
    its modality lists them) and all that follows them; freeze the rest.

    Returns the frozen modules (their BatchNorm statistics should stay fixed in training).
    """
    if blocks == "all" or blocks >= len(stages):
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return []
    first_trainable = next(stages[-blocks].parameters())
    trainable = False
    for parameter in model.parameters():
        trainable = trainable or parameter is first_trainable
        parameter.requires_grad_(trainable)
    return frozen_modules(model)


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that hold parameters, none of them trainable."""
    return [
        module
        for module in model.modules()
        if any(True for _ in module.parameters(recurse=False))
        and not any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (SyncBatchNorm included): in eval mode they keep their running
    statistics while their scale and shift still train. A text encoder has none."""
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
