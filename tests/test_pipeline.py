"""The whole pipeline on a tiny config, in temporary git+dvc repositories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, ran_stages, run

pytestmark = pytest.mark.slow

ALL_STAGES = ["prepare", "backbone", "extract", "train_head", "finetune", "baseline", "evaluate", "report"]


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote, and the lock file, by path."""
    files = [
        repo / "dvc.lock",
        *sorted((repo / "metrics").iterdir()),
        *sorted((repo / "reports").rglob("*.*")),
    ]
    files += [*sorted((repo / "models").glob("*.pt")), *sorted((repo / "data").rglob("*.*"))]
    return {str(path.relative_to(repo)): path.read_bytes() for path in files if path.is_file()}


def test_full_run_writes_every_declared_output(tiny_run):
    for path in [
        "data/prepared/train.npz",
        "data/prepared/classes.json",
        "data/features/test.pt",
        "models/backbone.pt",
        "models/head.pt",
        "models/finetuned.pt",
        "metrics/test.json",
        "metrics/per_class.json",
        "metrics/baseline.json",
        "reports/report.md",
        "reports/figures/confusion_matrices.png",
        "reports/plots/finetune.csv",
    ]:
        assert (tiny_run / path).is_file(), path
    test = json.loads((tiny_run / "metrics/test.json").read_text())
    assert set(test) == {"linear_probe", "finetuned"}
    assert 0 <= test["finetuned"]["accuracy"] <= 1


def test_repro_after_a_full_run_reruns_nothing_and_edits_no_config(tiny_repo):
    result = run(tiny_repo, "dvc", "repro")
    assert ran_stages(result.stdout) == []
    assert (tiny_repo / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    assert run(tiny_repo, "git", "status", "--porcelain").stdout == ""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("lr=1e-4", ["finetune", "evaluate", "report"]),
        ("head.lr=0.003", ["train_head", "finetune", "baseline", "evaluate", "report"]),
    ],
)
def test_experiment_reruns_exactly_what_the_param_touches(tiny_repo, change, expected):
    result = run(tiny_repo, "dvc", "exp", "run", "-S", change)
    assert sorted(ran_stages(result.stdout)) == sorted(expected)


def test_backbone_param_leaves_prepare_alone_and_data_param_leaves_backbone_alone(tiny_repo):
    ran = ran_stages(run(tiny_repo, "dvc", "exp", "run", "-S", "backbone.pretrain_lr=0.003").stdout)
    assert "backbone" in ran and "prepare" not in ran
    ran = ran_stages(run(tiny_repo, "dvc", "exp", "run", "-S", "data.max_train_per_class=15").stdout)
    assert "prepare" in ran and "backbone" not in ran


def test_lr_written_by_dvc_as_1e_05_is_read_as_a_number(tiny_repo):
    result = run(tiny_repo, "dvc", "exp", "run", "-S", "lr=1e-5")
    assert ran_stages(result.stdout) == ["finetune", "evaluate", "report"]
    assert "lr: 1e-05" in (tiny_repo / "params.yaml").read_text()
    finetuned = torch.load(tiny_repo / "models/finetuned.pt", weights_only=True)
    assert finetuned["params"]["lr"] == pytest.approx(1e-5)


def test_same_params_give_identical_results(tiny_repo):
    before = snapshot(tiny_repo)
    result = run(tiny_repo, "dvc", "repro", "--force")
    assert ran_stages(result.stdout) == ALL_STAGES or sorted(ran_stages(result.stdout)) == sorted(ALL_STAGES)
    after = snapshot(tiny_repo)
    for name in (
        "metrics/test.json",
        "metrics/per_class.json",
        "metrics/baseline.json",
        "reports/plots/finetune.csv",
    ):
        assert after[name] == before[name], name
    assert after["dvc.lock"] == before["dvc.lock"]


def test_metrics_plots_and_experiments_are_listed_and_diffed(tiny_repo):
    shown = json.loads(run(tiny_repo, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    test = metrics["metrics/test.json"]["data"]
    assert {"linear_probe", "finetuned"} <= set(test)
    assert "random_init_probe" in metrics["metrics/baseline.json"]["data"]

    plots = run(tiny_repo, "dvc", "plots", "show", "--json").stdout
    for plot in (
        "finetune_loss",
        "finetune_accuracy",
        "head_loss",
        "confusion_finetuned",
        "confusion_linear_probe",
    ):
        assert plot in plots

    run(tiny_repo, "dvc", "exp", "run", "-S", "lr=0.01")
    diff = run(tiny_repo, "dvc", "metrics", "diff", "HEAD", "--json").stdout
    assert "finetuned.accuracy" in diff or "finetuned" in diff
    plots_diff = run(tiny_repo, "dvc", "plots", "diff", "HEAD", "--json").stdout
    assert "finetune_loss" in plots_diff
    table = run(tiny_repo, "dvc", "exp", "show", "--csv").stdout
    header = table.splitlines()[0]
    assert "finetuned.accuracy" in header and "linear_probe.accuracy" in header and "lr" in header


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("head", "lr", -1, "params.yaml: head.lr: must be greater than 0"),
        ("head", "epochz", 3, "params.yaml: head.epochz: unknown key; allowed keys in head:"),
        ("finetune", "epochs", "many", "params.yaml: finetune.epochs: expected a whole number"),
        ("backbone", "arch", "resnet19", "params.yaml: backbone.arch: unknown architecture 'resnet19'"),
        ("data", "dataset", "mnist", "params.yaml: data.dataset: unknown value 'mnist'; choose one of"),
        (None, "lr", 0, "params.yaml: lr: must be greater than 0"),
    ],
)
def test_bad_params_fail_before_any_work_and_keep_the_last_good_run(tiny_repo, section, key, value, message):
    before = snapshot(tiny_repo)
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    (params[section] if section else params)[key] = value
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(tiny_repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(tiny_repo) == before


def test_own_image_folder_tracked_with_dvc_add_runs_and_reruns_when_images_change(tiny_repo):
    from tests.test_images import make_tree

    make_tree(tiny_repo / "data" / "raw" / "images", classes=("cat", "dog"), per_class=3)
    run(tiny_repo, "dvc", "add", "data/raw/images")
    run(tiny_repo, "git", "add", "-A")
    run(tiny_repo, "git", "commit", "-q", "-m", "images")
    changes = [
        "data.dataset=imagefolder",
        "data.path=data/raw/images",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "backbone.weights=none",
    ]
    result = run(tiny_repo, "dvc", "exp", "run", *[arg for change in changes for arg in ("-S", change)])
    assert ran_stages(result.stdout)[0] == "prepare"
    assert json.loads((tiny_repo / "data/prepared/classes.json").read_text()) == ["cat", "dog"]
    assert run(tiny_repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."

    (tiny_repo / "data/raw/images/cat/0_grey.png").unlink()
    status = run(tiny_repo, "dvc", "status", "--json").stdout
    assert "prepare" in json.loads(status)
