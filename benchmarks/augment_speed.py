"""Benchmark: does the photo augmentation make fine-tuning data-bound?

On cifar10-dev's 500 training photos at 96 px (EfficientNet-Lite0's preprocessing), for each
augmentation policy: the images a second the DataLoader delivers alone (files decoded and
augmented in ``--workers`` worker processes, as finetune runs them), and the images a second
of the whole training step (that loader feeding Lite0 forward and backward, batch 64, on
this machine's CPU), all in one run. The loop is data-bound where the loader alone is not
clearly faster than the training step. Writes benchmarks/results/augment_speed.json.
Run from the repository root: ``python -m benchmarks.augment_speed [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import results
from benchmarks.finetune_recipes import CIFAR10_DEV
from pipeline.core.common import seed_everything
from pipeline.core.data import SeededAugmentation
from pipeline.core.loaders import make_loader
from pipeline.core.training import to_device
from pipeline.modalities.images.data import ImageFileDataset, checkpoint_transform, images_under
from pipeline.modalities.images.models import LITE_MEAN, LITE_STD, build_backbone

NAME = "augment_speed"
POLICIES = ("jitter", "photo", "strong")
SIZE = 96
LITE0 = {"image_size": SIZE, "resize_size": round(SIZE * 256 / 224), "mean": LITE_MEAN, "std": LITE_STD}


def loader(
    policy: str, workers: int, batch: int, photos: Path = CIFAR10_DEV, device: str = "cpu"
) -> torch.utils.data.DataLoader:
    """The training photos of ``photos`` (cifar10-dev) under ``policy``, as finetune loads them."""
    paths = sorted(images_under(photos / "train"))
    classes = sorted({path.parent.name for path in paths})
    labels = [classes.index(path.parent.name) for path in paths]
    dataset = SeededAugmentation(
        ImageFileDataset([str(p) for p in paths], labels, checkpoint_transform(LITE0, policy)), 0
    )
    return make_loader(dataset, batch, torch.device(device), shuffle=True, num_workers=workers)


def images_per_second(data: torch.utils.data.DataLoader, epochs: int, step=None) -> float:
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        data.dataset.set_epoch(epoch)
        for images, labels in data:
            if step is not None:
                step(images, labels)
            seen += len(labels)
    return round(seen / (time.perf_counter() - start), 1)


def table(measured: dict) -> str:
    """The README's table: each policy's images a second, loader alone and training step."""
    lines = [
        "| augmentation | loader alone (images/s) | training step (images/s) | loader ÷ training |",
        "|---|---:|---:|---:|",
    ]
    for policy, speeds in measured["results"].items():
        loader, training = speeds["loader_images_per_second"], speeds["training_images_per_second"]
        lines.append(f"| {policy} | {loader:.1f} | {training:.1f} | {loader / training:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the results file as a table, run nothing")
    args = parser.parse_args()
    if args.table:
        print(table(results.load(NAME)))
        return
    seed_everything(0)
    model = nn.Sequential(build_backbone("efficientnet_lite0", image_size=SIZE)[0], nn.LazyLinear(10))
    model(torch.zeros(2, 3, SIZE, SIZE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(model(to_device(images, torch.device("cpu"))), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    measured = {}
    for policy in POLICIES:
        data = loader(policy, args.workers, 64)
        measured[policy] = {
            "loader_images_per_second": images_per_second(data, args.epochs),
            "training_images_per_second": images_per_second(data, args.epochs, train_step),
        }
        print(f"augment_speed: {policy}: {measured[policy]}", flush=True)
    command = f"python -m benchmarks.augment_speed --epochs {args.epochs} --workers {args.workers}"
    print(table(results.save(NAME, command, measured)))


if __name__ == "__main__":
    main()
