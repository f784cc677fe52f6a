"""Stage 3, extract: one pass of the frozen backbone over every split, cached to disk.

Reads params ``device``, ``amp``, ``data.num_workers``, ``extract.batch_size`` and
``distributed.{nproc_per_node,backend,timeout_s}`` (each process extracts a share); reads
data/prepared/ (and the image files it lists, streamed by DataLoader workers) and
models/backbone.pt; writes data/features/{train,val,test}.pt (pooled float32 features,
labels, class names). Run: ``python -m pipeline.extract``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline import distributed
from pipeline.checkpoints import read_backbone
from pipeline.common import FEATURES_DIR, PREPARED_DIR, atomic_path
from pipeline.data import SPLITS, checkpoint_transform, load_classes
from pipeline.entry import run_stage
from pipeline.models import load_backbone
from pipeline.params import load_params
from pipeline.training import extract_features, inference_loader


def split_features(
    split: str,
    backbone: torch.nn.Module,
    transform: Callable,
    batch_size: int,
    num_workers: int,
    ranks: distributed.Ranks,
    device: torch.device,
    amp: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's features and labels, in dataset order; each process computes its share."""
    loader = inference_loader(split, transform, batch_size, num_workers, device, ranks)
    return extract_features(backbone, loader, device, amp, desc=split)


def main() -> None:
    params = load_params()
    _, ranks, device = distributed.start("extract", params["distributed"], params["device"])
    checkpoint = read_backbone()
    backbone = load_backbone(checkpoint)
    transform = checkpoint_transform(checkpoint)
    classes = load_classes(PREPARED_DIR)
    features = {
        split: split_features(
            split,
            backbone,
            transform,
            params["extract"]["batch_size"],
            params["data"]["num_workers"],
            ranks,
            device,
            params["amp"],
        )
        for split in SPLITS
    }
    if not ranks.main:
        return
    with atomic_path(FEATURES_DIR) as tmp:
        tmp.mkdir()
        for split, (values, labels) in features.items():
            torch.save({"features": values, "labels": labels, "classes": classes}, tmp / f"{split}.pt")
            print(f"extract: {split}: {tuple(values.shape)} features")


if __name__ == "__main__":
    run_stage(main, stage="extract")
