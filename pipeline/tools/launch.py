"""Each experiment a Slurm job: ``python -m pipeline launch -S lr=0.001,0.0003``.

DVC's queue runs on one machine, so on a cluster every experiment becomes one sbatch job
that works in a clone of its own (parallel ``dvc exp run`` in one repository conflict on
its lock): the job clones the committed state from the git remote, pulls DVC's run-cache
and whatever the DVC remote holds, runs ``dvc exp run --pull -S ...`` (every stage already run,
here or by a teammate, is restored instead of recomputed), then pushes the experiment to
the git remote and its outputs and run-cache to the DVC remote (``python -m pipeline
push-runs``, which sends what a restore needs that ``dvc push --run-cache`` leaves out).
``dvc exp pull origin`` and ``dvc exp show`` then list every job's experiment where you are.

``-S`` takes DVC's sweep syntax (``lr=0.001,0.0003`` is two experiments; several ``-S``
make a grid), expanded by DVC's own code. The job options come from params.yaml's
``launch`` section, each overridable by a flag; ``distributed.nnodes`` above 1 asks Slurm
for that many nodes, and the training stages span them (pipeline.core.distributed starts
the other nodes' launchers through srun). A requeued or preempted job reuses its clone and
its stages' cache, and the training stages resume from their last finished epoch
(pipeline.core.resume; the state lives under ``<work_dir>/resume``).

Everything that would make a job fail at once is checked before anything is submitted:
sbatch on the PATH, the partition (asked of sinfo), the git remote and the commit on it,
uncommitted changes, the DVC remote, every experiment's params.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.distributed import other_nodes_command
from pipeline.core.entry import run_tool
from pipeline.core.errors import ParamsError, StageError
from pipeline.core.params import PARAMS_FILE

JOBS_DIR, LOGS_DIR, RESUME_DIR = "jobs", "logs", "resume"
FLAGS = ("partition", "account", "time", "cpus_per_task", "gpus_per_node", "mem")


@dataclass(frozen=True)
class Repository:
    """What each job clones and where it sends its results."""

    root: Path
    git_remote: str
    url: str
    commit: str
    dvc_remote: str
    dvc_remote_url: str


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: list[str]
    nnodes: int


def git(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def expand(sets: list[str]) -> list[list[str]]:
    """The experiments ``-S`` asks for, as DVC expands them: each a list of ``key=value``;
    one with none where no ``-S`` is given (the committed params)."""
    if not sets:
        return [[]]
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import get_hydra_sweeps

    try:
        sweeps = get_hydra_sweeps({str(PARAMS_FILE): sets})
    except (InvalidArgumentError, ValueError) as error:
        raise ParamsError(f"-S {' '.join(sets)}: {error}") from None
    return [sweep[str(PARAMS_FILE)] for sweep in sweeps]


def with_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``params`` (params.yaml as read) with ``key.sub=value`` overrides set, values read as
    YAML reads them, as ``dvc exp run -S`` writes them."""
    changed = yaml.safe_load(yaml.safe_dump(params))
    for override in overrides:
        key, _, value = override.partition("=")
        *parents, leaf = key.split(".")
        section = changed
        for parent in parents:
            if not isinstance(section.get(parent), dict):
                raise ParamsError(f"-S {override}: {parent!r} of {key} is no section of params.yaml")
            section = section[parent]
        section[leaf] = yaml.safe_load(value) if value else value
    return changed


def checked_params(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """An experiment's params, validated as its stages will validate them."""
    from pipeline.modalities import load_params

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(yaml.safe_dump(with_overrides(params, overrides), sort_keys=False))
        try:
            return load_params(path)
        except ParamsError as error:
            where = f"-S {' '.join(overrides)}" if overrides else str(PARAMS_FILE)
            raise ParamsError(f"{where}: {str(error).removeprefix(f'{path}: ')}") from None


def experiment_name(overrides: list[str], suffix: str) -> str:
    """A name DVC and git take (a ref name), saying what the experiment changes."""
    words = "_".join(override.replace("=", "-") for override in overrides) or "committed"
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', words).strip('-.')[:80]}-{suffix}"


def check_repository(git_remote: str) -> Repository:
    """The committed state a job can clone, or an error naming what would stop it."""
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise StageError("launch: not inside a git repository; run it in the project's clone")
    root = Path(top.stdout.strip())
    changed = git("status", "--porcelain", "--untracked-files=no", cwd=root).stdout.splitlines()
    if changed:
        files = ", ".join(line[3:] for line in changed[:5])
        raise StageError(
            f"launch: uncommitted changes ({files}{', ...' if len(changed) > 5 else ''}), which the jobs "
            "would not see (they clone the commit); commit and push them, or stash them"
        )
    url = git("remote", "get-url", git_remote, cwd=root)
    if url.returncode != 0:
        known = git("remote", cwd=root).stdout.split()
        raise ParamsError(
            f"launch.git_remote: {git_remote!r} is no git remote of this clone (it has: "
            f"{', '.join(known) or 'none'}); the jobs clone from it: git remote add {git_remote} <url>"
        )
    address = url.stdout.strip()
    if "://" not in address and ":" not in address.split("/")[0] and Path(root, address).exists():
        address = str(Path(root, address).resolve())
    commit = git("rev-parse", "HEAD", cwd=root).stdout.strip()
    fetched = git("fetch", "--quiet", git_remote, cwd=root)
    if fetched.returncode != 0:
        raise StageError(
            f"launch: cannot reach the git remote {git_remote} ({address}): {fetched.stderr.strip()}"
        )
    if not git(
        "branch", "--remotes", "--contains", commit, "--list", f"{git_remote}/*", cwd=root
    ).stdout.strip():
        raise StageError(
            f"launch: commit {commit[:9]} is not on the git remote {git_remote}, so the jobs cannot "
            f"check it out; push it first: git push {git_remote} HEAD"
        )
    dvc_remote, dvc_url = default_dvc_remote(root)
    return Repository(root, git_remote, address, commit, dvc_remote, dvc_url)


def default_dvc_remote(root: Path) -> tuple[str, str]:
    """The DVC remote the jobs pull from and push to: its name and URL (a local folder's
    absolute path)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        remotes = repo.config["remote"]
    if not name or name not in remotes:
        raise StageError(
            "launch: no default DVC remote, where the jobs would find what has run and send "
            "what they run; add one the nodes reach: dvc remote add -d storage <url>"
        )
    return name, remotes[name]["url"]


def check_slurm(partition: str) -> None:
    """sbatch to submit with, and the partition, if one is named, known to Slurm."""
    if shutil.which("sbatch") is None:
        raise StageError(
            "launch: sbatch not found on the PATH; run this on a machine that submits Slurm jobs "
            "(a login node; `module load slurm` on some clusters), or add --dry-run to print the scripts"
        )
    if not partition:
        return
    shown = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True)
    known = sorted(set(shown.stdout.split()))
    if shown.returncode == 0 and partition not in known:
        raise ParamsError(
            f"launch.partition: Slurm knows no partition {partition!r}; sinfo lists: {', '.join(known)}"
        )


def sbatch_options(experiment: Experiment, options: dict[str, Any], log: Path) -> list[str]:
    lines = [
        f"--job-name={experiment.name}",
        f"--output={log}",
        "--open-mode=append",  # a requeued job adds to its log
        f"--nodes={experiment.nnodes}",
        "--ntasks-per-node=1",
    ]
    for key in FLAGS:
        if options[key]:
            lines.append(f"--{key.replace('_', '-')}={options[key]}")
    if options["requeue"]:
        lines.append("--requeue")
    return lines + list(options["sbatch"])


def render(experiment: Experiment, repository: Repository, options: dict[str, Any], work_dir: Path) -> str:
    """The sbatch script of one experiment."""
    workspace = work_dir / experiment.name
    log = work_dir / LOGS_DIR / f"{experiment.name}-%j.out"
    header = [f"#SBATCH {line}" for line in sbatch_options(experiment, options, log)]
    sets = " ".join(f"-S {shlex.quote(override)}" for override in experiment.overrides)
    pin_remote = ""
    if "://" not in repository.dvc_remote_url:  # a folder: the same absolute path on every node
        pin_remote = (
            f"dvc remote modify --local {shlex.quote(repository.dvc_remote)} url "
            f"{shlex.quote(repository.dvc_remote_url)}\n"
        )
    setup = "".join(f"{line}\n" for line in options["setup"])
    nodes = ""
    if experiment.nnodes > 1:
        srun = " ".join(other_nodes_command("pipeline.<stage>", experiment.nnodes, "python"))
        nodes = (
            f"# distributed.nnodes={experiment.nnodes}: this node runs the DVC commands; each training\n"
            "# stage (backbone, finetune) starts its launcher on the other nodes itself, meeting at\n"
            f"# this node's address (Slurm's NodeAddr):\n#   {srun}\n"
        )
    return f"""#!/bin/bash
# Experiment {experiment.name}: {" ".join(experiment.overrides) or "the committed params"}, on
# commit {repository.commit[:9]} of {repository.url}. Written by `python -m pipeline launch`.
{chr(10).join(header)}
{nodes}set -euo pipefail
{setup}LOG={shlex.quote(str(work_dir / LOGS_DIR))}/{experiment.name}-$SLURM_JOB_ID.out
step() {{ STEP=$1; echo "launch: job $SLURM_JOB_ID on $(hostname): $1 ($(date -u +%FT%TZ))"; }}
failed() {{
    stage=$(grep -o "failed to reproduce '[^']*'" "$LOG" 2>/dev/null | tail -n 1 || true)
    echo "launch: job $SLURM_JOB_ID failed in step '$STEP'${{stage:+ ($stage)}}; log: $LOG" >&2
}}
trap failed ERR
export PIPELINE_RESUME_DIR={shlex.quote(str(work_dir / RESUME_DIR))}
export PYTHONUNBUFFERED=1  # each line in the log as it is printed
workspace={shlex.quote(str(workspace))}

step clone
if [ -d "$workspace/.git" ]; then  # a requeued job: its clone, with the stages' cache
    echo "launch: restart ${{SLURM_RESTART_COUNT:-0}}: going on in $workspace"
    git -C "$workspace" checkout --quiet --force {repository.commit}
    # the clone is this job's alone, and Slurm ended its last run: a stage lock that run left
    # (emptied if it was killed while writing it) holds nothing but would stop DVC
    rm -f "$workspace/.dvc/tmp/rwlock"
else
    git clone --quiet --no-checkout {shlex.quote(repository.url)} "$workspace"
    git -C "$workspace" checkout --quiet {repository.commit}
fi
cd "$workspace"
{pin_remote}
step pull
dvc pull --run-cache --allow-missing

step run
# --pull restores what the DVC remote holds and runs the rest (--allow-missing would skip a
# stage whose outputs no one has pushed, and the next stage would miss its inputs)
dvc exp run --pull --name {experiment.name} {sets}

step push
dvc exp push --force origin {experiment.name}
python -m pipeline push-runs  # each stage's run, for the next job (or a teammate) to restore
step done
"""


def submit(script: Path) -> str:
    """Submit ``script``; the job id."""
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise StageError(f"launch: sbatch refused {script}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="python -m pipeline launch",
        description="Submit experiments as Slurm jobs, each in its own clone; "
        "then `dvc exp pull origin` and `dvc exp show` list them.",
    )
    parse.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param for the experiments, as dvc exp run takes it; a,b,c sweeps (a grid over several -S)",
    )
    parse.add_argument(
        "--dry-run", action="store_true", help="print each job's sbatch script, submit nothing"
    )
    parse.add_argument("--partition", help="launch.partition for these jobs")
    parse.add_argument("--account", help="launch.account for these jobs")
    parse.add_argument("--time", help="launch.time for these jobs, e.g. 04:00:00")
    parse.add_argument("--cpus-per-task", type=int, help="launch.cpus_per_task for these jobs")
    parse.add_argument("--gpus-per-node", type=int, help="launch.gpus_per_node for these jobs")
    parse.add_argument("--mem", help="launch.mem for these jobs, e.g. 64G")
    return parse


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not PARAMS_FILE.is_file():
        raise ParamsError(f"{PARAMS_FILE}: not found; run launch in the project's root, where dvc.yaml is")
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    options = {**checked_params(raw, [])["launch"]}
    for key in FLAGS:
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    suffix = secrets.token_hex(2)
    experiments = []
    for overrides in expand(args.set_param):
        params = checked_params(raw, overrides)
        name = experiment_name(overrides, suffix)
        experiments.append(Experiment(name, overrides, params["distributed"]["nnodes"]))
    repository = check_repository(options["git_remote"])
    work_dir = Path(os.path.expanduser(options["work_dir"]))
    work_dir = (work_dir if work_dir.is_absolute() else repository.root / work_dir).resolve()
    if not args.dry_run:
        check_slurm(options["partition"])
    for experiment in experiments:
        script = render(experiment, repository, options, work_dir)
        if args.dry_run:
            print(script)
            continue
        path = work_dir / JOBS_DIR / f"{experiment.name}.sbatch"
        for folder in (path.parent, work_dir / LOGS_DIR, work_dir / RESUME_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        job = submit(path)
        log = work_dir / LOGS_DIR / f"{experiment.name}-{job}.out"
        print(f"launch: job {job}: experiment {experiment.name}; log {log}")
    if not args.dry_run:
        print(
            f"launch: {len(experiments)} job(s) submitted (squeue --me to follow them); once they end, "
            f"`dvc exp pull {options['git_remote']}` then `dvc exp show` lists their experiments"
        )


if __name__ == "__main__":
    run_tool(main)
