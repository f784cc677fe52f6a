"""Write a prepared split's examples as files to try predict on.

    python -m pipeline samples data/samples --split test --per-class 5

Images go one folder per class: an in-memory dataset (digits, CIFAR) as lossless PNGs named
by each image's index in the split (``<class>/test-00042.png``), so predict sees the very
pixels evaluate saw; a dataset of image files is copied. Texts go to one CSV,
``<split>.csv`` (columns index, text, label). The folder must not exist yet: nothing is
overwritten. Reads data/prepared/ (run ``dvc repro prepare`` first) and params'
``data.modality``, whose package writes the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline import modalities
from pipeline.core.common import PREPARED_DIR
from pipeline.core.data import SPLITS, load_classes, load_split
from pipeline.core.entry import run_tool
from pipeline.core.errors import ParamsError


def chosen(labels: np.ndarray, per_class: int) -> list[int]:
    """Each class's first ``per_class`` images in the split (all of them for 0), in order."""
    taken: dict[int, int] = {}
    keep = []
    for index, label in enumerate(labels.tolist()):
        if per_class == 0 or taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(index)
    return keep


def write_samples(out: Path, split: str, per_class: int, prepared_dir: Path = PREPARED_DIR) -> int:
    """Write the files, as the run's modality (params' ``data.modality``) writes its inputs;
    return how many."""
    _, labels = load_split(prepared_dir, split)
    keep = chosen(labels, per_class)
    modality = modalities.get(modalities.load_params(check_models=False)["data"]["modality"])
    modality.write_samples(prepared_dir, split, keep, load_classes(prepared_dir), out)
    return len(keep)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new folder to write <class>/<file> into")
    parser.add_argument("--split", default="test", choices=SPLITS, help="which prepared split (default test)")
    parser.add_argument("--per-class", type=int, default=5, help="images per class; 0 for all (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.per_class < 0:
        raise ParamsError(f"--per-class: must be 0 (all) or more, got {args.per_class}")
    if args.out.exists():
        raise ParamsError(f"{args.out}: already exists; give a new folder (nothing is overwritten)")
    count = write_samples(args.out, args.split, args.per_class)
    print(f"samples: {count} {args.split} example(s) under {args.out}/")
    return 0


if __name__ == "__main__":
    run_tool(main)
