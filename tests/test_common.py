import json

import pytest

from pipeline.core.common import atomic_path, write_json


def test_failed_write_leaves_the_old_file_as_it_was(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"old": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_directory_outputs_are_replaced_whole(tmp_path):
    target = tmp_path / "features"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / f"{version}.pt").write_text(version)
    assert [p.name for p in target.iterdir()] == ["new.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["features"]


def dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_a_folder_swap_killed_between_its_renames_gets_the_old_folder_back(tmp_path):
    """Killed after the old folder went aside and before the new one came in: the next
    write to that output (any run's first step) puts the old one back, then writes."""
    target = tmp_path / "features"
    aside = tmp_path / f".features.tmp-{dead_pid()}-abc" / "features.old"
    aside.mkdir(parents=True)
    (aside / "train.pt").write_text("old")
    (aside.parent / "features").mkdir()  # the new one, complete or not: dropped
    with pytest.raises(RuntimeError), atomic_path(target):
        raise RuntimeError("this run fails too")
    assert (target / "train.pt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["features"]


def test_a_folder_swap_whose_second_rename_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    from pathlib import Path

    target = tmp_path / "features"
    target.mkdir()
    (target / "train.pt").write_text("old")
    rename = Path.rename

    def failing(self, to):
        if to == target and self.name == "features":  # the new folder, not the old one back
            raise OSError("the disk said no")
        return rename(self, to)

    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "train.pt").write_text("new")
        monkeypatch.setattr(Path, "rename", failing)
    monkeypatch.undo()
    assert (target / "train.pt").read_text() == "old"


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    target = tmp_path / "finetuned.pt"
    stale = tmp_path / f".finetuned.pt.tmp-{int(dead.stdout)}-abc"
    live = tmp_path / f".finetuned.pt.tmp-{os.getpid()}-xyz"
    for leftover in (stale, live):
        (leftover / "finetuned.pt").parent.mkdir()
        (leftover / "finetuned.pt").write_text("half")
    write_json(target, {"new": 1})
    assert not stale.exists()
    assert live.exists()
    assert json.loads(target.read_text()) == {"new": 1}


def test_a_stage_in_a_git_repository_with_no_commit_fails_at_once_and_says_what_to_do(
    tmp_path, monkeypatch, capsys
):
    import subprocess

    import pytest

    from pipeline.core.entry import run_stage

    ran = []
    monkeypatch.chdir(tmp_path)
    run_stage(lambda: ran.append("outside git"), "prepare")  # no repository: nothing to check
    subprocess.run(["git", "init", "-q"], check=True)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: ran.append("no commit"), "prepare")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: this git repository has no commit yet")
    assert "git add -A && git commit -m 'Start', then dvc repro" in error
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", *identity, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    run_stage(lambda: ran.append("committed"), "prepare")
    assert ran == ["outside git", "committed"]


def device_stages() -> list[str]:
    """The stages dvc.yaml says read params' ``device`` to compute on it (report only shows it)."""
    import yaml

    from tests.conftest import ROOT

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [
        name for name, stage in stages.items() if "device" in stage.get("params", []) and name != "report"
    ]


class ReachedTheDevice(Exception):
    """Raised where a stage has resolved its device: the test has seen what it needs."""


def pretend_available(monkeypatch, device: str) -> None:
    import torch
    import torch._dynamo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: device == "mps")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)


@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("stage", device_stages())
def test_every_stage_runs_on_the_gpu_params_name_where_torch_sees_one(stage, device, tmp_path, monkeypatch):
    import importlib

    import yaml

    from pipeline.core import distributed
    from tests.conftest import default_params

    params = default_params()
    params["device"] = device
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    pretend_available(monkeypatch, device)
    found = []
    real = distributed.process_device

    def process_device(resolved, ranks):
        found.append(real(resolved, ranks))
        raise ReachedTheDevice

    monkeypatch.setattr(distributed, "process_device", process_device)
    with pytest.raises(ReachedTheDevice):  # each stage finds its device through distributed.start
        importlib.import_module(f"pipeline.{stage}").main()
    assert [d.type for d in found] == [device]


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_predict_runs_on_the_gpu_asked_for_where_torch_sees_one(device, tmp_path, monkeypatch):
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.tools import predict
    from tests.test_predict import save_classifier

    model = save_classifier(tmp_path / "finetuned.pt")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    pretend_available(monkeypatch, device)
    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.device)), None)
        if target is not None and target.type != "cpu":
            moved.append(target.type)
            raise ReachedTheDevice
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    with pytest.raises(ReachedTheDevice):
        predict.main(
            ["--model", str(model), "--device", device, "--num-workers", "0", str(tmp_path / "a.png")]
        )
    assert moved == [device]


def test_the_device_a_stage_records_names_the_gpu(monkeypatch):
    import torch

    from pipeline.core.common import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_name(torch.device("cuda", 0)) == "cuda (NVIDIA H200)"
    assert device_name(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("deterministic", [True, False])
def test_seeding_asks_for_deterministic_kernels_or_for_cudnns_fastest(deterministic):
    import torch

    from pipeline.core.common import seed_everything

    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        seed_everything(0, deterministic)
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.backends.cudnn.benchmark is not deterministic
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.backends.cudnn.benchmark = before[1]
