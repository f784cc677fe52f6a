"""Benchmark: DVC's run-cache and remote, restores vs recomputes, in one run.

In a temporary git+dvc repository holding the pipeline and params.yaml (or the tests' tiny
config), it times, in order:

1. the full run, `dvc repro`, every stage from scratch; then commits it and pushes its
   outputs and run-cache to a local DVC remote (`dvc push --run-cache`);
2. a new fine-tuning rate, `dvc exp run -S lr=1e-4`: finetune onward recomputed;
3. the revisit, back to the committed rate (`git checkout params.yaml && dvc repro`):
   finetune and evaluate restored from the run-cache, the report re-rendered;
4. a second clone's `dvc pull`, then its `dvc repro`, which runs nothing;
5. a third clone's `dvc repro --pull`, restoring every stage from the remote.

Run from the repository root: ``python -m benchmarks.run_cache [--tiny]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import results

ROOT = results.ROOT


def dvc_env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key, value in (("NAME", "benchmark"), ("EMAIL", "benchmark@localhost")):
        env.setdefault(f"GIT_AUTHOR_{key}", value)
        env.setdefault(f"GIT_COMMITTER_{key}", value)
    return env


def sh(cwd: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=dvc_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def timed(cwd: Path, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    output = sh(cwd, *args)
    return time.perf_counter() - start, output


def stages_run(output: str) -> str:
    ran = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]
    restored = [line.split("'")[1] for line in output.splitlines() if "is cached - skipping run" in line]
    parts = [f"ran {', '.join(ran)}" if ran else "ran nothing"]
    if restored:
        parts.append(f"restored {', '.join(restored)}")
    return "; ".join(parts)


def make_repo(path: Path, params: dict) -> None:
    path.mkdir(parents=True)
    shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("raw", "weights"):  # both deps of stages
        shutil.copytree(ROOT / "data" / folder, path / "data" / folder)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(path, "git", "init", "-q", "-b", "main")
    sh(path, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")  # no bytecode in the modality deps' hashes
    sh(path, "dvc", "remote", "add", "-d", "storage", str(path.parent / "remote"))
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "pipeline")


def measure(params: dict, work: Path) -> list[tuple[str, float, str]]:
    repo = work / "repo"
    make_repo(repo, params)
    rows = []
    seconds, output = timed(repo, "dvc", "repro")
    rows.append(("full run (`dvc repro`, from scratch)", seconds, stages_run(output)))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "run")
    seconds, _ = timed(repo, "dvc", "push", "--run-cache")
    rows.append(("`dvc push --run-cache` to a local remote", seconds, ""))
    seconds, output = timed(repo, "dvc", "exp", "run", "-S", "lr=1e-4")
    rows.append(("new rate (`dvc exp run -S lr=1e-4`)", seconds, stages_run(output)))
    sh(repo, "git", "checkout", "params.yaml")
    seconds, output = timed(repo, "dvc", "repro")
    rows.append(("revisit the committed rate (`dvc repro`)", seconds, stages_run(output)))
    for name, command in (("pull", ("dvc", "pull")), ("repro-pull", ("dvc", "repro", "--pull"))):
        clone = work / name
        sh(work, "git", "clone", "-q", str(repo), str(clone))
        seconds, output = timed(clone, *command)
        rows.append((f"second clone: `{' '.join(command)}`", seconds, stages_run(output)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params",
        type=Path,
        help="a params file to measure instead of the project's params.yaml (a quick check on a "
        "smaller config); its table is printed, not saved as the docs' results",
    )
    args = parser.parse_args(argv)
    params = yaml.safe_load((args.params or ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(params, Path(tmp))
    measured = [
        {"step": name, "seconds": round(seconds, 1), "stages": stages} for name, seconds, stages in rows
    ]
    if args.params:
        print(table({"results": measured}))
    else:
        print(table(results.save(NAME, "python -m benchmarks.run_cache", measured)))


NAME = "run_cache"


def table(record: dict) -> str:
    """Each step's seconds and stages, and what a revisit and a clone save, from the results file."""
    rows = record["results"]
    lines = ["| step | seconds | stages |", "|---|---:|---|"]
    lines += [f"| {row['step']} | {row['seconds']:.1f} | {row['stages']} |" for row in rows]
    full, recompute, revisit, clone = (rows[i]["seconds"] for i in (0, 2, 3, 5))
    lines += [
        "",
        f"A revisit is {recompute / revisit:.1f}x faster than recomputing the new rate, and a second "
        f"clone's `dvc repro --pull` {full / clone:.0f}x faster than the full run.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
