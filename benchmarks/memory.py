"""Benchmark: peak memory of prepare plus extract on an image folder, 1x vs 4x the images.

prepare checks every file and extract runs the backbone over every split, both streaming
the images through DataLoader workers, so memory should not grow with the dataset's size.
The three stages (prepare, backbone at random init, extract) run one after the other in one
fresh process per size; the figure is its peak resident memory (``ru_maxrss``), DataLoader
workers included. Run from the repository root:
``python -m benchmarks.memory [--per-class 150] [--side 256]``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks import results

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(root: Path, per_class: int, side: int, classes: int = 2) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def peak_memory_mb(per_class: int, side: int) -> float:
    """Peak resident memory (MiB) of prepare and extract over ``2 * per_class`` images."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "pipeline", work / "pipeline")
        write_image_folder(work / "data" / "raw" / "images", per_class, side)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["data"].update(dataset="imagefolder", path="data/raw/images", num_workers=2)
        params["backbone"].update(weights="none", image_size=64)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        stages = "from pipeline import backbone, extract, prepare\n" + "\n".join(
            f"{stage}.main()" for stage in ("prepare", "backbone", "extract")
        )
        subprocess.run([sys.executable, "-c", stages], cwd=work, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def measure(per_class: int, side: int) -> tuple[float, float]:
    """Peak memory at 1x and at 4x the images, each in a fresh measuring process."""
    peaks = []
    for count in (per_class, 4 * per_class):
        command = [sys.executable, "-m", "benchmarks.memory", "--single", "--per-class", str(count)]
        result = subprocess.run(
            [*command, "--side", str(side)], cwd=ROOT, check=True, capture_output=True, text=True
        )
        peaks.append(float(result.stdout.strip().splitlines()[-1]))
    return peaks[0], peaks[1]


NAME = "memory"


def table(record: dict) -> str:
    """Peak memory at 1x and 4x the images, and their ratio, from the results file."""
    r = record["results"]
    return "\n".join(
        [
            "| images | peak memory (MiB) |",
            "|---:|---:|",
            f"| {r['images']} | {r['peak_mib'][0]:.0f} |",
            f"| {4 * r['images']} | {r['peak_mib'][1]:.0f} |",
            f"| ratio | {r['peak_mib'][1] / r['peak_mib'][0]:.2f} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--single", action="store_true", help="measure one size only and print MiB")
    args = parser.parse_args()
    if args.single:
        print(peak_memory_mb(args.per_class, args.side))
        return
    one, four = measure(args.per_class, args.side)
    measured = {"images": 2 * args.per_class, "side": args.side, "peak_mib": [round(one, 1), round(four, 1)]}
    command = f"python -m benchmarks.memory --per-class {args.per_class} --side {args.side}"
    print(table(results.save(NAME, command, measured)))


if __name__ == "__main__":
    main()
