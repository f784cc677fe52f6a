"""Stage 1, prepare: a deterministic, stratified train/val/test split of the dataset.

Reads params ``seed`` and ``data.*``, and the data under ``data.path`` (data/raw/) where
the dataset is not bundled. Writes data/prepared/ (pipeline.core.data): per split
``<split>.npz`` (images in memory: digits, CIFAR) or ``<split>.json`` (image file paths,
which later stages stream; or texts), classes.json and skipped.json. What a modality reads
and how it checks it is its own (pipeline.modalities).
Run: ``python -m pipeline.prepare``.
"""

from __future__ import annotations

from pipeline import modalities
from pipeline.core.common import PREPARED_DIR, seed_everything
from pipeline.core.data import save_prepared
from pipeline.core.entry import run_stage
from pipeline.modalities import load_params


def main() -> None:
    params = load_params()
    data, seed = params["data"], params["seed"]
    seed_everything(seed)
    modality = modalities.get(params["data"]["modality"])
    splits, classes, skipped = modality.prepare_splits(data, seed)
    save_prepared(PREPARED_DIR, splits, classes, skipped)
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in splits.items())
    note = f"; skipped {len(skipped)} unreadable or empty input(s)" if skipped else ""
    print(f"prepare: {data['dataset']}, {len(classes)} classes; {sizes}{note} -> {PREPARED_DIR}")


if __name__ == "__main__":
    run_stage(main, "prepare")
