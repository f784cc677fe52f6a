import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.finetune import finetune
from pipeline.models import Classifier


def small_classifier() -> Classifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return Classifier(backbone, nn.Linear(4, 3))


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(24, 3, 8, 8, generator=generator) * 3 + 1, torch.arange(24) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def run(model: Classifier, bn: str) -> None:
    finetune(
        model,
        loader(0),
        loader(1),
        torch.device("cpu"),
        lr=0.01,
        epochs=2,
        backbone_lr_ratio=1.0,
        warmup_epochs=0,
        weight_decay=0.0,
        label_smoothing=0.0,
        amp="off",
        bn=bn,
    )


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_bn_frozen_keeps_running_statistics_while_its_scale_trains(bn):
    model = small_classifier()
    norm = model.backbone[1]
    before = {name: value.clone() for name, value in norm.named_buffers()}
    weight = norm.weight.detach().clone()
    run(model, bn)
    unchanged = [torch.equal(before[name], value) for name, value in norm.named_buffers()]
    assert all(unchanged) == (bn == "frozen")
    assert not torch.equal(norm.weight, weight)
