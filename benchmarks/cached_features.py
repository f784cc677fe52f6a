"""Benchmark: training the head on cached features vs the plain PyTorch loop.

The plain loop runs the frozen backbone forward on every batch of every epoch; the pipeline
runs it once (extract) and trains the head on the cached features (train_head). Both train
the same linear head for the same number of epochs on the digits at the default image size.
Run from the repository root: ``python -m benchmarks.cached_features [--epochs 30]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from benchmarks import results
from pipeline.core.common import seed_everything
from pipeline.core.data import stratified_split
from pipeline.core.loaders import make_loader
from pipeline.core.training import extract_features, fit_head, to_device
from pipeline.modalities.images.data import ImageArrayDataset, image_transform, load_digits_dataset
from pipeline.modalities.images.models import PLAIN_MEAN, PLAIN_STD, build_backbone


def datasets(image_size: int) -> dict[str, ImageArrayDataset]:
    images, labels, _ = load_digits_dataset()
    transform = image_transform(image_size, PLAIN_MEAN, PLAIN_STD)
    split = stratified_split(labels, 0.15, 0.25, seed=0)
    return {name: ImageArrayDataset(images[i], labels[i], transform) for name, i in split.items()}


def cached(backbone: nn.Module, data: dict, epochs: int, device: torch.device) -> tuple[float, float]:
    """Seconds for extract-once plus head training, and the seconds of the extraction alone."""
    start = time.perf_counter()
    train = extract_features(backbone, make_loader(data["train"], 256, device), device, "off")
    val = extract_features(backbone, make_loader(data["val"], 256, device), device, "off")
    extracted = time.perf_counter() - start
    fit_head(nn.Linear(train[0].shape[1], 10), train, val, 1e-3, 1e-4, 64, epochs, epochs, seed=0)
    return time.perf_counter() - start, extracted


def plain_loop(backbone: nn.Module, data: dict, epochs: int, device: torch.device) -> float:
    """Seconds for the textbook loop: frozen backbone forward inside every training step."""
    backbone.eval().to(device)
    head = nn.Linear(512, 10).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = make_loader(data["train"], 64, device, shuffle=True)
    val_loader = make_loader(data["val"], 256, device)
    start = time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            with torch.no_grad():
                features = backbone(to_device(images, device))
            loss = nn.functional.cross_entropy(head(features), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for images, _ in val_loader:
                head(backbone(to_device(images, device)))
    return time.perf_counter() - start


NAME = "cached_features"


def table(record: dict) -> str:
    """Seconds of each method and the speed-up, from the results file."""
    r = record["results"]
    return "\n".join(
        [
            "| method | seconds |",
            "|---|---:|",
            f"| plain PyTorch loop (backbone forward every epoch) | {r['plain_seconds']:.1f} |",
            f"| pipeline: extract once ({r['extraction_seconds']:.1f} s) + head on cached features "
            f"| {r['pipeline_seconds']:.1f} |",
            f"| speed-up | {r['plain_seconds'] / r['pipeline_seconds']:.1f}x |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    seed_everything(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, _ = build_backbone("resnet18")
    data = datasets(args.image_size)
    ours, extraction = cached(backbone, data, args.epochs, device)
    plain = plain_loop(backbone, data, args.epochs, device)
    measured = {
        "device": str(device),
        "epochs": args.epochs,
        "training_images": len(data["train"]),
        "plain_seconds": round(plain, 2),
        "pipeline_seconds": round(ours, 2),
        "extraction_seconds": round(extraction, 2),
    }
    command = f"python -m benchmarks.cached_features --epochs {args.epochs} --image-size {args.image_size}"
    print(table(results.save(NAME, command, measured)))


if __name__ == "__main__":
    main()
