"""Stage 3, extract: one pass of the frozen backbone over every split, cached to disk.

Reads params ``device``, ``amp``, ``data.num_workers``, ``extract.batch_size`` and
``distributed.{nproc_per_node,backend,timeout_s}`` (each process extracts a share); reads
data/prepared/ (and the image files it lists, streamed by DataLoader workers) and
models/backbone.pt, whose preprocessing says how inputs are fed; writes
data/features/{train,val,test}.pt (pooled float32 features, labels, class names) and
data/features/summary.json (each split's examples, and for texts how many were truncated to
``backbone.max_length``, which the report shows).
Run: ``python -m pipeline.extract``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pipeline.core import distributed
from pipeline.core.checkpoints import read_backbone
from pipeline.core.common import FEATURES_DIR, FEATURES_SUMMARY, PREPARED_DIR, atomic_path, write_json
from pipeline.core.data import SPLITS, load_classes
from pipeline.core.entry import run_stage
from pipeline.core.training import extract_features
from pipeline.modalities import inference_loader, load_backbone, load_params


def split_features(
    split: str,
    backbone: torch.nn.Module,
    preprocessing: dict[str, Any],
    batch_size: int,
    num_workers: int,
    ranks: distributed.Ranks,
    device: torch.device,
    amp: str,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """One split's features and labels, in dataset order (each process computes its share),
    and what its summary says of it: how many examples, how many truncated (texts)."""
    loader = inference_loader(split, preprocessing, batch_size, num_workers, device, ranks)
    features, labels = extract_features(backbone, loader, device, amp, desc=split)
    summary = {"examples": len(labels)}
    if hasattr(loader.dataset, "truncated"):
        summary["truncated"] = loader.dataset.truncated
    return features, labels, summary


def main() -> None:
    params = load_params()
    _, ranks, device = distributed.start("extract", params["distributed"], params["device"])
    checkpoint = read_backbone()
    backbone = load_backbone(checkpoint)
    classes = load_classes(PREPARED_DIR)
    summary = {}
    # Each split is written as soon as it is done and then let go, so memory holds one
    # split's features at a time; rank 0 alone writes, into a folder swapped in at the end.
    with atomic_path(FEATURES_DIR) if ranks.main else contextlib.nullcontext() as tmp:
        if ranks.main:
            tmp.mkdir()
        for split in SPLITS:
            values, labels, summary[split] = split_features(
                split,
                backbone,
                checkpoint,
                params["extract"]["batch_size"],
                params["data"]["num_workers"],
                ranks,
                device,
                params["amp"],
            )
            if ranks.main:
                torch.save({"features": values, "labels": labels, "classes": classes}, tmp / f"{split}.pt")
                print(f"extract: {split}: {tuple(values.shape)} features")
            del values, labels
        if ranks.main:
            write_json(tmp / FEATURES_SUMMARY.name, summary)


if __name__ == "__main__":
    run_stage(main, "extract", distributed=True)
