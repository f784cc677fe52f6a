import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.core.errors import StageError
from pipeline.core.models import Classifier
from pipeline.modalities.images.adapters import add_adapters, fold_adapters
from pipeline.modalities.images.models import build_backbone
from tests.conftest import fine_tune_briefly


def test_adapters_start_from_the_pretrained_function_and_fold_back_exactly():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18")
    backbone.eval()
    images = torch.randn(2, 3, 32, 32)
    before = backbone(images)
    adapters = add_adapters(backbone, "resnet18")
    assert len(adapters) == 17  # the 7x7 stem and sixteen 3x3 convolutions; no 1x1 one
    assert torch.equal(backbone(images), before)
    trainable = [name for name, p in backbone.named_parameters() if p.requires_grad]
    assert trainable and all(
        name.endswith(".delta") or "bn" in name or "downsample.1" in name for name in trainable
    )
    with torch.no_grad():
        for adapter in adapters:
            adapter.normal_(std=0.05)
    adapted = backbone(images)
    assert not torch.allclose(adapted, before, atol=1e-3)
    fold_adapters(backbone)
    assert not any(parametrize.is_parametrized(module) for module in backbone.modules())
    assert set(backbone.state_dict()) == set(build_backbone("resnet18")[0].state_dict())
    assert torch.allclose(backbone(images), adapted, atol=1e-5)


def test_training_adapters_leaves_every_backbone_weight_bit_identical():
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        nn.Conv2d(4, 6, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = Classifier(backbone, nn.Linear(6, 3))
    weights = {name: value.clone() for name, value in backbone.state_dict().items() if "running" not in name}
    adapters = add_adapters(backbone, "test")
    assert [tuple(a.shape) for a in adapters] == [
        (4, 3, 1, 1),
        (4, 1, 1, 1),
    ]  # depthwise: a per-channel scale
    fine_tune_briefly(model, lr=0.05)
    assert all(adapter.abs().sum() > 0 for adapter in adapters)
    assert torch.equal(backbone[0].parametrizations.weight.original, weights["0.weight"])
    assert torch.equal(backbone[3].parametrizations.weight.original, weights["3.weight"])
    assert torch.equal(backbone[4].weight, weights["4.weight"]) and torch.equal(
        backbone[4].bias, weights["4.bias"]
    )
    assert not torch.equal(backbone[1].weight, weights["1.weight"])  # BatchNorm trains


def test_a_family_without_kxk_convolutions_is_named():
    backbone, _ = build_backbone("vit_b_16", image_size=32)
    with pytest.raises(StageError, match=r"adapters needs kxk convolutions .* vit_b_16 has none"):
        add_adapters(backbone, "vit_b_16")
