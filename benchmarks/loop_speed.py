"""Benchmark: is the fine-tuning loop fed? The loop from photo files on disk against the same
step on images already on the device.

For each backbone, at 224 px, batch 64, as finetune runs it with the committed params
(photo augmentation, deterministic kernels, ``amp: auto``, channels-last; the files decoded
in ``data.num_workers: auto`` DataLoader workers kept across epochs): the images a second of
``train_epoch`` fed from JPEG files, and of the same ``train_epoch`` over random images
already on the device. The loop is fed where the first is close to the second. The photos
are generated, 500x375 JPEGs (a real photo's size, smooth random colour fields), which cost
what real ones of that size cost to decode. Writes benchmarks/results/loop_speed.json;
``benchmarks.gpu`` runs the same measurement on a GPU. Run from the repository root:
``python -m benchmarks.loop_speed [--photos 192] [--epochs 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks import results
from pipeline.core.common import resolve_device, seed_everything
from pipeline.core.data import SeededAugmentation
from pipeline.core.distributed import GlobalBatchSampler, Ranks
from pipeline.core.loaders import make_loader, worker_count
from pipeline.core.models import Classifier
from pipeline.core.training import grad_scaler, train_epoch
from pipeline.modalities.images.data import ImageFileDataset, image_transform
from pipeline.modalities.images.models import LITE_MEAN, LITE_STD, build_backbone

NAME = "loop_speed"
ARCHS = ("efficientnet_lite0", "resnet50")
SIZE, RESIZE, BATCH, CLASSES = 224, 256, 64, 10
PHOTO = (500, 375)  # width, height


def smooth_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A generated photo: random colours on a grid 4 wide (as many high as the aspect
    gives), blown up to ``width`` x ``height``; a JPEG of it costs what a real photo of that
    size costs to decode."""
    coarse = rng.integers(0, 256, (max(1, round(4 * height / width)), 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def write_photos(folder: Path, count: int) -> list[tuple[str, int]]:
    """``count`` JPEGs of PHOTO's size, with their labels."""
    rng = np.random.default_rng(0)
    files = []
    for index in range(count):
        path = folder / f"{index}.jpg"
        smooth_photo(rng, *PHOTO).save(path, quality=90)
        files.append((str(path), index % CLASSES))
    return files


def wait_for(device: torch.device) -> None:
    """Let the GPU finish what is queued: a clock read before that times the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_classifier(arch: str, size: int) -> nn.Module:
    """``arch`` at random init (seeded) with a CLASSES-way linear head, for ``size`` px."""
    torch.manual_seed(0)
    backbone, features = build_backbone(arch, image_size=size)
    return Classifier(backbone, nn.Linear(features, CLASSES))


def fresh_model(arch: str, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = fresh_classifier(arch, SIZE).to(device, memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def timed_epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, device: torch.device, epochs: int
) -> float:
    """Images a second of ``epochs`` of train_epoch over ``loader``, after one untimed epoch
    (the workers' start, the kernels' first calls)."""
    scaler, loss = grad_scaler(device, "auto"), nn.CrossEntropyLoss()
    for epoch in range(epochs + 1):
        for reseeded in (loader.sampler, loader.dataset):
            if hasattr(reseeded, "set_epoch"):
                reseeded.set_epoch(epoch)
        if epoch == 1:
            wait_for(device)
            start = time.perf_counter()
        train_epoch(model, loader, loss, device, optimizer, scaler, amp="auto")
    wait_for(device)
    return epochs * len(loader.sampler) / (time.perf_counter() - start)


def files_loader(files: list[tuple[str, int]], device: torch.device) -> Any:
    """The photos as finetune loads them: decoded and augmented in worker processes."""
    paths, labels = zip(*files, strict=True)
    transform = image_transform(SIZE, LITE_MEAN, LITE_STD, "photo", RESIZE)
    dataset = SeededAugmentation(ImageFileDataset(list(paths), list(labels), transform), seed=0)
    sampler = GlobalBatchSampler(len(files), BATCH, Ranks(), seed=0)
    return make_loader(dataset, BATCH, device, num_workers=worker_count("auto"), sampler=sampler)


def memory_loader(count: int, device: torch.device) -> Any:
    """As many random images, already on the device: the step alone."""
    images = torch.rand(count, 3, SIZE, SIZE, device=device)
    labels = torch.randint(0, CLASSES, (count,), device=device)
    # Built with the CPU's settings: the images are already on the device (nothing to pin).
    return make_loader(TensorDataset(images, labels), BATCH, torch.device("cpu"))


def loop_rows(device: torch.device, photos: int, epochs: int, archs: tuple[str, ...] = ARCHS) -> list[dict]:
    """Per backbone: the loop fed from files and the step alone, in images a second."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = write_photos(Path(tmp), photos)
        for arch in archs:
            seed_everything(0)  # what finetune does first: deterministic kernels
            step = timed_epochs(*fresh_model(arch, device), memory_loader(photos, device), device, epochs)
            loop = timed_epochs(*fresh_model(arch, device), files_loader(files, device), device, epochs)
            rows.append(
                {
                    "arch": arch,
                    "size": SIZE,
                    "batch": BATCH,
                    "workers": worker_count("auto"),
                    "images_per_second": round(loop, 1),
                    "step_images_per_second": round(step, 1),
                }
            )
            print(f"loop_speed: {rows[-1]}", flush=True)
    return rows


def table(record: dict) -> str:
    where = record["machine"]["gpu"] or "CPU"
    lines = [
        f"| backbone, 224 px, batch 64 ({where}) | loop from JPEG files (images/s) "
        "| step on images in memory (images/s) | loop ÷ step |",
        "|---|---:|---:|---:|",
    ]
    for row in record["results"]["loop"]:
        ratio = row["images_per_second"] / row["step_images_per_second"]
        lines.append(
            f"| {row['arch']} ({row['workers']} workers) | {row['images_per_second']:.1f} "
            f"| {row['step_images_per_second']:.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = loop_rows(resolve_device(args.device), args.photos, args.epochs)
    command = f"python -m benchmarks.loop_speed --photos {args.photos} --epochs {args.epochs}"
    print(table(results.save(NAME, command, {"loop": rows})))


if __name__ == "__main__":
    main()
