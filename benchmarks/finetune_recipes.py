"""Fine-tuning recipes measured on real photo sets: fine-tuned against the linear probe.

For each photo set it builds a git+dvc repository with this checkout's pipeline, the set's
images under data/raw/ and the committed params.yaml with only the dataset and backbone
flags changed (EfficientNet-Lite0, IMAGENET1K_V1, 96 px: what a user with photos sets),
then, for each recipe (params overrides; none: the committed defaults) and seed, writes
params.yaml and runs ``dvc repro evaluate``: DVC reruns what the change touches and restores
what it has run before. Each run appends a record to the results file: test accuracy of the
probe and of the kept model, which model finetune kept, the first epoch's val accuracy
against the probe's, the resolved recipe and the fine-tune time.

    python -m benchmarks.finetune_recipes run --set cifar10-dev --seeds 1 2 3 \\
        --recipe "" --recipe finetune.bn=train
    python -m benchmarks.finetune_recipes table      # the README's table, from the results

Sets: cifar10-dev (shared/data/cifar10-dev: 50 photos a class, of which val takes 10 under
the committed data.min_val_examples), cifar10-dev-10 (10 a class), faces
(benchmarks/faces.py), patches (benchmarks/photo_patches.py), and digits (the default run's
data and glyph-pretrained backbone, params as committed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune_recipes.json"
CIFAR10_DEV = ROOT.parent / "shared" / "data" / "cifar10-dev"
BACKBONE = {"arch": "efficientnet_lite0", "weights": "IMAGENET1K_V1", "image_size": 96}
SETS: dict[str, dict[str, Any]] = {
    "cifar10-dev": {"folder": "cifar10-dev", "data": {}},
    "cifar10-dev-10": {"folder": "cifar10-dev", "data": {"max_train_per_class": 10}},
    "faces": {"folder": "faces", "data": {}},
    "patches": {"folder": "patches", "data": {}},
    "digits": {"folder": None, "data": {}},  # the default run: digits, glyph-pretrained ResNet-18
}


def machine() -> dict[str, Any]:
    """Where the figures were measured: the CPU's model and cores (and a GPU's name)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        model = names[0] if names else model
    return {"cpu": model, "cores": os.cpu_count(), "gpu": None}


def write_images(folder: str, raw: Path) -> None:
    """The set's image tree at ``raw / folder``."""
    target = raw / folder
    if folder == "cifar10-dev":
        shutil.copytree(CIFAR10_DEV, target, ignore=shutil.ignore_patterns("README*"))
    elif folder == "faces":
        from benchmarks.faces import write_faces

        write_faces(target)
    else:
        from benchmarks.photo_patches import write_patches

        write_patches(target)


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
    env.update(GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def base_params(name: str) -> dict[str, Any]:
    """The committed params.yaml with the set's dataset and backbone flags."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if SETS[name]["folder"] is None:
        return params
    params["data"].update(
        dataset="imagefolder", path=f"data/raw/{SETS[name]['folder']}", **SETS[name]["data"]
    )
    params["backbone"].update(BACKBONE)
    return params


def make_repo(work: Path, name: str) -> Path:
    """A git+dvc repository with this checkout's pipeline and the set's images."""
    repo = work / name
    if (repo / ".dvc").is_dir():
        return repo
    repo.mkdir(parents=True)
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "data" / "weights", repo / "data" / "weights")
    shutil.copytree(ROOT / "data" / "raw", repo / "data" / "raw")
    if SETS[name]["folder"] is not None:
        write_images(SETS[name]["folder"], repo / "data" / "raw")
    (repo / "params.yaml").write_text(yaml.safe_dump(base_params(name), sort_keys=False))
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{name}: the committed params with Lite0 flags")
    return repo


def with_overrides(params: dict[str, Any], recipe: str, seed: int) -> dict[str, Any]:
    """``params`` with ``seed`` and the recipe's overrides (``finetune.bn=train,lr=0.003``)."""
    changed = json.loads(json.dumps(params))
    changed["seed"] = seed
    for item in filter(None, recipe.split(",")):
        key, _, value = item.partition("=")
        *sections, last = key.split(".")
        target = changed
        for section in sections:
            target = target[section]
        target[last] = yaml.safe_load(value)
    return changed


def read_run(repo: Path) -> dict[str, Any]:
    """What one run says: test accuracies, the kept model, epoch 1 against the probe on val."""
    test = json.loads((repo / "metrics/test.json").read_text())
    finetune = json.loads((repo / "reports/live/finetune/metrics.json").read_text())["finetune"]
    rows = (repo / "reports/live/finetune/plots/metrics/finetune/val_accuracy.tsv").read_text().splitlines()
    first_epoch = float(rows[1].split("\t")[1])
    sizes = json.loads((repo / "data/features/summary.json").read_text())
    seconds = json.loads((repo / "metrics/finetune_time.json").read_text())["finetune"]["seconds"]
    return {
        "probe": test["linear_probe"]["accuracy"],
        "finetuned": test["finetuned"]["accuracy"],
        "selected": finetune["selected"],
        "best_epoch": finetune["best_epoch"],
        "probe_val": finetune["start_val_accuracy"],
        "epoch1_val": first_epoch,
        "used": {key: finetune[key] for key in ("augment", "bn", "mix") if key in finetune},
        "sizes": {split: counts["examples"] for split, counts in sizes.items()},
        "finetune_seconds": seconds,
    }


def run(args: argparse.Namespace) -> None:
    repo = make_repo(args.work, args.set)
    base = base_params(args.set)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    for recipe in args.recipe:
        for seed in args.seeds:
            (repo / "params.yaml").write_text(
                yaml.safe_dump(with_overrides(base, recipe, seed), sort_keys=False)
            )
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=repo, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{args.set} {recipe!r} seed {seed} failed:\n{done.stdout}\n{done.stderr}")
            record = {"set": args.set, "recipe": recipe, "seed": seed, **read_run(repo)}
            record["wall_seconds"] = round(time.perf_counter() - started, 1)
            record["code"] = commit  # HEAD now; the set's repository copied pipeline/ when it was made
            results["runs"] = [
                r for r in results["runs"] if (r["set"], r["recipe"], r["seed"]) != (args.set, recipe, seed)
            ] + [record]
            results["meta"] = {
                "command": "python -m benchmarks.finetune_recipes run ...",
                "machine": machine(),
                "date": datetime.date.today().isoformat(),
            }
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"{args.set} {recipe or 'defaults'} seed {seed}: probe {record['probe']:.4f}, "
                f"fine-tuned {record['finetuned']:.4f} ({record['selected']}), epoch 1 val "
                f"{record['epoch1_val']:.4f} vs probe {record['probe_val']:.4f}",
                flush=True,
            )


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(runs: list[dict[str, Any]]) -> str:
    """One row per set and recipe: seeds, probe and fine-tuned test accuracy, their gap
    (mean, and the worst seed's), the worst first epoch against the probe on val."""
    lines = [
        "| set | recipe | seeds | probe (%) | fine-tuned (%) | FT − probe | worst seed "
        "| epoch 1 − probe, val (worst) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in runs:
        groups.setdefault((record["set"], record["recipe"]), []).append(record)
    order = list(SETS)
    for (name, recipe), records in sorted(
        groups.items(), key=lambda item: (order.index(item[0][0]), item[0][1])
    ):
        gaps = [100 * (r["finetuned"] - r["probe"]) for r in records]
        first = min(100 * (r["epoch1_val"] - r["probe_val"]) for r in records)
        probe = mean_std([100 * r["probe"] for r in records])
        tuned = mean_std([100 * r["finetuned"] for r in records])
        lines.append(
            f"| {name} | {recipe or 'defaults'} | {len(records)} | {probe} | {tuned} | "
            f"{statistics.mean(gaps):+.2f} | {min(gaps):+.2f} | {first:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="run recipes on one photo set")
    runner.add_argument("--set", choices=SETS, required=True)
    runner.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    runner.add_argument("--recipe", action="append", default=None, help="comma-separated key=value overrides")
    runner.add_argument("--work", type=Path, default=Path("/tmp/finetune-recipes"))
    commands.add_parser("table", help="print the results as a markdown table")
    args = parser.parse_args()
    if args.command == "run":
        args.recipe = args.recipe if args.recipe is not None else [""]
        run(args)
    else:
        print(table(json.loads(RESULTS.read_text())["runs"]))


if __name__ == "__main__":
    main()
