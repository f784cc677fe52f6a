"""WiSE-FT (``finetune.interpolate``) measured: the kept fine-tuned weights moved back toward
the starting model (the linear probe's head on the pretrained backbone), val and test
accuracy at each share.

For each set and seed it restores finetune_recipes' run of the committed defaults, the run
behind the README's headline table: in that benchmark's work repository it puts back the
pipeline revision the run's record names and that revision's params with the set's flags,
and ``dvc repro evaluate`` restores the run from the run-cache (or, in a new work
repository, recomputes it). Then it loads the starting model and models/finetuned.pt and
evaluates ``start + share * (kept - start)``, made by the finetune stage's own
interpolated_weights, at shares 0, 0.1, ..., 1 on val and test. Share 1 is the model the
defaults ship; finetune.interpolate below 1 ships the blend at that share when it beats the
starting model (share 0) on val by the run's finetune.select, and the probe otherwise:
the table gives what the stage would ship. Run from the repository root:

    python -m benchmarks.interpolation run --set patches --seeds 1 2 3 4 5 6 7 8
    python -m benchmarks.interpolation table
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from benchmarks import finetune_recipes, results
from pipeline.core.selection import SELECTIONS

ROOT = results.ROOT
NAME = "interpolation"
COMMAND = "python -m benchmarks.interpolation run --set <set> --seeds <seeds>"
SHARES = tuple(round(0.1 * step, 1) for step in range(11))
SHOWN = (1.0, 0.9, 0.8, 0.7, 0.5)  # the table's columns


def recorded_run(name: str, seed: int) -> dict[str, Any]:
    """finetune_recipes' record of the committed defaults on ``name`` with ``seed``."""
    for run in results.load(finetune_recipes.NAME)["results"]:
        if (run["set"], run["recipe"], run["seed"]) == (name, "", seed):
            return run
    raise SystemExit(
        f"no finetune_recipes run of the defaults on {name} with seed {seed}; run "
        f"python -m benchmarks.finetune_recipes run --set {name} --seeds {seed} first"
    )


def put_back(repo: Path, revision: str, name: str, seed: int) -> None:
    """The pipeline, dvc.yaml and params of ``revision`` in ``repo``, the params with the
    set's flags and ``seed``: what that run ran."""
    archive = subprocess.run(
        ["git", "archive", revision, "pipeline", "dvc.yaml", ".dvcignore", "params.yaml"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    staging = repo / ".revision"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(staging, filter="data")
    params = finetune_recipes.base_params(name, yaml.safe_load((staging / "params.yaml").read_text()))
    shutil.rmtree(repo / "pipeline")
    (staging / "pipeline").rename(repo / "pipeline")
    for file in ("dvc.yaml", ".dvcignore"):
        (staging / file).replace(repo / file)
    shutil.rmtree(staging)
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "seed": seed}, sort_keys=False))


def restore(repo: Path, revision: str, name: str, seed: int) -> bool:
    """That run in ``repo`` (put_back, then ``dvc repro evaluate``): whether the run-cache
    restored it rather than recomputing a stage."""
    put_back(repo, revision, name, seed)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=repo, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{done.stdout}\n{done.stderr}")
    return "Running stage" not in done.stdout


def measure(module: str, *args: str) -> dict[str, Any]:
    """What ``python -m <module> <args>`` prints as JSON on its last line, run from this
    checkout in a process of its own (it changes directory and imports the pipeline)."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def curve(repo: Path) -> dict[str, Any]:
    """Val and test accuracy and loss of the blend at each share, in ``repo`` after a run,
    and the run's finetune.select. Imports this checkout's pipeline, then works in ``repo``."""
    import torch
    import torch.nn.functional as F

    from pipeline.core.checkpoints import read_backbone, read_head
    from pipeline.core.metrics import paired_comparison
    from pipeline.core.training import interpolated_weights, predict_logits
    from pipeline.finetune import starting_classifier
    from pipeline.modalities import inference_loader, load_classifier

    os.chdir(repo)
    params = yaml.safe_load(Path("params.yaml").read_text())  # that revision's keys, unvalidated
    start = starting_classifier(read_backbone(), read_head(), params["finetune"]).state_dict()
    model, checkpoint = load_classifier("models/finetuned.pt")
    kept = {key: value.clone() for key, value in model.state_dict().items()}
    device = torch.device("cpu")
    loaders = {
        split: inference_loader(split, checkpoint, params["extract"]["batch_size"], 0, device)
        for split in ("val", "test")
    }
    scores, start_predicted = {}, None
    for share in SHARES:
        model.load_state_dict(interpolated_weights(start, kept, share))
        row = {}
        for split, loader in loaders.items():
            logits, labels = predict_logits(model, loader, device, params["amp"])
            row[f"{split}_accuracy"] = round((logits.argmax(1) == labels).double().mean().item(), 6)
            row[f"{split}_loss"] = round(F.cross_entropy(logits, labels).item(), 6)
            if split == "test":
                predicted = logits.argmax(1).numpy()
                start_predicted = predicted if start_predicted is None else start_predicted
                row["test_vs_start"] = paired_comparison(labels.numpy(), start_predicted, predicted)
        scores[f"{share:.1f}"] = row
    return {"select": params["finetune"]["select"], "shares": scores}


def run(args: argparse.Namespace) -> None:
    repo = finetune_recipes.make_repo(args.work, args.set)
    runs = results.load(NAME)["results"] if results.path_of(NAME).is_file() else []
    for seed in args.seeds:
        recorded = recorded_run(args.set, seed)
        restored = restore(repo, recorded["code"], args.set, seed)
        measured = measure("benchmarks.interpolation", "curve", str(repo))
        shares = measured["shares"]
        record = {
            "set": args.set,
            "seed": seed,
            "code": recorded["code"],
            "probe": recorded["probe"],
            "finetuned": recorded["finetuned"],
            "restored": restored,
            "select": measured["select"],
            "shares": shares,
        }
        if shares["1.0"]["test_accuracy"] != recorded["finetuned"]:
            raise SystemExit(
                f"{args.set} seed {seed}: share 1 scores {shares['1.0']['test_accuracy']} on test, the "
                f"recorded run {recorded['finetuned']}: not the same model"
            )
        runs = [r for r in runs if (r["set"], r["seed"]) != (args.set, seed)] + [record]
        results.save(NAME, COMMAND, runs)
        gains = " ".join(
            f"{share}:{100 * (shipped(record, share)[0] - record['probe']):+.2f}" for share in SHOWN
        )
        print(
            f"{args.set} seed {seed} (restored: {record['restored']}): FT - probe by share {gains}",
            flush=True,
        )


def shipped(run: dict[str, Any], share: float) -> tuple[float, bool]:
    """The test accuracy of what finetune ships at ``share``, and whether that is the start:
    the blend, unless the run's selection rule prefers the starting model (share 0) on val,
    and then the probe."""
    start, blend = (
        {"epoch": epoch, **run["shares"][f"{value:.1f}"]} for epoch, value in ((0, 0.0), (1, share))
    )
    if SELECTIONS[run["select"]]([start, blend]) is start:
        return run["probe"], True
    return blend["test_accuracy"], False


def under_note(runs: list[dict[str, Any]], share: float) -> str:
    """How many of ``runs`` ship a model under the probe on test at ``share``, and the
    smallest exact McNemar p-value among them (their test examples only one of the two
    gets right): whether the test split can tell them from the probe."""
    from pipeline.core.metrics import p_text  # scipy and scikit-learn: only where a table needs them

    under = [run for run in runs if shipped(run, share)[0] < run["probe"]]
    if not under:
        return ""
    tests = [run["shares"][f"{share:.1f}"].get("test_vs_start") for run in under]
    if None in tests:
        return f"; {len(under)} under the probe"
    lowest, highest = min(test["p_value"] for test in tests), max(test["p_value"] for test in tests)
    if len(under) == 1:
        return f"; 1 under the probe, {p_text(lowest)}"
    if lowest == highest:
        return f"; {len(under)} under the probe, {p_text(lowest)} each"
    return f"; {len(under)} under the probe, p ≥ {lowest:.2g}"


def val_pick(run: dict[str, Any]) -> str:
    """The share the run's finetune.select would pick on val among all of them (ties to
    the smaller share)."""
    records = [
        {"epoch": step, "share": share, **run["shares"][share]} for step, share in enumerate(run["shares"])
    ]
    return SELECTIONS[run["select"]](records)["share"]


def table(record: dict[str, Any]) -> str:
    """One row per set: the test accuracy of what finetune ships at each shown share minus
    the probe's, the mean over the seeds and the worst seed's (and how many seeds kept the
    probe because the blend lost to it on val, how many ended under it and the McNemar
    p-value of the most uneven of those), and the shares val would pick."""
    columns = " | ".join(f"share {share:g}" + (" (shipped)" if share == 1 else "") for share in SHOWN)
    lines = [
        f"| set | seeds | {columns} | val's pick |",
        "|---|---:|" + "---:|" * len(SHOWN) + "---|",
    ]
    order = list(finetune_recipes.SETS)
    for name in sorted({run["set"] for run in record["results"]}, key=order.index):
        runs = [run for run in record["results"] if run["set"] == name]
        cells = []
        for share in SHOWN:
            ships = [shipped(run, share) for run in runs]
            gains = [100 * (accuracy - run["probe"]) for (accuracy, _), run in zip(ships, runs, strict=True)]
            kept = sum(start for _, start in ships)
            note = f", {kept} kept the probe" if kept else ""
            cells.append(f"{statistics.mean(gains):+.2f} ({min(gains):+.2f}{note}{under_note(runs, share)})")
        picks = Counter(val_pick(run) for run in runs)
        picked = ", ".join(f"{share} ×{count}" for share, count in sorted(picks.items(), reverse=True))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {picked} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="measure the blends on one set's recorded runs")
    runner.add_argument("--set", choices=list(finetune_recipes.SETS), required=True)
    runner.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    runner.add_argument("--work", type=Path, default=Path("/tmp/finetune-recipes"))
    measure = commands.add_parser("curve", help="(internal) the blends' scores in one work repository")
    measure.add_argument("repo", type=Path)
    commands.add_parser("table", help="print the results as a markdown table")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "curve":
        print(json.dumps(curve(args.repo)))
    else:
        print(table(results.load(NAME)))


if __name__ == "__main__":
    main()
