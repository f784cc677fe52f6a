"""Stage 3, extract: one pass of the frozen backbone over every split, cached to disk.

Reads params ``device``, ``amp``, ``data.num_workers`` and ``extract.batch_size``; reads
data/prepared/ (and the image files it lists, streamed by DataLoader workers) and
models/backbone.pt; writes data/features/{train,val,test}.pt (pooled float32 features,
labels, class names). Run: ``python -m pipeline.extract``.
"""

from __future__ import annotations

import torch

from pipeline.common import (
    BACKBONE_FILE,
    FEATURES_DIR,
    PREPARED_DIR,
    atomic_path,
    load_torch,
    resolve_device,
    run_stage,
)
from pipeline.data import SPLITS, checkpoint_transform, load_classes, loader_workers, split_dataset
from pipeline.models import load_backbone
from pipeline.params import load_params
from pipeline.training import extract_features, make_loader


def main() -> None:
    params = load_params()
    device = resolve_device(params["device"])
    checkpoint = load_torch(BACKBONE_FILE)
    backbone = load_backbone(checkpoint)
    transform = checkpoint_transform(checkpoint)
    classes = load_classes(PREPARED_DIR)
    with atomic_path(FEATURES_DIR) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            dataset = split_dataset(PREPARED_DIR, split, transform)
            workers = loader_workers(dataset, params["data"]["num_workers"])
            loader = make_loader(dataset, params["extract"]["batch_size"], device, num_workers=workers)
            features, targets = extract_features(backbone, loader, device, params["amp"], desc=split)
            torch.save({"features": features, "labels": targets, "classes": classes}, tmp / f"{split}.pt")
            print(f"extract: {split}: {tuple(features.shape)} features")


if __name__ == "__main__":
    run_stage(main)
