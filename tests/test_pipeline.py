"""The whole pipeline on a tiny config, in temporary git+dvc repositories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.common import STAGES
from tests.conftest import (
    ROOT,
    copy_repo,
    declared_outputs,
    make_pipeline_repo,
    ran_stages,
    read_params,
    restored_stages,
    run,
    timed,
    tiny_params,
    write_params,
)

pytestmark = pytest.mark.slow


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote, and the lock file, by path."""
    files = [repo / "dvc.lock"]
    for path in map(repo.joinpath, declared_outputs()):
        files += sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(path.relative_to(repo)): path.read_bytes() for path in files if path.is_file()}


def run_cache_commands(repo: Path) -> set[str]:
    """The stage commands that have an entry in the repository's run-cache."""
    entries = (repo / ".dvc" / "cache" / "runs").rglob("*")
    return {yaml.safe_load(entry.read_text())["cmd"] for entry in entries if entry.is_file()}


def confusion_accuracy(path: Path) -> float:
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return sum(row["actual"] == row["predicted"] for row in rows) / len(rows)


def read_back(path: Path) -> None:
    """Open an output as what its kind must be, and check it holds something: JSON a
    non-empty mapping or list, arrays images with labels, torch files our dicts of tensors,
    tables a header and rows, figures a PNG, the ONNX export a model onnx checks; a folder,
    each of its files."""
    if path.is_dir():
        files = [file for file in path.rglob("*") if file.is_file()]
        assert files, f"{path}: an empty folder"
        for file in files:
            read_back(file)
        return
    assert path.is_file() and path.stat().st_size > 0, path
    if path.name == "skipped.json":  # the unreadable images prepare skipped: none here
        assert json.loads(path.read_text()) == [], path
    elif path.suffix == ".json":
        assert isinstance(content := json.loads(path.read_text()), dict | list) and content, path
    elif path.suffix == ".npz":
        with np.load(path) as arrays:
            assert len(arrays["images"]) == len(arrays["labels"]) > 0, path
    elif path.suffix == ".pt":
        content = torch.load(path, weights_only=True)
        assert {"state_dict"} <= content.keys() or {"features", "labels", "classes"} <= content.keys(), path
    elif path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as file:
            rows = list(csv.reader(file, delimiter="\t" if path.suffix == ".tsv" else ","))
        assert len(rows) >= 2 and all(len(row) == len(rows[0]) for row in rows), path
    elif path.suffix == ".png":
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    elif path.suffix == ".onnx":
        import onnx

        onnx.checker.check_model(str(path))
    elif path.suffix == ".md":
        assert path.read_text().startswith("# "), path
    else:
        raise AssertionError(f"{path}: an output of a kind this test does not know; add it here")


def test_full_run_writes_every_declared_output_and_fills_the_run_cache(tiny_run):
    repo = tiny_run.repo
    assert sorted(ran_stages(tiny_run.output)) == sorted(STAGES)
    for path in map(repo.joinpath, declared_outputs()):
        read_back(path)
    assert run_cache_commands(repo) == {
        f"python -m pipeline.{stage}" for stage in STAGES if stage != "report"
    }
    test = json.loads((repo / "metrics/test.json").read_text())
    for model in ("linear_probe", "finetuned"):
        from_matrix = confusion_accuracy(repo / f"reports/plots/confusion_{model}.csv")
        assert test[model]["accuracy"] == pytest.approx(from_matrix, abs=1e-6)
        assert test[model]["accuracy"] > 0.2, "no better than chance (10 classes)"
    # The device each training stage computed on, in its metrics and in the report.
    assert json.loads((repo / "metrics/backbone.json").read_text())["device"] == "cpu"
    finetune = json.loads((repo / "reports/live/finetune/metrics.json").read_text())["finetune"]
    assert finetune["device"] == "cpu"
    assert (finetune["augment"], finetune["bn"], finetune["mix"]) == ("jitter", "frozen", "none")
    report = (repo / "reports/report.md").read_text()
    assert "Fine-tuned in 1 process (gloo) on cpu, pretrained in 1 process (gloo) on cpu" in report
    assert (finetune["epochs"], finetune["batch_size"]) == (2, 32)  # the tiny config's, as set
    schedule = f"{finetune['steps']} optimizer steps ({finetune['schedule']})"
    assert finetune["schedule"].endswith("; 2 epochs as set") and "batch 32 as set" in finetune["schedule"]
    recipe = f"augmentation jitter, BatchNorm frozen, mixing none, {schedule}, weights averaged over 2 epochs"
    assert f"(strategy full, {recipe} (EMA))" in report
    print(f"tiny pipeline, every stage: {tiny_run.seconds:.0f} s")


def test_recomputing_on_one_machine_gives_the_same_bits(tiny_repo, tiny_run):
    """Same params, same machine: forced reruns of the backbone's pretraining and of the
    probe write outputs bit for bit the committed run's, as dvc.lock's hashes show."""
    upstream = ["backbone", "train_head"]
    result = run(tiny_repo, "dvc", "repro", "--force", "--single-item", *upstream)
    assert sorted(ran_stages(result.stdout)) == sorted(upstream)
    recomputed = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
    committed = yaml.safe_load((tiny_run.repo / "dvc.lock").read_text())["stages"]
    for stage in upstream:  # all but the stage's wall time (metrics/time/), which differs by run
        assert untimed(recomputed[stage]) == untimed(committed[stage]), stage
        assert [out["path"] for out in recomputed[stage]["outs"]] == [
            out["path"] for out in committed[stage]["outs"]
        ]


def untimed(entry: dict) -> dict:
    """A dvc.lock entry without its stage's time file (metrics/time/<stage>.json)."""
    return {**entry, "outs": [out for out in entry["outs"] if not out["path"].startswith("metrics/time/")]}


def test_repro_after_a_full_run_reruns_nothing_and_edits_no_config(tiny_repo):
    result = run(tiny_repo, "dvc", "repro")
    assert ran_stages(result.stdout) == [] and restored_stages(result.stdout) == []
    assert (tiny_repo / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    assert run(tiny_repo, "git", "status", "--porcelain").stdout == ""


def test_queued_lr_sweep_reruns_only_finetune_onward(lr_sweep, tiny_run):
    committed = read_params(tiny_run.repo)["lr"]
    assert sorted(lr_sweep.rates.values()) == [1e-5, 1e-3]
    for name, rate in lr_sweep.rates.items():
        ran = ran_stages(lr_sweep.logs[name])
        if rate == committed:  # the committed rate: every output restored, nothing run
            assert ran == [], name
        else:
            assert ran == ["finetune", "evaluate", "export", "report"], (name, lr_sweep.logs[name])
    print(f"queued sweep of 2 rates: {lr_sweep.seconds:.0f} s")


def test_exp_show_lists_the_sweep_side_by_side_with_test_metrics(lr_sweep):
    rows = [row for row in lr_sweep.rows if row["typ"] != "baseline"]
    assert len(rows) == 2
    for row in rows:
        for column in ("finetuned.accuracy", "linear_probe.accuracy", "finetune.best_val_accuracy"):
            assert 0.0 < float(row[column]) < 1.0, (column, row)
    assert len({row["linear_probe.accuracy"] for row in rows}) == 1  # upstream restored, not rerun
    assert len({row["finetuned.accuracy"] for row in rows}) > 1  # the rate does change the model


@pytest.fixture
def applied(lr_sweep, tmp_path) -> Path:
    """A copy of the sweep's repository with the lr=1e-5 experiment applied to its workspace."""
    repo = copy_repo(lr_sweep.repo, tmp_path / "repo")
    name = next(name for name, rate in lr_sweep.rates.items() if rate == 1e-5)
    run(repo, "dvc", "exp", "apply", name)
    return repo


def test_lr_written_by_dvc_as_1e_05_is_read_as_a_number(applied):
    assert "lr: 1e-05" in (applied / "params.yaml").read_text()
    finetuned = torch.load(applied / "models/finetuned.pt", weights_only=True)
    assert finetuned["params"]["lr"] == pytest.approx(1e-5)


def test_metrics_plots_and_experiments_are_listed_and_diffed(applied):
    shown = json.loads(run(applied, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    assert {"linear_probe", "finetuned"} <= set(metrics["metrics/test.json"]["data"])
    assert "random_init_probe" in metrics["metrics/baseline.json"]["data"]
    assert "best_val_accuracy" in metrics["reports/live/finetune/metrics.json"]["data"]["finetune"]

    diff = json.loads(run(applied, "dvc", "metrics", "diff", "HEAD", "--json").stdout)
    test = diff["metrics/test.json"]
    assert {"old", "new", "diff"} <= set(test["finetuned.accuracy"])
    assert "linear_probe.accuracy" not in test  # unchanged: the probe's stage did not rerun

    plots = json.loads(run(applied, "dvc", "plots", "show", "--json").stdout)
    assert not plots.get("errors")
    live = "reports/live/finetune/plots/metrics/finetune"
    for plot in (f"{live}/val_loss.tsv", f"{live}/lr_backbone.tsv", "reports/plots/confusion_finetuned.csv"):
        assert plot in plots["data"], plot
    plots_diff = json.loads(run(applied, "dvc", "plots", "diff", "HEAD", "--json").stdout)
    assert f"{live}/val_accuracy.tsv" in plots_diff["data"]


def test_revisiting_a_rate_restores_its_run_instead_of_recomputing(applied, tiny_run):
    run(applied, "git", "checkout", "params.yaml")  # back to the committed rate
    revisit = timed(applied, "dvc", "repro")
    assert restored_stages(revisit.output) == ["finetune", "evaluate", "export"]
    assert ran_stages(revisit.output) == ["report"]  # outside the run-cache (dvc.yaml says why)
    assert snapshot(applied) == snapshot(tiny_run.repo)
    assert run(applied, "git", "status", "--porcelain").stdout == ""
    print(f"revisit: {revisit.seconds:.1f} s")


def test_bad_params_fail_before_any_work_then_checkout_restores_without_running(tiny_repo):
    before = snapshot(tiny_repo)
    params = read_params(tiny_repo)
    params["head"]["lr"] = -1
    write_params(tiny_repo, params)
    result = run(tiny_repo, "dvc", "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: params.yaml: head.lr: must be greater than 0, got -1" in output
    assert "Traceback" not in output
    assert ran_stages(result.stdout) == ["train_head"] and "train_head: val accuracy" not in output

    run(tiny_repo, "git", "checkout", "params.yaml")
    restore = timed(tiny_repo, "dvc", "repro")
    assert ran_stages(restore.output) == []
    assert restored_stages(restore.output) == ["train_head"]
    assert snapshot(tiny_repo) == before


def test_misspelt_weights_name_fails_before_any_stage_does_work(tmp_path):
    params = tiny_params()
    params["backbone"]["weights"] = "IMAGENET1K_V3"
    repo = make_pipeline_repo(tmp_path / "repo", params)
    result = run(repo, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert ran_stages(result.stdout) == ["prepare"]
    assert "backbone.weights: 'IMAGENET1K_V3' is not a weights name of resnet18" in result.stderr
    assert not (repo / "data" / "prepared").exists()


def test_pull_on_a_second_clone_restores_every_stage_without_running_it(tiny_run, tmp_path):
    remote_runs = [p for p in (tiny_run.repo.parent / "remote" / "runs").rglob("*") if p.is_file()]
    assert len(remote_runs) == len(STAGES) - 1  # `dvc push --run-cache` sent every entry

    pulled = tmp_path / "pulled"
    run(tmp_path, "git", "clone", "-q", str(tiny_run.repo), str(pulled))
    pull = timed(pulled, "dvc", "pull")
    assert run(pulled, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."
    assert ran_stages(run(pulled, "dvc", "repro").stdout) == []
    assert snapshot(pulled) == snapshot(tiny_run.repo)

    restored = tmp_path / "repro-pull"
    run(tmp_path, "git", "clone", "-q", str(tiny_run.repo), str(restored))
    repro_pull = timed(restored, "dvc", "repro", "--pull")
    assert ran_stages(repro_pull.output) == []
    assert snapshot(restored) == snapshot(tiny_run.repo)
    print(f"second clone: dvc pull {pull.seconds:.1f} s, dvc repro --pull {repro_pull.seconds:.1f} s")


def test_a_local_checkpoint_is_a_dependency_whose_bytes_rerun_the_backbone(tiny_repo):
    """backbone.weights: a file under data/weights/, which the backbone stage depends on: new
    bytes rerun the stage (the run-cache does not restore a backbone made from the old
    ones), and the backbone it writes holds the new weights; the old bytes back restore."""
    import torchvision

    checkpoint = tiny_repo / "data/weights/start.pt"
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(torchvision.models.resnet18(weights=None).state_dict())
    torch.save(states[0], checkpoint)
    params = read_params(tiny_repo)
    params["backbone"]["weights"] = "data/weights/start.pt"
    write_params(tiny_repo, params)
    assert ran_stages(run(tiny_repo, "dvc", "repro", "backbone").stdout) == ["backbone"]

    torch.save(states[1], checkpoint)
    status = json.loads(run(tiny_repo, "dvc", "status", "backbone", "--json").stdout)
    assert {"changed deps": {"data/weights": "modified"}} in status["backbone"]
    assert ran_stages(run(tiny_repo, "dvc", "repro", "backbone").stdout) == ["backbone"]
    backbone = torch.load(tiny_repo / "models/backbone.pt", weights_only=True)
    assert torch.equal(backbone["state_dict"]["conv1.weight"], states[1]["conv1.weight"])

    torch.save(states[0], checkpoint)
    result = run(tiny_repo, "dvc", "repro", "backbone")
    assert ran_stages(result.stdout) == [] and restored_stages(result.stdout) == ["backbone"]
    backbone = torch.load(tiny_repo / "models/backbone.pt", weights_only=True)
    assert torch.equal(backbone["state_dict"]["conv1.weight"], states[0]["conv1.weight"])
