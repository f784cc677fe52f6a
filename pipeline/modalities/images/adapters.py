"""Residual adapters beside a frozen backbone's convolutions, and folding them back in.

Rebuffi, Bilen and Vedaldi (CVPR 2018) put a 1x1 convolution in parallel with each kxk
convolution of a frozen network and train only those (with BatchNorm and the head). Here
the adapter is a 1x1 kernel added at the centre tap of the kxk one, through
``torch.nn.utils.parametrize``: conv(x, W + A) = conv(x, W) + conv1x1(x, A) read at each
kernel's centre, which for the usual "same" padding is exactly the parallel 1x1 branch.
It costs no second convolution, and folding it into W after training (``fold_adapters``)
is exact, so the saved model is a plain torchvision one that evaluate, predict and an ONNX
export read as they read any other.

Grouped and depthwise convolutions get an adapter with the same groups (a per-channel
scale for a depthwise one): MobileNet and EfficientNet families have a single ungrouped
kxk convolution, their stem, and would otherwise train little beyond BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.errors import StageError


class CentreTap(nn.Module):
    """A parametrization of a kxk conv's weight: the frozen weight plus a trainable 1x1
    kernel, zero to start with, at the kernel's centre."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        height, width = conv.kernel_size
        self.delta = nn.Parameter(torch.zeros(conv.out_channels, conv.in_channels // conv.groups, 1, 1))
        self.padding = ((width - 1) // 2, (width - 1) // 2, (height - 1) // 2, (height - 1) // 2)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + nn.functional.pad(self.delta, self.padding).to(weight.dtype)


def adaptable(module: nn.Module) -> bool:
    """A 2-d convolution with an odd kernel larger than 1x1 (one with a centre tap)."""
    return (
        isinstance(module, nn.Conv2d)
        and max(module.kernel_size) > 1
        and all(side % 2 == 1 for side in module.kernel_size)
    )


def add_adapters(backbone: nn.Module, arch: str) -> list[nn.Parameter]:
    """Freeze ``backbone``, give each adaptable convolution a zero adapter and make its
    BatchNorm layers' scale and shift trainable; returns the adapters' parameters.

    Raises StageError, naming ``arch``, when it has no such convolution (ViT, Swin).
    """
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    convs = [module for module in backbone.modules() if adaptable(module)]
    if not convs:
        raise StageError(
            f"finetune.strategy: adapters needs kxk convolutions (odd k > 1) to sit beside, and "
            f"{arch} has none; use strategy: full (with unfreeze) for it"
        )
    adapters = []
    for conv in convs:
        tap = CentreTap(conv).to(conv.weight.device)
        parametrize.register_parametrization(conv, "weight", tap)
        adapters.append(tap.delta)
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
    return adapters


def fold_adapters(model: nn.Module) -> None:
    """Add each adapter into its convolution's weight, leaving plain convolutions (exact:
    the weight the adapted conv computed is the one it keeps)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
