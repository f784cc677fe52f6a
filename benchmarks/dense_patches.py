"""The patch sets' fine-tuned models and probes on a denser cut of the same test strips.

The patch sets (benchmarks.photo_patches) test on 16 patches of each photo's right quarter:
160 for patches, 144 for patches-b, where one patch is 0.6 or 0.7 points and a model that
ends a patch under the probe cannot be told from it. This benchmark scores the very models
of the headline table on every 40 x 40 px window of those strips at a stride of 8 px (216 a
photo, the 16 grid patches among them): the same region, the same models, 13.5 times the
windows. The windows overlap, so they are not independent examples (no McNemar test here);
what they give is each model's accuracy on the strip measured finely instead of on one grid.

For each set and seed it restores finetune_recipes' run of the committed defaults, as
benchmarks.interpolation does, checks that the fine-tuned model scores on the grid what that
run recorded, and scores the starting model (the linear probe's head on the pretrained
backbone: what finetune judges against) and the kept fine-tuned model on the grid and on
the dense windows, and the blends finetune.interpolate ships at shares 0.9 to 0.5 (checked
to score on the grid what benchmarks.interpolation recorded, whose val scores decide whether
the stage ships the blend or the probe). The starting model is the probe: on the grid it
scores what evaluate's linear probe recorded (checked, as the fine-tuned model's score is).
Run from the repository root:

    python -m benchmarks.dense_patches run --set patches-b --seeds 1 2 3 4 5 6 7 8
    python -m benchmarks.dense_patches table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks import finetune_recipes, interpolation, photo_patches, results

NAME = "dense_patches"
COMMAND = "python -m benchmarks.dense_patches run --set <set> --seeds <seeds>"
STRIDE = 8  # px between windows: 6 across the 80 px strip, 36 down, 216 a photo
BLENDS = tuple(share for share in interpolation.SHOWN if share < 1)  # finetune.interpolate's shares


def strip_windows(stride: int = STRIDE) -> list[tuple[int, int]]:
    """The (left, top) corners of every PATCH-sized window of a photo's test strip (its
    right TEST_COLUMNS columns of the grid) at ``stride``: the grid's test patches among them."""
    side, patch = photo_patches.SIDE, photo_patches.PATCH
    first = side - photo_patches.TEST_COLUMNS * patch
    return [
        (left, top)
        for top in range(0, side - patch + 1, stride)
        for left in range(first, side - patch + 1, stride)
    ]


def write_windows(out: Path, photos: tuple[str, ...], stride: int = STRIDE) -> int:
    """Each photo's test-strip windows as PNG files under ``out/<photo>/``, cut from the
    photo as photo_patches cuts the grid; how many."""
    count = 0
    for name in photos:
        image = photo_patches.photo(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for left, top in strip_windows(stride):
            box = (left, top, left + photo_patches.PATCH, top + photo_patches.PATCH)
            image.crop(box).save(folder / f"{top}_{left}.png")
            count += 1
    return count


def scores(repo: Path, windows: Path) -> dict[str, Any]:
    """The test accuracy of the starting model, the kept fine-tuned model and their blends
    at BLENDS on the grid (data/prepared's test split) and on the dense ``windows``, in
    ``repo`` after a run. Imports this checkout's pipeline, then works in ``repo``."""
    import torch

    from pipeline.core.checkpoints import read_backbone, read_head
    from pipeline.core.data import load_classes, save_prepared
    from pipeline.core.loaders import make_loader
    from pipeline.core.training import interpolated_weights
    from pipeline.finetune import starting_classifier
    from pipeline.modalities import for_checkpoint, inference_loader, load_classifier

    os.chdir(repo)
    params = yaml.safe_load(Path("params.yaml").read_text())  # that revision's keys, unvalidated
    start = starting_classifier(read_backbone(), read_head(), params["finetune"])
    kept, checkpoint = load_classifier("models/finetuned.pt")
    blend, _ = load_classifier("models/finetuned.pt")
    start_state, kept_state = start.state_dict(), kept.state_dict()
    classes = load_classes(Path("data/prepared"))
    files = sorted(windows.rglob("*.png"))
    device, batch_size = torch.device("cpu"), params["extract"]["batch_size"]
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared"
        labels = [classes.index(path.parent.name) for path in files]
        save_prepared(prepared, {"test": ({"paths": [str(path) for path in files]}, labels)}, classes)
        loaders = {
            "grid": inference_loader("test", checkpoint, batch_size, 0, device),
            "dense": make_loader(
                for_checkpoint(checkpoint).dataset(prepared, "test", checkpoint), batch_size, device
            ),
        }
        measured: dict[str, Any] = {}
        for where, loader in loaders.items():
            for name, model in (("start", start), ("finetuned", kept)):
                measured[f"{where}_{name}"] = accuracy(model, loader, device, params["amp"])
            measured[f"{where}_shares"] = {}
            for share in BLENDS:
                blend.load_state_dict(interpolated_weights(start_state, kept_state, share))
                measured[f"{where}_shares"][f"{share:.1f}"] = accuracy(blend, loader, device, params["amp"])
            measured[f"{where}_examples"] = len(loader.dataset)
    return measured


def accuracy(model: Any, loader: Any, device: Any, amp: str) -> float:
    from pipeline.core.training import predict_logits

    logits, actual = predict_logits(model, loader, device, amp)
    return round((logits.argmax(1) == actual).double().mean().item(), 6)


def run(args: argparse.Namespace) -> None:
    repo = finetune_recipes.make_repo(args.work, args.set)
    windows = args.work / f"{args.set}-dense-windows"
    if not windows.is_dir():
        write_windows(windows, photo_patches.PHOTO_SETS[args.set])
    runs = results.load(NAME)["results"] if results.path_of(NAME).is_file() else []
    for seed in args.seeds:
        recorded = interpolation.recorded_run(args.set, seed)
        restored = interpolation.restore(repo, recorded["code"], args.set, seed)
        measured = interpolation.measure("benchmarks.dense_patches", "score", str(repo), str(windows))
        for model, key in (("fine-tuned model", "finetuned"), ("starting model", "start")):
            recorded_key = "probe" if key == "start" else key  # the start is the probe's head on the backbone
            if measured[f"grid_{key}"] != recorded[recorded_key]:
                raise SystemExit(
                    f"{args.set} seed {seed}: the {model} scores {measured[f'grid_{key}']} on the grid, "
                    f"the recorded run's {recorded_key} {recorded[recorded_key]}: not the same model"
                )
        blends = interpolation_record(args.set, seed)
        for share, scored in measured["grid_shares"].items():
            if scored != (expected := blends["shares"][share]["test_accuracy"]):
                raise SystemExit(
                    f"{args.set} seed {seed}: the blend at {share} scores {scored} on the grid, "
                    f"benchmarks.interpolation's {expected}: not the same model"
                )
        record = {
            "set": args.set,
            "seed": seed,
            "code": recorded["code"],
            "probe": recorded["probe"],  # evaluate's linear probe, on the grid
            "restored": restored,
            **measured,
            "ships_start": {  # where finetune.interpolate at the share ships the probe (val's verdict)
                share: interpolation.shipped(blends, float(share))[1] for share in measured["grid_shares"]
            },
        }
        runs = [r for r in runs if (r["set"], r["seed"]) != (args.set, seed)] + [record]
        results.save(NAME, COMMAND, runs)
        print(
            f"{args.set} seed {seed} (restored: {record['restored']}): FT - start, grid "
            f"{100 * (record['grid_finetuned'] - record['grid_start']):+.2f}, dense "
            f"{100 * (record['dense_finetuned'] - record['dense_start']):+.2f}",
            flush=True,
        )


def interpolation_record(name: str, seed: int) -> dict[str, Any]:
    """benchmarks.interpolation's record of the same run: its blends' val scores decide
    what finetune.interpolate ships."""
    for run in results.load(interpolation.NAME)["results"]:
        if (run["set"], run["seed"]) == (name, seed):
            return run
    raise SystemExit(
        f"no benchmarks.interpolation record of {name} seed {seed}; run "
        f"python -m benchmarks.interpolation run --set {name} --seeds {seed} first"
    )


def gain_cell(gains: list[float]) -> str:
    """Points over the probe: the mean over the seeds (the worst seed; how many under it)."""
    under = sum(gain < 0 for gain in gains)
    return f"{statistics.mean(gains):+.2f} ({min(gains):+.2f}; {under} of {len(gains)})"


def shipped_dense(run: dict[str, Any], share: float) -> float:
    """The dense-window accuracy of what finetune ships at ``share``: the kept model at 1;
    below, the blend, or the probe where val preferred it (benchmarks.interpolation)."""
    if share == 1:
        return run["dense_finetuned"]
    key = f"{share:.1f}"
    return run["dense_start"] if run["ships_start"][key] else run["dense_shares"][key]


def table(record: dict[str, Any], part: str = "models") -> str:
    """``models``: one row per set, the probe's accuracy on the grid and on the dense
    windows (means over the seeds) and the fine-tuned model's gain over it on each, the same
    models scored twice. ``shares``: on the dense windows, the gain of what finetune ships at
    each finetune.interpolate share (the blend, or the probe where val preferred it)."""
    sets = [name for name in photo_patches.PHOTO_SETS if any(r["set"] == name for r in record["results"])]
    if part == "shares":
        shares = (1.0, *BLENDS)
        columns = " | ".join(f"share {share:g}" + (" (shipped)" if share == 1 else "") for share in shares)
        lines = [f"| set | seeds | {columns} |", "|---|---:|" + "---:|" * len(shares)]
        for name in sets:
            runs = [run for run in record["results"] if run["set"] == name]
            cells = [
                gain_cell([100 * (shipped_dense(run, share) - run["dense_start"]) for run in runs])
                for share in shares
            ]
            lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines = [
        "| set | seeds | grid patches | probe, grid | FT − probe, grid (worst; seeds under) "
        "| dense windows | probe, dense | FT − probe, dense (worst; seeds under) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sets:
        runs = [run for run in record["results"] if run["set"] == name]
        cells = [str(len(runs))]
        for where in ("grid", "dense"):
            cells += [
                f"{runs[0][f'{where}_examples']:,}",
                f"{100 * statistics.mean(run[f'{where}_start'] for run in runs):.2f}%",
                gain_cell([100 * (run[f"{where}_finetuned"] - run[f"{where}_start"]) for run in runs]),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="score one patch set's recorded runs on the dense windows")
    runner.add_argument("--set", choices=list(photo_patches.PHOTO_SETS), required=True)
    runner.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    runner.add_argument("--work", type=Path, default=Path("/tmp/finetune-recipes"))
    measure = commands.add_parser("score", help="(internal) both models' scores in one work repository")
    measure.add_argument("repo", type=Path)
    measure.add_argument("windows", type=Path)
    commands.add_parser("table", help="print the results as a markdown table")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "score":
        print(json.dumps(scores(args.repo, args.windows.resolve())))
    else:
        print(table(results.load(NAME)))
        print()
        print(table(results.load(NAME), "shares"))


if __name__ == "__main__":
    main()
