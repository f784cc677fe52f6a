"""Fine-tuning recipes measured on real photo sets: fine-tuned against the linear probe.

For each photo set it builds a git+dvc repository with this checkout's pipeline, the set's
images under data/raw/ and the committed params.yaml with only the dataset and backbone
flags changed (EfficientNet-Lite0, IMAGENET1K_V1, 96 px: what a user with photos sets),
then, for each recipe (params overrides; none: the committed defaults) and seed, writes
params.yaml and runs ``dvc repro evaluate``: DVC reruns what the change touches and restores
what it has run before. Each run appends a record to the results file: test accuracy of the
probe and of the kept model, which model finetune kept, the first epoch's val accuracy
against the probe's, the resolved recipe and the fine-tune time, and (in runs made since
evaluate records them) the test examples only one of the two gets right, with the McNemar
p-value.

    python -m benchmarks.finetune_recipes run --set cifar10-dev --seeds 1 2 3 \\
        --recipe "" --recipe finetune.bn=train
    python -m benchmarks.finetune_recipes table      # the README's table, from the results

Sets: cifar10-dev (shared/data/cifar10-dev: 50 photos a class, of which val takes 10 under
the committed data.min_val_examples), cifar10-dev-10 (10 a class), faces
(benchmarks/faces.py), patches and patches-b, its check set of other photos
(benchmarks/photo_patches.py), the same two with val the strip beside the test strip
(patches-strip, patches-b-strip), digits (the default run's
data and glyph-pretrained backbone, params as committed) and agnews-dev (shared/data: news
texts, MiniLM, the README's text config).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import results
from pipeline.core.metrics import exact_mcnemar

ROOT = results.ROOT
NAME = "finetune_recipes"
SHARED = ROOT.parent / "shared" / "data"
CIFAR10_DEV = SHARED / "cifar10-dev"
LITE0 = {"backbone": {"arch": "efficientnet_lite0", "weights": "IMAGENET1K_V1", "image_size": 96}}
# Each set: the folder under data/raw/ its data is written to (None: the default run's
# digits), and the params it changes, section by section: what a user of that data sets.
SETS: dict[str, dict[str, Any]] = {
    "cifar10-dev": {"folder": "cifar10-dev", "params": LITE0},
    "cifar10-dev-10": {"folder": "cifar10-dev", "params": {**LITE0, "data": {"max_train_per_class": 10}}},
    "faces": {"folder": "faces", "params": LITE0},
    "patches": {"folder": "patches", "params": LITE0},
    "patches-b": {"folder": "patches-b", "params": LITE0},  # assembled to check the defaults
    # The same two, judged on a val strip shifted from the training patches as test is.
    "patches-strip": {"folder": "patches-strip", "params": LITE0},
    "patches-b-strip": {"folder": "patches-b-strip", "params": LITE0},
    "digits": {"folder": None, "params": {}},  # the default run: digits, glyph-pretrained ResNet-18
    # The README's text config: agnews-dev with the offline MiniLM, 3 epochs, batch 32.
    "agnews-dev": {
        "folder": "agnews-dev",
        "params": {
            "data": {"modality": "text", "dataset": "text"},
            "backbone": {"arch": "sentence-transformers/all-MiniLM-L6-v2"},
            "finetune": {"epochs": 3, "batch_size": 32},
        },
    },
}


# What finetune's metrics record of the recipe it used, auto resolved.
USED = ("augment", "bn", "mix", "epochs", "batch_size", "steps")


def write_images(folder: str, raw: Path) -> None:
    """The set's image tree at ``raw / folder``."""
    target = raw / folder
    if folder in ("cifar10-dev", "agnews-dev"):
        shutil.copytree(SHARED / folder, target, ignore=shutil.ignore_patterns("README*"))
    elif folder == "faces":
        from benchmarks.faces import write_faces

        write_faces(target)
    else:
        from benchmarks.photo_patches import write_named

        write_named(target, folder)


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
    env.update(GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def base_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The committed params.yaml (or ``params``) with the set's own: its data and backbone
    flags."""
    params = params or yaml.safe_load((ROOT / "params.yaml").read_text())
    if SETS[name]["folder"] is not None:
        params["data"].update(dataset="imagefolder", path=f"data/raw/{SETS[name]['folder']}")
    for section, values in SETS[name]["params"].items():
        params[section].update(values)
    return params


def sync_code(repo: Path) -> None:
    """This checkout's pipeline code and dvc.yaml in ``repo``, replacing what an earlier run
    copied there, so each record's ``code`` is the code that ran (DVC reruns the stages whose
    code changed and restores the rest)."""
    shutil.rmtree(repo / "pipeline", ignore_errors=True)
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")  # no bytecode in the modality deps' hashes


def make_repo(work: Path, name: str) -> Path:
    """A git+dvc repository with this checkout's pipeline and the set's images."""
    repo = work / name
    if (repo / ".dvc").is_dir():
        sync_code(repo)
        return repo
    repo.mkdir(parents=True)
    shutil.copytree(ROOT / "data" / "weights", repo / "data" / "weights")
    shutil.copytree(ROOT / "data" / "raw", repo / "data" / "raw")
    if SETS[name]["folder"] is not None:
        write_images(SETS[name]["folder"], repo / "data" / "raw")
    (repo / "params.yaml").write_text(yaml.safe_dump(base_params(name), sort_keys=False))
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    sync_code(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{name}: the committed params with the set's flags")
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
    with (repo / "metrics/test_predictions.csv").open() as rows:
        right = {int(row["index"]): row["actual"] == row["predicted"] for row in csv.DictReader(rows)}
    return {
        "probe": test["linear_probe"]["accuracy"],
        "finetuned": test["finetuned"]["accuracy"],
        "selected": finetune["selected"],
        "best_epoch": finetune["best_epoch"],
        "probe_val": finetune["start_val_accuracy"],
        "epoch1_val": first_epoch,
        "used": {key: finetune[key] for key in USED if key in finetune},
        "sizes": {split: counts["examples"] for split, counts in sizes.items()},
        "finetune_seconds": seconds,
        "trainable_params": finetune["trainable_params"],
        **({"paired": test["finetuned_vs_probe"]} if "finetuned_vs_probe" in test else {}),
        "correct": "".join("1" if right[index] else "0" for index in sorted(right)),  # each test example
    }


def run(args: argparse.Namespace) -> None:
    repo = make_repo(args.work, args.set)
    base = base_params(args.set)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    runs = results.load(NAME)["results"] if results.path_of(NAME).is_file() else []
    for recipe in args.recipe:
        for seed in args.seeds:
            (repo / "params.yaml").write_text(
                yaml.safe_dump(with_overrides(base, recipe, seed), sort_keys=False)
            )
            started = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dvc",
                    "repro",
                    *(["--no-run-cache"] if args.no_run_cache else []),
                    "evaluate",
                ],
                cwd=repo,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"{args.set} {recipe!r} seed {seed} failed:\n{done.stdout}\n{done.stderr}")
            record = {"set": args.set, "recipe": recipe, "seed": seed, **read_run(repo)}
            record["wall_seconds"] = round(time.perf_counter() - started, 1)
            record["code"] = commit  # the pipeline/ that sync_code copied
            (earlier,) = [
                r for r in runs if (r["set"], r["recipe"], r["seed"]) == (args.set, recipe, seed)
            ] or [{}]
            if "Running stage 'finetune'" not in done.stdout and earlier.get("code") == commit:
                record = {**earlier, "correct": record["correct"]}  # restored: the run's own figures stay
            runs = [r for r in runs if (r["set"], r["recipe"], r["seed"]) != (args.set, recipe, seed)] + [
                record
            ]
            results.save(
                NAME, "python -m benchmarks.finetune_recipes run --set <set> --recipe <overrides>", runs
            )
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


# The cifar10-dev recipes the strategies page compares (the README's sweep of strategies).
STRATEGIES = (
    "",
    "finetune.ema_epochs=0",
    "finetune.l2sp=0.01,finetune.ema_epochs=0",
    "finetune.strategy=adapters,finetune.backbone_lr_ratio=1,finetune.ema_epochs=0",
    "finetune.optimizer=sgd,finetune.momentum=0.9,lr=0.001,finetune.backbone_lr_ratio=1,"
    "finetune.warmup_epochs=0,finetune.head_init=fresh,finetune.bn=train,finetune.ema_epochs=0",
)


def schedule_of(recipe: str) -> tuple[int, int] | None:
    """The (epochs, batch) a schedule run names (``finetune.epochs=20,finetune.batch_size=16``);
    None for any other recipe."""
    found = re.fullmatch(r"finetune\.epochs=(\d+),finetune\.batch_size=(\d+)", recipe)
    return (int(found[1]), int(found[2])) if found else None


NO_FLOOR = "data.min_val_examples=0,"  # a run without the val floor, on the schedule that follows


def without_floor(recipe: str) -> tuple[int, int] | None:
    """The (epochs, batch) of a run without the val floor; None for any other recipe."""
    return schedule_of(recipe.removeprefix(NO_FLOOR)) if recipe.startswith(NO_FLOOR) else None


PARTS = {
    "images": lambda run: (
        run["set"] != "agnews-dev"
        and schedule_of(run["recipe"]) is None
        and without_floor(run["recipe"]) is None
    ),
    "texts": lambda run: run["set"] == "agnews-dev",
    "strategies": lambda run: (
        run["set"] == "agnews-dev" or (run["set"] == "cifar10-dev" and run["recipe"] in STRATEGIES)
    ),
}


# What each set is, for the README's headline table.
DESCRIBED = {
    "cifar10-dev": "cifar10-dev: 40 photos a class (CIFAR-10), Lite0 ImageNet, 96 px",
    "cifar10-dev-10": "the same, 10 photos a class",
    "faces": "faces vs non-faces (LFW crops), Lite0",
    "patches": "which of 10 photos a patch is from, Lite0",
    "patches-b": "which of 9 photos a patch is from (the check set), Lite0",
    "digits": "digits, the offline demo (glyph-pretrained ResNet-18)",
    "agnews-dev": "agnews-dev: news topics, 2,000 texts, MiniLM",
}


def auto_schedule(train_examples: int) -> tuple[int, int]:
    """The (epochs, batch) ``finetune.epochs`` and ``batch_size: auto`` pick for a photo set
    of ``train_examples`` training images."""
    from pipeline.core.recipe import resolved_schedule
    from pipeline.modalities import get

    schedule = resolved_schedule("auto", "auto", get("images").AUTO_SCHEDULE, train_examples)
    return schedule.epochs, schedule.batch_size


def mean_gain(runs: list[dict[str, Any]]) -> float:
    """The fine-tuned model's test accuracy over the probe's, in points, mean of ``runs``."""
    return statistics.mean(100 * (r["finetuned"] - r["probe"]) for r in runs)


def committed_runs(record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The runs of what the committed params train on set ``name``. On a photo set, the
    schedule runs of the epochs and batch that ``finetune.epochs`` and ``batch_size: auto``
    resolve to for its training set (none if it has none: its defaults runs predate the rule);
    on texts, the defaults runs (the set's params name the 3 epochs at 32 that auto gives)."""
    runs = [r for r in record["results"] if r["set"] == name]
    if SETS[name]["params"].get("data", {}).get("modality") == "text":
        return [r for r in runs if r["recipe"] == ""]
    scheduled = [r for r in runs if schedule_of(r["recipe"])]
    if not scheduled:
        return []
    auto = auto_schedule(scheduled[0]["sizes"]["train"])
    return [r for r in scheduled if schedule_of(r["recipe"]) == auto]


def headline(record: dict[str, Any], sets: list[str]) -> str:
    """The committed params on each of ``sets`` that has runs of them (committed_runs): its
    seeds, probe and fine-tuned test accuracy (mean of the seeds), the gain, and the worst
    seed's gain."""
    lines = [
        "| data | seeds | linear probe | fine-tuned | gain | worst seed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in sets:
        description = DESCRIBED[name]
        runs = committed_runs(record, name)
        if runs:
            probe = statistics.mean(100 * r["probe"] for r in runs)
            tuned = statistics.mean(100 * r["finetuned"] for r in runs)
            worst = min(100 * (r["finetuned"] - r["probe"]) for r in runs)
            lines.append(
                f"| {description} | {len(runs)} | {probe:.2f}% | {tuned:.2f}% | {tuned - probe:+.2f} "
                f"| {worst:+.2f} |"
            )
    return "\n".join(lines)


# The schedule the committed params trained with before finetune.epochs and batch_size
# were auto: what the schedule table holds the others to.
BEFORE = (8, 64)


def pooled_mcnemar(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> float:
    """The exact McNemar p-value of two recipes' fine-tuned models, pooled over the seeds
    both ran (the same seed: the same split and test examples)."""
    by_seed = {run["seed"]: run["correct"] for run in second if "correct" in run}
    only_first = only_second = 0
    for run in first:
        other = by_seed.get(run["seed"])
        if other is None or "correct" not in run:
            continue
        only_first += sum(a == "1" and b == "0" for a, b in zip(run["correct"], other, strict=True))
        only_second += sum(a == "0" and b == "1" for a, b in zip(run["correct"], other, strict=True))
    return exact_mcnemar(only_first, only_second)


def schedule_table(record: dict[str, Any]) -> str:
    """For each set, the schedules run (epochs x batch): the steps they train, the mean gain
    over the probe, the change against the schedule before the rule (mean, and the pooled
    McNemar p-value), and the mean fine-tuning seconds; the row ``auto`` resolves to marked."""
    lines = [
        "| set | train | epochs × batch (steps) | seeds | FT − probe | vs 8 × 64 | p "
        "| fine-tune (s) | time × |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[str, dict[tuple[int, int], list[dict[str, Any]]]] = {}
    for run in record["results"]:
        if (schedule := schedule_of(run["recipe"])) is not None:
            groups.setdefault(run["set"], {}).setdefault(schedule, []).append(run)
    for name in [name for name in SETS if name in groups]:
        runs = groups[name]
        before = runs.get(BEFORE, [])
        train = runs[next(iter(runs))][0]["sizes"]["train"]
        auto = auto_schedule(train)
        base_gain = mean_gain(before) if before else None
        base_time = statistics.mean(r["finetune_seconds"] for r in before) if before else None
        for (epochs, batch), records in sorted(
            runs.items(), key=lambda item: item[0][0] * math.ceil(train / item[0][1])
        ):
            gain = mean_gain(records)
            seconds = statistics.mean(r["finetune_seconds"] for r in records)
            steps = epochs * math.ceil(train / batch)
            label = f"{epochs} × {batch} ({steps})" + (" **auto**" if (epochs, batch) == auto else "")
            versus = p_value = times = "–"
            if before and (epochs, batch) != BEFORE:
                versus = f"{gain - base_gain:+.2f}"
                p_value = f"{pooled_mcnemar(records, before):.3f}"
                times = f"{seconds / base_time:.1f}"
            lines.append(
                f"| {name} | {train} | {label} | {len(records)} | {gain:+.2f} | {versus} | {p_value} "
                f"| {seconds:.0f} | {times} |"
            )
    return "\n".join(lines)


def defaults_label(records: list[dict[str, Any]]) -> str:
    """What the committed params were when these runs of them ran."""
    if any("steps" in r.get("used", {}) for r in records):
        return "defaults"
    return "defaults before auto (8 epochs × 64)"


def val_floor_table(record: dict[str, Any]) -> str:
    """For each set run without the val floor (``data.min_val_examples=0``) on the schedule
    auto picks for its larger training split, beside the committed params' runs: the split
    sizes, the fine-tuned test accuracy and its gain over the run's own probe (means of the
    seeds), and the change of the fine-tuned accuracy against the floor with the pooled
    McNemar p-value (the test split is drawn first, so it is the same either way)."""
    lines = [
        "| set | data.min_val_examples | train | val | seeds | fine-tuned (%) | FT − probe "
        "| vs the floor | p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["min_val_examples"]
    for name in SETS:
        floorless = [r for r in record["results"] if r["set"] == name and without_floor(r["recipe"])]
        floored = committed_runs(record, name)
        if not floorless or not floored:
            continue
        base = statistics.mean(100 * r["finetuned"] for r in floored)
        for floor, runs in ((committed, floored), (0, floorless)):
            tuned = statistics.mean(100 * r["finetuned"] for r in runs)
            gain = mean_gain(runs)
            versus, p_value = "–", "–"
            if runs is floorless:
                versus, p_value = f"{tuned - base:+.2f}", f"{pooled_mcnemar(runs, floored):.3f}"
            sizes = runs[0]["sizes"]
            lines.append(
                f"| {name} | {floor} | {sizes['train']} | {sizes['val']} | {len(runs)} | {tuned:.2f} "
                f"| {gain:+.2f} | {versus} | {p_value} |"
            )
    return "\n".join(lines)


def table(record: dict[str, Any], part: str | None = None) -> str:
    """One row per set and recipe (``part``: those PARTS names): seeds, probe and fine-tuned
    test accuracy, their gap (mean, and the worst seed's), the worst first epoch against the
    probe on val; for the strategies, also the parameters trained (the fine-tune times are
    in the results file: the sweeps shared the machine with other work)."""
    if part == "headline":
        return headline(record, [name for name in DESCRIBED if name != "agnews-dev"])
    if part == "headline_texts":
        return headline(record, ["agnews-dev"])
    if part == "schedule":
        return schedule_table(record)
    if part == "val_floor":
        return val_floor_table(record)
    runs = [run for run in record["results"] if part is None or PARTS[part](run)]
    costs = part == "strategies"
    lines = [
        "| set | recipe | seeds | probe (%) | fine-tuned (%) | FT − probe | worst seed "
        "| epoch 1 − probe, val (worst) |" + (" trainable params |" if costs else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if costs else ""),
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["set"], run["recipe"]), []).append(run)
    order = list(SETS)
    for (name, recipe), records in sorted(
        groups.items(), key=lambda item: (order.index(item[0][0]), item[0][1])
    ):
        gaps = [100 * (r["finetuned"] - r["probe"]) for r in records]
        first = min(100 * (r["epoch1_val"] - r["probe_val"]) for r in records)
        probe = mean_std([100 * r["probe"] for r in records])
        tuned = mean_std([100 * r["finetuned"] for r in records])
        row = (
            f"| {name} | {recipe or defaults_label(records)} | {len(records)} | {probe} | {tuned} | "
            f"{statistics.mean(gaps):+.2f} | {min(gaps):+.2f} | {first:+.2f} |"
        )
        if costs:
            trained = {r.get("trainable_params") for r in records}
            shown = f"{trained.pop():,}" if len(trained) == 1 and None not in trained else "–"
            row += f" {shown} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="run recipes on one photo set")
    runner.add_argument("--set", choices=SETS, required=True)
    runner.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    runner.add_argument("--recipe", action="append", default=None, help="comma-separated key=value overrides")
    runner.add_argument("--work", type=Path, default=Path("/tmp/finetune-recipes"))
    runner.add_argument(
        "--no-run-cache", action="store_true", help="run the stages again, not restored (to time them anew)"
    )
    commands.add_parser("table", help="print the results as a markdown table")
    args = parser.parse_args()
    if args.command == "run":
        args.recipe = args.recipe if args.recipe is not None else [""]
        run(args)
    else:
        print(table(results.load(NAME)))


if __name__ == "__main__":
    main()
