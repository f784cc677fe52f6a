"""Benchmark: an experiment through Slurm against the same experiment run here, in one run.

In a temporary git+dvc repository of the tests' tiny config (its run committed, pushed to a
bare git remote and a folder DVC remote), on the two-node Slurm $SLURM_CONF names (else one
started here with .ci/slurm), it times:

1. `dvc exp run -S lr=0.0003` here, until `dvc exp show` lists it;
2. `python -m pipeline launch -S lr=0.0005` (the same work: finetune onward), until the job
   has ended and `dvc exp pull origin` + `dvc exp show` list it here;
3. a job requeued after its first fine-tuning epoch: from its restart (which Slurm holds back
   for as long as job credentials live: 10 s on .ci/slurm's cluster, 120 s by default) to
   the line saying finetune resumed, and the whole restart.

Run from the repository root: ``python -m benchmarks.slurm``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import results
from benchmarks.run_cache import make_repo, sh
from tests.conftest import (  # the tests' tiny config and Slurm helpers
    ACTIVE_JOB_STATES,
    job_state,
    tiny_params,
)

ROOT = results.ROOT
NAME = "slurm"


def listed(repo: Path, name: str) -> bool:
    rows = csv.DictReader(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv")))
    return any(row["Experiment"] == name for row in rows)


def launch(repo: Path, *sets: str) -> tuple[str, str]:
    """Submit one experiment; its name and job id."""
    output = sh(repo, sys.executable, "-m", "pipeline", "launch", *sets)
    job, name = re.search(r"launch: job (\d+): experiment (\S+);", output).groups()
    return name, job


def wait_until(predicate, timeout: float = 900, every: float = 0.1) -> float:
    """Poll ``predicate`` until it holds; when it did (perf_counter)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit("slurm benchmark: timed out")
        time.sleep(every)
    return time.perf_counter()


def resumed_from(log: Path) -> str:
    return re.search(r"finetune: resumed from epoch (\d+) of", log.read_text()).group(1)


def ended(job: str) -> bool:
    return job_state(job) not in ACTIVE_JOB_STATES


def measure(repo: Path) -> list[dict]:
    rows = []
    start = time.perf_counter()
    sh(repo, "dvc", "exp", "run", "--temp", "--name", "here", "-S", "lr=0.0003")
    assert listed(repo, "here")
    rows.append(
        {
            "step": "`dvc exp run -S lr=0.0003` here, until `dvc exp show` lists it",
            "seconds": round(time.perf_counter() - start, 1),
        }
    )

    start = time.perf_counter()
    name, job = launch(repo, "-S", "lr=0.0005")
    wait_until(lambda: ended(job), every=0.5)
    sh(repo, "dvc", "exp", "pull", "origin", name)
    assert listed(repo, name) and job_state(job) == "COMPLETED"
    rows.append(
        {
            "step": "`python -m pipeline launch -S lr=0.0005`, until `dvc exp pull origin` and "
            "`dvc exp show` list it here",
            "seconds": round(time.perf_counter() - start, 1),
        }
    )

    name, job = launch(repo, "-S", "finetune.epochs=6")
    log = repo / ".dvc/tmp/slurm/logs" / f"{name}-{job}.out"
    saved = repo / ".dvc/tmp/slurm/resume"
    wait_until(lambda: any(saved.glob("finetune-*.pt")))
    subprocess.run(["scontrol", "requeue", job], check=True)
    restarted = wait_until(lambda: "launch: restart 1" in log.read_text())
    resumed = wait_until(lambda: "finetune: resumed from epoch" in log.read_text())
    done = wait_until(lambda: ended(job), every=0.5)
    assert job_state(job) == "COMPLETED", log.read_text()
    rows.append(
        {
            "step": "a job requeued during fine-tuning: from its restart to "
            f"`finetune: resumed from epoch {resumed_from(log)} of 6`",
            "seconds": round(resumed - restarted, 1),
        }
    )
    rows.append(
        {
            "step": "the same requeued job: from its restart to its end (the epochs left, then "
            "evaluate, export, report, push)",
            "seconds": round(done - restarted, 1),
        }
    )
    return rows


def start_slurm(state: Path) -> None:
    """Use the Slurm $SLURM_CONF names if it answers, else start the two-node one of .ci/slurm."""
    answers = os.environ.get("SLURM_CONF") and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    if not answers:
        subprocess.run(["bash", str(ROOT / ".ci/slurm"), "start", str(state)], check=True)
        os.environ["SLURM_CONF"] = str(state / "slurm.conf")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start_slurm(work / "slurm")
        repo = work / "repo"
        make_repo(repo, tiny_params())
        sh(repo, "dvc", "repro")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-q", "-m", "run")
        sh(repo, "dvc", "push", "--run-cache")
        sh(work, "git", "init", "-q", "--bare", str(work / "origin.git"))
        sh(repo, "git", "remote", "add", "origin", str(work / "origin.git"))
        sh(repo, "git", "push", "-q", "origin", "main")
        try:
            rows = measure(repo)
        finally:
            if (work / "slurm").is_dir():
                subprocess.run(["bash", str(ROOT / ".ci/slurm"), "stop", str(work / "slurm")], check=False)
        shutil.rmtree(repo / ".dvc/tmp/slurm", ignore_errors=True)
    print(table(results.save(NAME, "python -m benchmarks.slurm", rows)))


def table(record: dict) -> str:
    rows = record["results"]
    lines = ["| tiny config, two-node Slurm on this machine | seconds |", "|---|---:|"]
    lines += [f"| {row['step']} | {row['seconds']:.1f} |" for row in rows]
    here, slurm = rows[0]["seconds"], rows[1]["seconds"]
    lines += ["", f"Through Slurm the same experiment took {slurm / here:.2f}x the time it took here."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
