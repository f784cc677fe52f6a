"""Benchmark: each stage's time per image and the largest process's peak memory, on N and
``factor`` x N photos.

Each stage runs as DVC runs it, ``python -m pipeline.<stage>`` in a fresh process, in a
scratch folder: its wall time comes from its metrics/time/<stage>.json, its peak resident
memory from ``os.wait4`` (the largest process of its tree: DataLoader workers included).
The photos are generated JPEGs, smooth random colour fields at CIFAR's 32 px by default,
which cost what real ones of their size cost to decode; accuracy means nothing here.
Fine-tuning runs one epoch. Run from the repository root:
``python -m benchmarks.scale [--images 6000] [--factor 10] [--side 32] [--arch efficientnet_lite0]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks import results
from benchmarks.loop_speed import smooth_photo
from pipeline.core.common import STAGES as PIPELINE_STAGES
from pipeline.core.entry import recorded_stage_times

ROOT = Path(__file__).resolve().parents[1]
NAME = "scale"
STAGES = tuple(stage for stage in PIPELINE_STAGES if stage != "report")
CLASSES = 10


def write_photos(root: Path, images: int, side: int) -> None:
    """``images`` square JPEGs of ``side`` px (loop_speed.smooth_photo) in CLASSES class folders."""
    rng = np.random.default_rng(0)
    for index in range(images):
        folder = root / f"class_{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth_photo(rng, side, side).save(folder / f"{index}.jpg", quality=90)


def stage_params(side: int, arch: str) -> dict:
    """The committed params, on an image folder at ``side`` px, ``arch`` at random init
    (no weights to fetch, no glyph pretraining), one fine-tuning epoch."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", path="data/raw/images")
    params["backbone"].update(arch=arch, weights="none", image_size=side)
    params["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=0)
    return params


def run_measured(stage: str, work: Path) -> float:
    """Run one stage in ``work``; the peak resident memory (MiB) of its largest process."""
    process = subprocess.Popen([sys.executable, "-m", f"pipeline.{stage}"], cwd=work)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"scale: {stage} failed with status {process.returncode}")
    return usage.ru_maxrss / 1024


def measure(images: int, side: int, arch: str) -> dict:
    """Every stage's seconds and peak MiB over ``images`` photos, and the features' size."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "pipeline", work / "pipeline")
        write_photos(work / "data" / "raw" / "images", images, side)
        (work / "params.yaml").write_text(yaml.safe_dump(stage_params(side, arch)))
        stages = {}
        for stage in STAGES:
            peak = run_measured(stage, work)
            seconds = recorded_stage_times(work)[stage]["seconds"]
            stages[stage] = {"seconds": seconds, "peak_mib": round(peak, 1)}
            print(f"scale: {images} images: {stage} {seconds:.1f} s, {peak:.0f} MiB", flush=True)
        splits = [torch.load(work / f"data/features/{split}.pt") for split in ("train", "val", "test")]
        features = sum(split["features"].nbytes for split in splits)
    return {"images": images, "features_mib": round(features / 2**20, 1), "stages": stages}


def table(record: dict) -> str:
    """Per stage: milliseconds per image and peak memory at both sizes, and their ratios."""
    small, large = record["results"]["runs"]
    n, m = small["images"], large["images"]
    rows = [
        f"| stage | ms/image, {n:,} | ms/image, {m:,} | ratio "
        f"| peak MiB, {n:,} | peak MiB, {m:,} | growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        a, b = small["stages"][stage], large["stages"][stage]
        per_a, per_b = 1000 * a["seconds"] / n, 1000 * b["seconds"] / m
        rows.append(
            f"| {stage} | {per_a:.2f} | {per_b:.2f} | {per_b / per_a:.2f} | {a['peak_mib']:.0f} "
            f"| {b['peak_mib']:.0f} | {b['peak_mib'] - a['peak_mib']:+.0f} |"
        )
    total_a = sum(s["seconds"] for s in small["stages"].values())
    total_b = sum(s["seconds"] for s in large["stages"].values())
    peak_a = max(s["peak_mib"] for s in small["stages"].values())
    peak_b = max(s["peak_mib"] for s in large["stages"].values())
    rows.append(
        f"| whole run | {1000 * total_a / n:.2f} | {1000 * total_b / m:.2f} | "
        f"{total_b * n / (total_a * m):.2f} | {peak_a:.0f} | {peak_b:.0f} | {peak_b - peak_a:+.0f} |"
    )
    added = large["features_mib"] - small["features_mib"]
    return "\n".join(rows) + (
        f"\n\nThe largest process grows by {peak_b - peak_a:.0f} MiB for {added:.0f} MiB of added "
        f"features ({(peak_b - peak_a) / added:.2f}x); the whole run takes {total_a:.0f} s "
        f"and {total_b:.0f} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--arch", default="efficientnet_lite0")
    args = parser.parse_args()
    runs = [measure(count, args.side, args.arch) for count in (args.images, args.factor * args.images)]
    measured = {"side": args.side, "arch": args.arch, "runs": runs}
    command = (
        f"python -m benchmarks.scale --images {args.images} --factor {args.factor} "
        f"--side {args.side} --arch {args.arch}"
    )
    print(table(results.save(NAME, command, measured)))


if __name__ == "__main__":
    main()
