"""Resume: a training stage stopped after an epoch goes on from it and ends with the weights of
a run that was never stopped; state made by other params or code is never read."""

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.core import resume
from pipeline.core.models import Classifier
from tests.conftest import (
    fine_tune_briefly,
    ran_stages,
    read_params,
    run,
    start_in,
    subprocess_env,
    write_params,
)


class Stop(Exception):
    """What the test raises to stop a run after an epoch, as kill -9 would."""


def classifier_with_dropout() -> Classifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return Classifier(backbone, nn.Sequential(nn.Dropout(0.3), nn.Linear(4, 3)))


def stop_after(epoch: int):
    def on_epoch(record: dict[str, float]) -> None:
        if record["epoch"] == epoch:
            raise Stop

    return on_epoch


def test_a_fit_stopped_after_an_epoch_resumes_to_the_weights_of_one_never_stopped(
    tmp_path, monkeypatch, capsys
):
    """Warmup, cosine schedule, moving average and dropout (the random state) all carry over."""
    monkeypatch.setenv(resume.DIR_VARIABLE, str(tmp_path))
    recipe = dict(epochs=4, warmup_epochs=1, ema_epochs=1.5, weight_decay=0.01)
    whole = fine_tune_briefly(classifier_with_dropout(), **recipe)

    saved = resume.Resume("finetune", "a" * 64)
    with pytest.raises(Stop):
        fine_tune_briefly(classifier_with_dropout(), **recipe, resume_from=saved, on_epoch=stop_after(2))
    assert saved.path.is_file()
    torch.manual_seed(123)  # whatever the process did before: the saved random state wins
    logged = []
    resumed = fine_tune_briefly(
        classifier_with_dropout(), **recipe, resume_from=saved, on_epoch=logged.append
    )

    assert "finetune: resumed from epoch 2 of 4" in capsys.readouterr().out
    assert [record["epoch"] for record in logged] == [1, 2, 3, 4]  # the log is whole again
    assert resumed.history == whole.history
    assert resumed.kept == whole.kept
    assert all(torch.equal(resumed.weights[name], whole.weights[name]) for name in whole.weights)


def test_state_is_read_only_under_its_own_key_and_only_by_its_own_stage(tmp_path, monkeypatch):
    monkeypatch.setenv(resume.DIR_VARIABLE, str(tmp_path))
    resume.Resume("finetune", "a" * 64).save({"epoch": 1})
    assert resume.Resume("finetune", "a" * 64).load()["epoch"] == 1
    assert resume.Resume("finetune", "b" * 64).load() is None
    monkeypatch.setenv(resume.KEY_VARIABLE, "finetune:" + "a" * 64)
    assert resume.for_stage("finetune").key == "a" * 64
    assert resume.for_stage("backbone") is None  # a key handed down for another stage
    monkeypatch.delenv(resume.KEY_VARIABLE)
    assert resume.for_stage("finetune") is None  # main() called from Python: no resume


def test_the_key_follows_the_stage_s_params_and_deps_as_dvc_sees_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = subprocess_env()
    subprocess.run(["git", "init", "-q"], check=True, env=env)
    subprocess.run(["dvc", "init", "-q"], check=True, env=env)
    Path("params.yaml").write_text("lr: 0.1\nother: 1\n")
    Path("code.py").write_text("print(1)\n")
    Path("dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python code.py\n    deps: [code.py]\n    params: [lr]\n    outs: [out]\n"
    )
    first = resume.stage_key("train")
    assert first and first == resume.stage_key("train")
    Path("params.yaml").write_text("lr: 0.1\nother: 2\n")  # a param the stage does not declare
    assert resume.stage_key("train") == first
    Path("params.yaml").write_text("lr: 0.2\nother: 2\n")
    second = resume.stage_key("train")
    assert second != first
    Path("code.py").write_text("print(2)\n")
    assert resume.stage_key("train") not in (first, second)
    monkeypatch.chdir(tmp_path.parent)
    assert resume.stage_key("train") is None  # outside a DVC repository


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_after_first_epoch(repo: Path) -> str:
    """Start `dvc repro -s finetune`, kill -9 it and its stage once an epoch is logged (so
    saved); what it printed."""
    log = repo / "reports/live/finetune/plots/metrics/finetune/val_loss.tsv"
    log.unlink(missing_ok=True)
    repro = start_in(repo, "dvc", "repro", "-s", "finetune")
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert repro.poll() is None and time.monotonic() < deadline, repro.stdout.read()
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    return repro.communicate(timeout=60)[0]


@pytest.mark.slow
def test_a_killed_dvc_repro_resumes_finetune_and_ends_with_the_uninterrupted_weights(tiny_repo):
    """kill -9 of a local `dvc repro` mid-finetune: the rerun resumes from the last finished
    epoch and writes, bit for bit, what an uninterrupted run writes. A param changed between
    the kill and the rerun starts the stage over."""
    params = read_params(tiny_repo)
    params["finetune"]["epochs"] = 4
    write_params(tiny_repo, params)
    states = tiny_repo / resume.DEFAULT_DIR

    kill_after_first_epoch(tiny_repo)
    assert len(list(states.glob("finetune-*.pt"))) == 1
    params["lr"] = 0.002
    write_params(tiny_repo, params)
    other = run(tiny_repo, "dvc", "repro", "-s", "finetune").stdout
    assert ran_stages(other) == ["finetune"] and "resumed" not in other
    assert len(list(states.glob("finetune-*.pt"))) == 1  # the killed run's, kept for its params

    params["lr"] = 0.001
    write_params(tiny_repo, params)
    resumed = run(tiny_repo, "dvc", "repro", "-s", "finetune").stdout
    assert ran_stages(resumed) == ["finetune"]
    assert "finetune: resumed from epoch " in resumed
    assert not list(states.glob("finetune-*.pt"))  # deleted once the stage succeeded
    weights = sha256(tiny_repo / "models/finetuned.pt")
    log = (tiny_repo / "reports/live/finetune/plots/metrics/finetune/val_loss.tsv").read_text()
    assert [row.split("\t")[0] for row in log.splitlines()[1:]] == ["1", "2", "3", "4"]

    whole = run(tiny_repo, "dvc", "repro", "-f", "-s", "finetune").stdout
    assert "resumed" not in whole
    assert sha256(tiny_repo / "models/finetuned.pt") == weights
    assert (tiny_repo / "reports/live/finetune/plots/metrics/finetune/val_loss.tsv").read_text() == log


def test_glyph_pretraining_saves_its_state_under_the_backbone_stage_s_key(tmp_path, monkeypatch, capsys):
    """The backbone stage's pretraining resumes as finetune does: a second call finds the
    state of the first's last epoch and gives back its weights without training again."""
    from pipeline.core.distributed import Ranks
    from pipeline.modalities.images.glyphs import pretrain_on_glyphs

    monkeypatch.setenv(resume.DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv(resume.KEY_VARIABLE, "backbone:" + "c" * 64)
    settings = ("resnet18", 16, 40, 2, 0.01, 16, 0, torch.device("cpu"), "off", Ranks())
    first, _, accuracy = pretrain_on_glyphs(*settings)
    (state,) = tmp_path.glob("backbone-*.pt")
    assert torch.load(state, weights_only=True)["epoch"] == 2
    again, _, again_accuracy = pretrain_on_glyphs(*settings)
    assert "backbone: resumed from epoch 2 of 2" in capsys.readouterr().out
    assert again_accuracy == accuracy
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    )
