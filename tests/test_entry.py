import json
import subprocess
import time

import pytest

from pipeline.core.entry import run_stage


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """A git repository with one commit, as the working directory."""
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", *identity, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    return tmp_path


def test_a_stage_records_its_wall_time_and_its_start_up_apart_from_its_work(committed):
    run_stage(lambda: time.sleep(0.3), "train_head")
    timing = json.loads((committed / "metrics/time/train_head.json").read_text())["time"]["train_head"]
    assert timing["startup_seconds"] >= 0
    assert timing["seconds"] - timing["startup_seconds"] >= 0.29  # rounded to milliseconds
    assert timing["seconds"] < timing["startup_seconds"] + 5


def test_a_failed_stage_and_a_worker_process_record_no_time(committed, monkeypatch):
    def fails() -> None:
        from pipeline.core.errors import StageError

        raise StageError("data.path: nothing there")

    with pytest.raises(SystemExit):
        run_stage(fails, "prepare")
    assert not (committed / "metrics/time/prepare.json").exists()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    run_stage(lambda: None, "train_head")  # a worker: its launcher records the stage's time
    assert not (committed / "metrics/time/train_head.json").exists()


def test_start_up_counts_from_the_process_start_interpreter_and_imports_included():
    import sys

    from pipeline.core.entry import seconds_since_start

    code = (
        "import time; time.sleep(0.5); from pipeline.core.entry import seconds_since_start as s; print(s())"
    )
    later = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert 0.5 <= later < 30
    assert seconds_since_start() >= 0
