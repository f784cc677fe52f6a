"""Shared fixtures: tiny params, and temporary git+dvc repositories that run the pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole `dvc repro` takes well under a minute on 2 CPU cores.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "data": {"max_train_per_class": 20},
    "backbone": {"image_size": 16, "pretrain_images": 400, "pretrain_epochs": 1, "pretrain_batch_size": 64},
    "head": {"max_epochs": 15, "patience": 5},
    "finetune": {"epochs": 2, "batch_size": 32},
}


def default_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict[str, Any]:
    params = default_params()
    for section, values in TINY_OVERRIDES.items():
        params[section].update(values)
    return params


def subprocess_env() -> dict[str, str]:
    """The environment for dvc and the stages: this interpreter's python first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    return env


def run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env=subprocess_env(), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_pipeline_repo(path: Path, params: dict[str, Any]) -> Path:
    """A git+dvc repository holding the pipeline and ``params``, committed."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    shutil.copytree(ROOT / "data" / "raw", path / "data" / "raw")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(path, "git", "init", "-q", "-b", "main")
    run(path, "dvc", "init", "-q")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-q", "-m", "pipeline")
    return path


def ran_stages(output: str) -> list[str]:
    """Stage names that `dvc repro` or `dvc exp run` ran, in order, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository where the tiny pipeline has run once and its results are committed."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("tiny") / "repo", tiny_params())
    run(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "run")
    return repo


@pytest.fixture
def tiny_repo(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (git history and DVC cache included)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "repo", symlinks=True))
