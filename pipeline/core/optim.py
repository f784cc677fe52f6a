"""What an optimizer step is made of: the optimizer, the warmup-cosine schedule, the L2-SP
penalty and balanced class weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Penalty = Callable[[], torch.Tensor]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from 1% of the rate, then cosine decay to zero, stepped per batch."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


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


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weights of 1 / (a class's share of the labels), scaled so they average 1 over samples."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return len(labels) / (num_classes * counts.clamp(min=1))
