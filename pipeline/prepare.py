"""Stage 1, prepare: a deterministic, stratified train/val/test split of the dataset.

Reads params ``seed`` and ``data.*``, and for ``imagefolder`` and ``cifar*`` the folder
``data.path`` under data/raw/. Writes data/prepared/: per split ``<split>.npz`` (uint8 images
and labels; digits, CIFAR) or ``<split>.json`` (image paths and labels; imagefolder, which
later stages stream from disk), classes.json and skipped.json.
Run: ``python -m pipeline.prepare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import PREPARED_DIR, seed_everything
from pipeline.data import cap_per_class, load_cifar, load_digits_dataset, save_prepared, stratified_split
from pipeline.entry import run_stage
from pipeline.errors import StageError
from pipeline.images import scan_tree, unreadable_files
from pipeline.params import load_params


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Stratified indices, as a clear error where a class has too few images to split."""
    try:
        return stratified_split(labels, val_fraction, test_fraction, seed)
    except ValueError as error:
        counts = np.bincount(labels)
        raise StageError(
            f"data: cannot split {len(labels)} images stratified by class (fewest in a class: "
            f"{counts[counts > 0].min()}): {error}; add images or lower data.val_fraction/test_fraction"
        ) from None


def prepare_splits(
    images: np.ndarray | list[str],
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    max_train_per_class: int,
    seed: int,
) -> dict[str, tuple[np.ndarray | list[str], np.ndarray]]:
    """Split, then cap the training images per class (few-shot); val and test stay whole."""
    indices = split_indices(labels, val_fraction, test_fraction, seed)
    indices["train"] = cap_per_class(indices["train"], labels, max_train_per_class, seed)
    return {name: (take(images, index), labels[index]) for name, index in indices.items()}


def take(images: np.ndarray | list[str], index: np.ndarray) -> np.ndarray | list[str]:
    return [images[i] for i in index] if isinstance(images, list) else images[index]


def imagefolder_splits(data: dict[str, Any], seed: int) -> tuple[dict, list[str], list[str]]:
    """Splits of a class-per-folder tree: its own train/val/test folders where it has them,
    else a stratified split; unreadable files are an error listing them all, or skipped."""
    tree = scan_tree(Path(data["path"]))
    problems = unreadable_files(
        [path for files in tree.files.values() for path, _ in files], data["num_workers"]
    )
    if problems and not data["skip_bad_images"]:
        raise StageError(
            f"data.path: {len(problems)} unreadable image file(s); fix or remove them, or set "
            "data.skip_bad_images: true to skip them:\n  "
            + "\n  ".join(f"{path}: {reason}" for path, reason in problems.items())
        )
    bad = set(problems)
    files = {
        split: (
            [str(p) for p, _ in pairs if str(p) not in bad],
            np.array([y for p, y in pairs if str(p) not in bad]),
        )
        for split, pairs in tree.files.items()
    }
    if "all" in files:
        splits = prepare_splits(
            *files["all"], data["val_fraction"], data["test_fraction"], data["max_train_per_class"], seed
        )
        return splits, tree.classes, sorted(bad)
    # The tree has its own splits: hold val and test out of train only where it lacks them.
    paths, labels = files["train"]
    fractions = {name: 0.0 if name in files else data[f"{name}_fraction"] for name in ("val", "test")}
    indices = split_indices(labels, fractions["val"], fractions["test"], seed)
    indices["train"] = cap_per_class(indices["train"], labels, data["max_train_per_class"], seed)
    splits = {name: (take(paths, index), labels[index]) for name, index in indices.items()}
    splits.update({name: files[name] for name in ("val", "test") if name in files})
    return splits, tree.classes, sorted(bad)


def main() -> None:
    params = load_params()
    data, seed = params["data"], params["seed"]
    seed_everything(seed)
    skipped: list[str] = []
    if data["dataset"] == "imagefolder":
        splits, classes, skipped = imagefolder_splits(data, seed)
    elif data["dataset"] in ("cifar10", "cifar100"):
        given, classes = load_cifar(data["dataset"], Path(data["path"]))
        images, labels = given["train"]
        indices = split_indices(labels, data["val_fraction"], 0.0, seed)
        train = cap_per_class(indices["train"], labels, data["max_train_per_class"], seed)
        splits = {
            "train": (images[train], labels[train]),
            "val": (images[indices["val"]], labels[indices["val"]]),
        }
        splits["test"] = given["test"]
    else:
        images, labels, classes = load_digits_dataset()
        splits = prepare_splits(
            images, labels, data["val_fraction"], data["test_fraction"], data["max_train_per_class"], seed
        )
    save_prepared(PREPARED_DIR, splits, classes, skipped)
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in splits.items())
    note = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
    print(f"prepare: {data['dataset']}, {len(classes)} classes; {sizes}{note} -> {PREPARED_DIR}")


if __name__ == "__main__":
    run_stage(main)
