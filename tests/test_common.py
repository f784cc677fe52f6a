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
    run_stage(lambda: ran.append("outside git"))  # no repository: nothing to check
    subprocess.run(["git", "init", "-q"], check=True)
    with pytest.raises(SystemExit) as exit_info:
        run_stage(lambda: ran.append("no commit"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: this git repository has no commit yet")
    assert "git add -A && git commit -m 'Start', then dvc repro" in error
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", *identity, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    run_stage(lambda: ran.append("committed"))
    assert ran == ["outside git", "committed"]
