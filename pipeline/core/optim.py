"""What an optimizer step is made of: the optimizer, the warmup-cosine schedule, the L2-SP
penalty, the weights' moving average and balanced class weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

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


def ema_decay(epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay of a moving average whose weights' mean age is about ``epochs``
    epochs of ``steps_per_epoch`` optimizer steps: 1 - 1 / (epochs * steps), 0 (the average
    is the model) when that is a step or less. Counted in epochs, not steps, so one value
    means the same on 400 images and on 400,000."""
    return max(0.0, 1.0 - 1.0 / (epochs * steps_per_epoch))


def moving_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average (EMA, as in timm's fine-tuning recipe) of ``model``'s
    weights and float buffers (BatchNorm statistics), starting at their values now; each
    ``update_parameters(model)`` moves it ``1 - decay`` of the way to the model. Integer
    buffers (BatchNorm's batch count) are copied, not averaged."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _count: torch.Tensor) -> None:
        if averaged and torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    average = AveragedModel(model, multi_avg_fn=update, use_buffers=True)
    average.update_parameters(model)  # the first update copies: the average starts at the model
    return average


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
