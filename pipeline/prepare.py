"""Stage 1, prepare: a deterministic, stratified train/val/test split of the dataset.

Reads params ``seed`` and ``data.*``; writes data/prepared/ ({train,val,test}.npz with uint8
images and labels, classes.json). Run: ``python -m pipeline.prepare``.
"""

from __future__ import annotations

import numpy as np

from pipeline.common import PREPARED_DIR, run_stage, seed_everything
from pipeline.data import cap_per_class, load_digits_dataset, save_prepared, stratified_split
from pipeline.params import load_params


def prepare_splits(
    images: np.ndarray,
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    max_train_per_class: int,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split, then cap the training images per class (few-shot); val and test stay whole."""
    indices = stratified_split(labels, val_fraction, test_fraction, seed)
    indices["train"] = cap_per_class(indices["train"], labels, max_train_per_class, seed)
    return {name: (images[index], labels[index]) for name, index in indices.items()}


def main() -> None:
    params = load_params()
    data, seed = params["data"], params["seed"]
    seed_everything(seed)
    images, labels, classes = load_digits_dataset()
    splits = prepare_splits(
        images, labels, data["val_fraction"], data["test_fraction"], data["max_train_per_class"], seed
    )
    save_prepared(PREPARED_DIR, splits, classes)
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in splits.items())
    print(f"prepare: {data['dataset']}, {len(classes)} classes; {sizes} -> {PREPARED_DIR}")


if __name__ == "__main__":
    run_stage(main)
