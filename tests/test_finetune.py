import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline import finetune as stage
from pipeline.core.data import load_split
from pipeline.core.models import Classifier
from pipeline.core.recipe import resolved, resolved_schedule
from tests.conftest import Run, default_params, fine_tune_briefly


def small_classifier() -> Classifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return Classifier(backbone, nn.Linear(4, 3))


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_bn_frozen_keeps_running_statistics_while_its_scale_trains(bn):
    model = small_classifier()
    norm = model.backbone[1]
    before = {name: value.clone() for name, value in norm.named_buffers()}
    weight = norm.weight.detach().clone()
    fine_tune_briefly(model, bn=bn)
    unchanged = [torch.equal(before[name], value) for name, value in norm.named_buffers()]
    assert all(unchanged) == (bn == "frozen")
    assert not torch.equal(norm.weight, weight)


def test_l2sp_keeps_the_backbone_nearer_its_start_than_weight_decay_does():
    drift = {}
    for l2sp in (0.0, 50.0):
        model = small_classifier()
        start = [p.detach().clone() for p in model.backbone.parameters()]
        fine_tune_briefly(model, lr=0.05, epochs=3, weight_decay=0.1, optimizer="sgd", l2sp=l2sp)
        drift[l2sp] = sum(
            ((p - p0) ** 2).sum().item() for p, p0 in zip(model.backbone.parameters(), start, strict=True)
        )
    assert 0 < drift[50.0] < drift[0.0] / 2


def test_a_fresh_head_is_new_and_seeded_and_a_probe_head_is_the_trained_one(monkeypatch):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    monkeypatch.setattr(stage.modalities, "load_backbone", lambda checkpoint: backbone)
    head = nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 3))
    head_checkpoint = {
        **{"type": "linear", "in_features": 4, "hidden_units": 8, "dropout": 0.0},
        **{"classes": ["a", "b", "c"], "state_dict": head.state_dict()},
    }
    heads = {}
    for name, init in (("probe", "probe"), ("fresh", "fresh"), ("again", "fresh")):
        torch.manual_seed(1)
        config = {"strategy": "full", "unfreeze": "all", "head_init": init}
        heads[name] = stage.starting_classifier({"modality": "images"}, head_checkpoint, config).head[1]
    assert torch.equal(heads["probe"].weight, head[1].weight)
    assert not torch.equal(heads["fresh"].weight, head[1].weight)
    assert torch.equal(heads["fresh"].weight, heads["again"].weight)


@pytest.mark.parametrize("seconds", [0.7549, 0.75, 12.3456, 1e-5])
def test_the_time_file_s_figures_agree_exactly_whatever_the_rounding(seconds):
    """Rates come from the rounded total written beside them: a fast run (0.7549 s, which
    rounds to 0.755) cannot give a rate 5% off the one its own seconds imply."""
    timing = stage.finetune_time(seconds, epochs=2, train_examples=100, world_size=1)
    assert timing["examples"] == 200
    assert timing["examples_per_second"] == round(200 / timing["seconds"], 1)
    assert timing["seconds_per_epoch"] == round(timing["seconds"] / 2, 3)
    assert abs(timing["seconds"] - seconds) <= 0.001


def test_a_small_val_split_is_named_with_what_one_example_weighs():
    assert stage.few_val_examples_warning(stage.FEW_VAL_EXAMPLES) is None
    warning = stage.few_val_examples_warning(37)
    assert "37 examples" in warning and "2.7 points" in warning and "data.val_fraction" in warning


STRATEGIES = {
    "full + L2-SP": {"l2sp": 0.01},
    "adapters, blended with the start": {"strategy": "adapters", "backbone_lr_ratio": 1, "interpolate": 0.5},
    "seed recipe": {"optimizer": "sgd", "backbone_lr_ratio": 1.0, "warmup_epochs": 0, "head_init": "fresh"},
}  # full fine-tuning with frozen BatchNorm is the tiny config's own, run by tests/conftest.py


@pytest.fixture(scope="module")
def tiny_workspace(tiny_run: Run, tmp_path_factory) -> Path:
    """The tiny run's params and outputs up to the linear probe (shared with the other
    whole-pipeline tests, not recomputed)."""
    path = tmp_path_factory.mktemp("strategies")
    shutil.copy(tiny_run.repo / "params.yaml", path / "params.yaml")
    for folder in ("data/prepared", "data/features"):
        shutil.copytree(tiny_run.repo / folder, path / folder)
    for name in ("backbone.pt", "head.pt"):
        (path / "models").mkdir(exist_ok=True)
        shutil.copy(tiny_run.repo / "models" / name, path / "models" / name)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_runs_end_to_end_on_the_tiny_config(name, tiny_workspace, tmp_path, monkeypatch):
    from pipeline import evaluate

    workspace = Path(shutil.copytree(tiny_workspace, tmp_path / "workspace"))
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["finetune"].update({"epochs": 1, "warmup_epochs": 0, "ema_epochs": 1, **STRATEGIES[name]})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(workspace)
    stage.main()
    evaluate.main()
    summary = json.loads((workspace / "reports/live/finetune/metrics.json").read_text())["finetune"]
    backbone = torch.load(workspace / "models/backbone.pt", weights_only=True)["state_dict"]
    everything = sum(value.numel() for key, value in backbone.items() if "running" not in key)
    if name.startswith("adapters"):  # adapters, BatchNorm and head: a small share of the backbone
        assert 0 < summary["trainable_params"] < everything / 4
    else:
        assert summary["trainable_params"] > everything
    assert summary["strategy"] == params["finetune"]["strategy"]
    assert summary["interpolate"] == params["finetune"]["interpolate"]
    timing = json.loads((workspace / "metrics/finetune_time.json").read_text())["finetune"]
    train_images = len(load_split(workspace / "data/prepared", "train")[1])
    assert timing["seconds"] > 0 and timing["world_size"] == 1
    assert timing["examples"] == params["finetune"]["epochs"] * train_images
    assert timing["examples_per_second"] == round(timing["examples"] / timing["seconds"], 1)
    finetuned = torch.load(workspace / "models/finetuned.pt", weights_only=True)
    assert finetuned["params"]["strategy"] == params["finetune"]["strategy"]
    assert {key.split(".")[0] for key in finetuned["state_dict"]} == {"backbone", "head"}
    assert not [key for key in finetuned["state_dict"] if "parametrizations" in key]  # folded
    test = json.loads((workspace / "metrics/test.json").read_text())
    probe = torch.load(workspace / "models/head.pt", weights_only=True)["state_dict"]
    same_head = all(
        torch.equal(finetuned["state_dict"][f"head.{key}"], value) for key, value in probe.items()
    )
    assert summary["val_loss"] != summary["start_val_loss"]  # the epoch trained the model
    if params["finetune"]["head_init"] == "probe":  # the probe's head is kept only with the start
        assert same_head == (summary["selected"] == "start")
    else:  # a fresh head never is the probe's
        assert not same_head
    if params["finetune"]["head_init"] == "probe":  # a fresh head gets too few SGD steps here
        assert test["finetuned"]["accuracy"] > 0.2  # 10 classes: well above chance


@pytest.mark.slow
def test_a_fine_tune_that_only_hurts_val_ships_the_probe_bit_for_bit(
    tiny_workspace, tmp_path, monkeypatch, capsys
):
    """A rate that wrecks the backbone in one epoch: finetune keeps its starting model, the
    pretrained backbone with the linear probe's head, unchanged, and says so."""
    workspace = Path(shutil.copytree(tiny_workspace, tmp_path / "workspace"))
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["lr"] = 50.0
    params["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=1, optimizer="sgd", backbone_lr_ratio=1.0)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(workspace)
    stage.main()
    summary = json.loads((workspace / "reports/live/finetune/metrics.json").read_text())["finetune"]
    assert summary["selected"] == "start" and summary["best_epoch"] == 0
    assert summary["start_val_loss"] == summary["best_val_loss"]
    assert not float(summary["val_loss"]) <= summary["start_val_loss"]  # worse, or not even finite
    rule = params["finetune"]["select"]
    kept = f"finetune: no epoch beat the starting model on val {rule}, so the fine-tuned model is"
    assert kept in capsys.readouterr().out
    finetuned = torch.load(workspace / "models/finetuned.pt", weights_only=True)["state_dict"]
    for name, part in (("backbone", "backbone.pt"), ("head", "head.pt")):
        given = torch.load(workspace / "models" / part, weights_only=True)["state_dict"]
        kept = {
            key.removeprefix(f"{name}."): value for key, value in finetuned.items() if key.startswith(name)
        }
        assert kept.keys() == given.keys()
        assert all(torch.equal(kept[key], given[key]) for key in given), name


@pytest.mark.slow
def test_an_auto_batch_is_resolved_from_the_training_set_trained_with_and_recorded(
    tiny_workspace, tmp_path, monkeypatch, capsys
):
    workspace = Path(shutil.copytree(tiny_workspace, tmp_path / "workspace"))
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["finetune"].update(epochs=1, batch_size="auto", warmup_epochs=0, ema_epochs=1)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(workspace)
    stage.main()
    train_images = len(load_split(workspace / "data/prepared", "train")[1])
    rule = stage.modalities.get("images").AUTO_SCHEDULE
    expected = resolved_schedule(1, "auto", rule, train_images)
    summary = json.loads((workspace / "reports/live/finetune/metrics.json").read_text())["finetune"]
    assert (summary["epochs"], summary["batch_size"], summary["steps"]) == (
        1,
        expected.batch_size,
        expected.steps,
    )
    assert summary["schedule"] == expected.reason and expected.batch_size < rule.batch_size
    assert f"finetune: {expected.steps} optimizer steps ({expected.reason})" in capsys.readouterr().out
    checkpoint = torch.load(workspace / "models/finetuned.pt", weights_only=True)
    assert checkpoint["params"]["batch_size"] == expected.batch_size


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_batches_train_and_the_same_seed_mixes_the_same_way(mix):
    from pipeline.core.data import SeededBatchTransform
    from pipeline.modalities.images.data import batch_mixing

    weights = []
    for _ in range(2):
        model = small_classifier()
        mixing = SeededBatchTransform(batch_mixing(mix, 1.0, 3), seed=5)
        fine_tune_briefly(model, batch_transform=mixing)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed, soft = SeededBatchTransform(batch_mixing(mix, 1.0, 3), seed=5)(images, labels)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    assert not torch.equal(mixed, images)


def test_layer_decay_slows_each_block_below_the_top_one():
    blocks = [nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)]
    stem = nn.Linear(2, 2)
    trainable = [*stem.parameters(), *(p for block in blocks for p in block.parameters())]
    groups = stage.backbone_groups(trainable, blocks, 0.5)
    assert [scale for _, scale in groups] == [0.125, 0.25, 0.5, 1.0]
    assert [len(params) for params, _ in groups] == [2, 2, 2, 2]
    assert stage.backbone_groups(trainable, blocks, 1.0) == [(trainable, 1.0)]
    top_only = list(blocks[2].parameters())  # unfreeze: 1 leaves the lower groups empty
    assert stage.backbone_groups(top_only, blocks, 0.5) == [(top_only, 1.0)]


def test_a_moving_average_keeps_the_kept_weights_nearer_the_start_than_the_trained_ones(monkeypatch):
    from pipeline.core.selection import last_epoch

    monkeypatch.setitem(stage.SELECTIONS, "last", last_epoch)  # keep the last epoch, whatever val says
    drift = {}
    for ema_epochs in (0.0, 2.0):
        model = small_classifier()
        start = {key: value.clone() for key, value in model.state_dict().items()}
        fitted = fine_tune_briefly(model, ema_epochs=ema_epochs, select="last", epochs=3)
        assert fitted.kept is fitted.history[-1]
        trained = model.state_dict()
        assert (fitted.weights["head.weight"] == trained["head.weight"]).all().item() == (ema_epochs == 0)
        drift[ema_epochs] = sum(
            ((fitted.weights[key].float() - start[key].float()) ** 2).sum().item() for key in start
        )
    assert 0 < drift[2.0] < drift[0.0]


def test_interpolated_weights_lie_between_the_two_states_and_keep_the_end_s_counts():
    from pipeline.core.training import interpolated_weights

    start = {"w": torch.zeros(3), "n": torch.tensor(1)}
    end = {"w": torch.tensor([1.0, 2.0, 4.0]), "n": torch.tensor(7)}
    blend = interpolated_weights(start, end, 0.25)
    assert torch.equal(blend["w"], torch.tensor([0.25, 0.5, 1.0])) and blend["n"].item() == 7
    assert torch.equal(interpolated_weights(start, end, 1.0)["w"], end["w"])
    with pytest.raises(ValueError, match="differ in keys"):
        interpolated_weights({"w": start["w"]}, end, 0.5)


def test_interpolate_ships_the_blend_of_the_start_and_the_kept_epoch_judged_on_val(monkeypatch):
    """WiSE-FT: with the same seed, the weights of a run with interpolate 0.5 are the
    halfway point between the start and the weights the run without it kept, and its
    record holds the blend's own val scores."""
    from pipeline.core.selection import last_epoch

    monkeypatch.setitem(stage.SELECTIONS, "last", last_epoch)
    model = small_classifier()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    plain = fine_tune_briefly(model, select="last")
    model = small_classifier()
    blended = fine_tune_briefly(model, select="last", interpolate=0.5)
    assert blended.kept["interpolate"] == 0.5 and blended.kept["epoch"] == plain.kept["epoch"] == 2
    for key, value in blended.weights.items():
        if value.is_floating_point():
            assert torch.allclose(value, (start[key] + plain.weights[key]) / 2, atol=1e-6), key
    assert blended.kept["val_loss"] != plain.kept["val_loss"]


def test_a_blend_that_loses_to_the_start_on_val_ships_the_start(monkeypatch):
    model = small_classifier()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    first = iter([True])  # the kept epoch wins over the start once; the blend then loses to it
    monkeypatch.setitem(
        stage.SELECTIONS, "rigged", lambda history: history[-1] if next(first, False) else history[0]
    )
    fitted = fine_tune_briefly(model, select="rigged", epochs=1, interpolate=0.5)
    assert fitted.kept is fitted.history[0]
    assert all(torch.equal(fitted.weights[key], start[key]) for key in start)


def test_the_finetune_recipe_takes_each_value_from_params_with_bn_resolved():
    from dataclasses import asdict

    params = default_params()
    params["finetune"].update(bn="auto", interpolate=0.7, layer_decay=0.8)
    used = resolved(params["finetune"], "photo", "IMAGENET1K_V1")
    run = stage.finetune_recipe(params, used)
    assert run.bn == "frozen" and run.lr == params["lr"] and run.amp == params["amp"]
    assert (run.interpolate, run.layer_decay) == (0.7, 0.8)
    from_section = {key: value for key, value in asdict(run).items() if key not in ("lr", "amp", "bn")}
    assert from_section == {key: params["finetune"][key] for key in from_section}
