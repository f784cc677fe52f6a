"""Push DVC's run-cache so that another clone can restore a stage it has not run:
``python -m pipeline push-runs``.

``dvc push --run-cache`` sends each stage run's record, but of the outputs it records only
those DVC caches: the metrics and plots every stage keeps in git (``cache: false``) stay
behind, and another clone that finds the run cannot restore it (DVC warns of missing cache
files and runs the stage again). This runs ``dvc push --run-cache``, then pushes, through
DVC's own transfer, the objects of every output the local run-cache records.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import yaml

from pipeline.core.entry import run_tool
from pipeline.core.errors import StageError


def recorded_outputs(runs: Path) -> set[str]:
    """The object ids (md5, ``.dir`` for a folder) of every output a run-cache folder records."""
    found = set()
    for entry in runs.rglob("*"):
        if entry.is_file():
            for out in (yaml.safe_load(entry.read_text()) or {}).get("outs", []):
                if out.get("md5"):
                    found.add(out["md5"])
    return found


def push_recorded_outputs(remote: str | None = None) -> int:
    """Push the objects of the run-cache's outputs that this clone's cache holds, a folder's
    files with its listing; how many were sent (those the remote already had are not)."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    with Repo() as repo:
        cache = repo.cache.local
        objects = set()
        for oid in recorded_outputs(Path(repo.stage_cache.cache_dir)):
            if not cache.exists(oid):
                continue
            recorded = HashInfo("md5", oid)
            objects.add(recorded)
            if recorded.isdir:
                objects.update(entry for _, _, entry in Tree.load(cache, recorded))
        result = repo.cloud.push(objects, remote=remote)
    if result.failed:
        raise StageError(f"push-runs: {len(result.failed)} object(s) could not be pushed to the DVC remote")
    return len(result.transferred)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline push-runs",
        description="dvc push --run-cache, plus the metrics and plots each recorded run needs to be restored",
    )
    parser.add_argument("-r", "--remote", help="the DVC remote (default: the default remote)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    remote = ["--remote", args.remote] if args.remote else []
    if subprocess.run(["dvc", "push", "--run-cache", *remote], check=False).returncode != 0:
        raise StageError("push-runs: dvc push --run-cache failed (its error is above)")
    print(f"push-runs: {push_recorded_outputs(args.remote)} more object(s) the run-cache records")


if __name__ == "__main__":
    run_tool(main)
