"""python -m pipeline launch: experiments as Slurm jobs, each in its own clone, on a real
two-node Slurm (tests/conftest.py's ``slurm``); what it refuses before submitting."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.errors import ParamsError, StageError
from pipeline.tools import launch
from tests.conftest import (
    ACTIVE_JOB_STATES,
    copy_repo,
    default_params,
    experiments,
    job_state,
    ran_stages,
    read_params,
    restored_stages,
    run,
    start_in,
    write_params,
)

# --- what a launch refuses, and what it writes: no Slurm needed ---------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A committed clone with the default params, pushed to a bare git remote, with a
    folder as its default DVC remote; the working directory."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_params(repo, default_params())
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "remote", "add", "-d", "storage", str(tmp_path / "dvc-remote"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "start")
    run(repo, "git", "init", "-q", "--bare", "--initial-branch=main", str(tmp_path / "origin.git"))
    run(repo, "git", "remote", "add", "origin", str(tmp_path / "origin.git"))
    run(repo, "git", "push", "-q", "origin", "main")
    monkeypatch.chdir(repo)
    return repo


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_sweeps_expand_as_dvc_expands_them_into_ref_safe_names():
    grid = launch.expand(["lr=0.001,0.0003", "seed=1,2"])
    assert grid == [
        ["lr=0.001", "seed=1"],
        ["lr=0.001", "seed=2"],
        ["lr=0.0003", "seed=1"],
        ["lr=0.0003", "seed=2"],
    ]
    assert launch.expand([]) == [[]]
    for overrides in (*grid, ["backbone.arch=sentence-transformers/all-MiniLM-L6-v2"], []):
        name = launch.experiment_name(overrides, "0a1b")
        checked = subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], check=False)
        assert checked.returncode == 0, name


def test_dry_run_of_a_two_node_gpu_job_prints_its_sbatch_script(project, capsys):
    launch.main(
        [
            "-S",
            "distributed.nnodes=2",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--time",
            "04:00:00",
            "--dry-run",
        ]
    )
    script = capsys.readouterr().out
    name = re.search(r"--job-name=(\S+)", script).group(1)
    assert name.startswith("distributed.nnodes-2-")
    work = project / ".dvc/tmp/slurm"
    assert sbatch_lines(script) == [
        f"--job-name={name}",
        f"--output={work}/logs/{name}-%j.out",
        "--open-mode=append",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--partition=gpu",
        "--time=04:00:00",
        "--gpus-per-node=8",
        "--requeue",
    ]
    assert (
        "#   srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --relative=1 --kill-on-bad-exit=1 "
        "python -m pipeline.<stage>"
    ) in script
    commit = run(project, "git", "rev-parse", "HEAD").stdout.strip()
    assert f'git -C "$workspace" checkout --quiet {commit}' in script
    assert f"dvc exp run --pull --name {name} -S distributed.nnodes=2\n" in script
    assert f"dvc exp push --force origin {name}\npython -m pipeline push-runs" in script
    assert f"export PIPELINE_RESUME_DIR={work}/resume\n" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    assert not work.exists()  # nothing written, nothing submitted


def test_the_launch_section_s_setup_lines_and_sbatch_options_go_into_the_script(project, capsys):
    params = default_params()
    params["launch"].update(
        sbatch=["--qos=high"], setup=["module load cuda/12.4"], requeue=False, account="ml"
    )
    write_params(project, params)
    run(project, "git", "commit", "-qam", "cluster settings")
    run(project, "git", "push", "-q", "origin", "main")
    launch.main(["--dry-run"])
    script = capsys.readouterr().out
    lines = sbatch_lines(script)
    assert "--account=ml" in lines and lines[-1] == "--qos=high" and "--requeue" not in lines
    assert script.index("module load cuda/12.4") < script.index("step clone")
    assert "dvc exp run --pull --name committed-" in script


def uncommitted(repo: Path) -> None:
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n# changed\n")


def unpushed(repo: Path) -> None:
    uncommitted(repo)
    run(repo, "git", "commit", "-qam", "not pushed")


def no_git_remote(repo: Path) -> None:
    run(repo, "git", "remote", "remove", "origin")


def no_dvc_remote(repo: Path) -> None:
    run(repo, "dvc", "remote", "remove", "storage")
    run(repo, "git", "commit", "-qam", "no DVC remote")
    run(repo, "git", "push", "-q", "origin", "main")


@pytest.mark.parametrize(
    ("breaks", "args", "error", "message"),
    [
        (uncommitted, [], StageError, "uncommitted changes (params.yaml), which the jobs would not see"),
        (unpushed, [], StageError, "is not on the git remote origin, so the jobs cannot check it out; push"),
        (no_git_remote, [], ParamsError, "launch.git_remote: 'origin' is no git remote of this clone"),
        (no_dvc_remote, [], StageError, "no default DVC remote"),
        (
            None,
            ["-S", "finetune.epoch=3"],
            ParamsError,
            "finetune.epoch: unknown key (did you mean 'epochs'?)",
        ),
        (None, ["-S", "lr=0"], ParamsError, "-S lr=0: lr: must be greater than 0, got 0"),
        (
            None,
            ["-S", "finetune.epochs=2", "-S", "lr=1,0"],
            ParamsError,
            "-S finetune.epochs=2 lr=0: lr: must be greater than 0",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_submitted(project, breaks, args, error, message):
    if breaks is not None:
        breaks(project)
    with pytest.raises(error) as raised:
        launch.main([*args, "--dry-run"])
    assert message in str(raised.value)
    assert not (project / ".dvc/tmp/slurm").exists()


def test_outside_the_project_s_root_it_names_the_missing_params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=r"params.yaml: not found; run launch in the project's root"):
        launch.main(["--dry-run"])


def test_without_sbatch_on_the_path_it_says_so_and_submits_nothing(project, tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(StageError, match="sbatch not found on the PATH; run this on a machine that submits"):
        launch.main(["-S", "lr=0.01"])
    assert not (project / ".dvc/tmp/slurm").exists()


# --- on a real two-node Slurm -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_clone(tiny_run, slurm, tmp_path_factory) -> Path:
    """A user's clone of the tiny run: origin a bare repository, its own DVC remote (a folder
    holding the tiny run's push), both reached by the jobs."""
    root = tmp_path_factory.mktemp("launch")
    repo = copy_repo(tiny_run.repo, root / "repo")
    shutil.copytree(tiny_run.repo.parent / "remote", root / "dvc-remote")
    run(repo, "dvc", "remote", "modify", "storage", "url", str(root / "dvc-remote"))
    run(repo, "git", "commit", "-qam", "Its own DVC remote")
    run(repo, "git", "init", "-q", "--bare", "--initial-branch=main", str(root / "origin.git"))
    run(repo, "git", "remote", "add", "origin", str(root / "origin.git"))
    run(repo, "git", "push", "-q", "origin", "main")
    return repo


def submit(repo: Path, *args: str) -> dict[str, str]:
    """Launch; each experiment's job id, by name."""
    output = run(repo, sys.executable, "-m", "pipeline", "launch", *args).stdout
    return {name: job for job, name in re.findall(r"launch: job (\d+): experiment (\S+);", output)}


def job_log(repo: Path, name: str, job: str) -> str:
    return (repo / ".dvc/tmp/slurm/logs" / f"{name}-{job}.out").read_text()


def wait_for(repo: Path, jobs: dict[str, str], timeout: float = 600) -> dict[str, str]:
    """Wait until every job has ended; each one's log, by name (all completed)."""
    deadline = time.monotonic() + timeout
    while set(states := [job_state(job) for job in jobs.values()]) & set(ACTIVE_JOB_STATES):
        assert time.monotonic() < deadline, dict(zip(jobs, states, strict=True))
        time.sleep(0.5)
    logs = {name: job_log(repo, name, job) for name, job in jobs.items()}
    for name, job in jobs.items():
        assert job_state(job) == "COMPLETED", logs[name]
    return logs


def copy_without_jobs(repo: Path, target: Path) -> Path:
    """A copy of the user's clone, less the jobs' clones and logs under .dvc/tmp/slurm."""
    return Path(shutil.copytree(repo, target, symlinks=True, ignore=shutil.ignore_patterns("slurm")))


def exp_file(repo: Path, name: str, path: str) -> str:
    """A file of experiment ``name`` as its git ref holds it (pulled from origin if a job
    pushed it)."""
    refs = run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    if not any(ref.endswith(f"/{name}") for ref in refs):
        run(repo, "dvc", "exp", "pull", "origin", name)
        refs = run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    (ref,) = [ref for ref in refs if ref.endswith(f"/{name}")]
    return run(repo, "git", "show", f"{ref}:{path}").stdout


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs_and_comes_back_as_dvc_exp_run_makes_it(cluster_clone, tmp_path):
    """Two jobs, each in its own clone; `dvc exp pull origin` brings both back, each with
    the metrics `dvc exp run` of its params gives here. The committed rate's job and a job
    resubmitted after its params ran run no stage: they restore from the cache."""
    repo = cluster_clone
    jobs = submit(repo, "-S", "lr=0.001,0.0003")
    assert len(jobs) == 2
    here = start_in(
        repo, "dvc", "exp", "run", "--temp", "--name", "here-0.0003", "-S", "lr=0.0003"
    )  # beside the jobs
    logs = wait_for(repo, jobs)
    rate = {name: name.split("-")[1] for name in jobs}
    (committed,) = [name for name in jobs if rate[name] == "0.001"]
    assert ran_stages(logs[committed]) == [] and restored_stages(logs[committed]) == []
    for name in jobs:
        assert f"Pushed experiment {name}" in logs[name].replace("\n", " ")

    teammate = tmp_path / "teammate"  # submits params a job has run: restored, not run
    run(tmp_path, "git", "clone", "-q", str(repo.parent / "origin.git"), str(teammate))
    again = submit(teammate, "-S", "lr=0.0003")
    assert here.wait(timeout=600) == 0, here.stdout.read()
    run(repo, "dvc", "exp", "pull", "origin")
    listed = {row["Experiment"] for row in experiments(repo)}
    assert set(jobs) <= listed
    for name in jobs:
        if name != committed:
            local = json.loads(exp_file(repo, f"here-{rate[name]}", "metrics/test.json"))
            assert json.loads(exp_file(repo, name, "metrics/test.json")) == local, name

    log = wait_for(teammate, again)[next(iter(again))]
    assert restored_stages(log) == ["finetune", "evaluate", "export"]
    assert ran_stages(log) == ["report"]  # outside the run-cache (dvc.yaml says why)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_requeued_job_resumes_finetune_and_ends_with_the_uninterrupted_weights(cluster_clone, tmp_path):
    repo = cluster_clone
    ((name, job),) = submit(repo, "-S", "finetune.epochs=4").items()
    workspace = repo / ".dvc/tmp/slurm" / name
    here = copy_without_jobs(repo, tmp_path / "here")  # the stage, never stopped, on this machine
    params = read_params(here)
    params["finetune"]["epochs"] = 4
    write_params(here, params)
    uninterrupted = start_in(here, "dvc", "repro", "-s", "finetune")
    saved = repo / ".dvc/tmp/slurm/resume"  # a state here: an epoch of finetune has finished
    deadline = time.monotonic() + 300
    while not list(saved.glob("finetune-*.pt")):
        assert job_state(job) in ("PENDING", "RUNNING"), job_log(repo, name, job)
        assert time.monotonic() < deadline, job_log(repo, name, job)
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    while job_state(job) in ("RUNNING", "COMPLETING"):  # until Slurm has stopped the first run
        time.sleep(0.1)
    (workspace / ".dvc/tmp/rwlock").write_text("")  # the worst a kill leaves: DVC's lock emptied
    log = wait_for(repo, {name: job})[name]
    restart = log.split("launch: restart 1: going on in")
    assert len(restart) == 2, log
    assert re.search(r"finetune: resumed from epoch [123] of 4", restart[1]), log
    assert not list(saved.glob("finetune-*.pt"))  # deleted once the stage succeeded

    output = uninterrupted.communicate(timeout=600)[0]
    assert ran_stages(output) == ["finetune"] and "resumed" not in output, output
    assert sha256(workspace / "models/finetuned.pt") == sha256(here / "models/finetuned.pt")


@pytest.mark.slow
def test_a_two_node_experiment_runs_as_one_job_over_both_nodes(cluster_clone, tmp_path):
    repo = cluster_clone
    ((name, job),) = submit(repo, "-S", "distributed.nnodes=2").items()
    log = wait_for(repo, {name: job})[name]
    for stage in ("backbone", "finetune"):
        for node in (0, 1):
            assert f"{stage}: 2 processes (1 here on node {node} of 2, gloo)" in log, log
    assert log.count("distributed: starting nodes 1 to 1 through srun") == 2
    two = json.loads(exp_file(repo, name, "metrics/test.json"))

    # One process fine-tunes the very backbone and probe the two nodes started from (the
    # glyph pretraining also ran over both nodes, so its backbone is not the committed one).
    here = copy_without_jobs(repo, tmp_path / "here")
    run(here, "dvc", "exp", "apply", name)
    run(here, "dvc", "pull")
    params = read_params(here)
    params["distributed"]["nnodes"] = 1
    write_params(here, params)
    assert ran_stages(run(here, "dvc", "repro", "-s", "finetune").stdout) == ["finetune"]
    run(here, "dvc", "repro", "-s", "evaluate")
    one = json.loads((here / "metrics/test.json").read_text())
    print(f"test accuracy, 1 process {one['finetuned']['accuracy']}, 2 nodes {two['finetuned']['accuracy']}")
    assert abs(two["finetuned"]["accuracy"] - one["finetuned"]["accuracy"]) <= 0.01


@pytest.mark.slow
def test_a_partition_slurm_does_not_know_is_refused_naming_those_it_does(cluster_clone):
    result = run(
        cluster_clone, sys.executable, "-m", "pipeline", "launch", "--partition", "gpus", check=False
    )
    assert result.returncode == 2
    assert "launch.partition: Slurm knows no partition 'gpus'; sinfo lists: debug" in result.stderr
