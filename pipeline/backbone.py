"""Stage 2, backbone: materialize the pretrained backbone's weights into one pinned file.

Reads params ``seed``, ``device``, ``amp``, ``backbone.*`` and ``distributed.*`` (pretraining
runs in that many processes under DistributedDataParallel). ``backbone.weights`` is ``pretrain``
(train on the synthetic glyph task, offline), ``none`` (random init), a torchvision weights
name (torchvision's download and cache) or a local checkpoint path. Writes
models/backbone.pt (arch, state dict without classifier, feature size, preprocessing) and
metrics/backbone.json. Run: ``python -m pipeline.backbone``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline import distributed
from pipeline.checkpoints import BackboneCheckpoint, backbone_checkpoint
from pipeline.common import BACKBONE_FILE, METRICS_DIR, save_torch, seed_everything, write_json
from pipeline.data import ImageArrayDataset, image_transform
from pipeline.entry import run_stage
from pipeline.glyphs import render_glyph_dataset
from pipeline.models import (
    PLAIN_MEAN,
    PLAIN_STD,
    Classifier,
    build_backbone,
    download_backbone,
    load_checkpoint_backbone,
)
from pipeline.params import load_params
from pipeline.training import fit, last_epoch, make_loader, optimizer_steps, warmup_cosine


def pretrain_on_glyphs(
    arch: str,
    image_size: int,
    images: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    amp: str,
    ranks: distributed.Ranks,
    sync_batchnorm: bool = False,
    max_batch_per_process: int = 0,
) -> tuple[nn.Module, int, float]:
    """Train ``arch`` from scratch on rendered glyphs (``batch_size`` the global batch, shared
    by the processes); returns backbone, feature size and the accuracy on a held-out 5%."""
    glyphs, labels, classes = render_glyph_dataset(images, image_size, seed)
    held_out = max(1, len(labels) // 20)
    transform = image_transform(image_size, PLAIN_MEAN, PLAIN_STD)
    train = ImageArrayDataset(glyphs[held_out:], labels[held_out:], transform)
    val = ImageArrayDataset(glyphs[:held_out], labels[:held_out], transform)
    per_process, accumulate = distributed.split_batch(
        batch_size, ranks.world_size, max_batch_per_process, "backbone.pretrain_batch_size"
    )
    train_sampler = distributed.GlobalBatchSampler(len(train), batch_size, ranks, seed)
    train_loader = make_loader(train, per_process, device, sampler=train_sampler)
    val_loader = make_loader(val, 512, device, sampler=distributed.ShardSampler(len(val), ranks))

    backbone, features = build_backbone(arch, image_size=image_size)
    model = Classifier(backbone, nn.Linear(features, len(classes)))
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * optimizer_steps(train_loader, accumulate)
    scheduler = warmup_cosine(optimizer, warmup_steps=max(1, steps // 10), total_steps=steps)

    def report(record: dict[str, float]) -> None:
        print(
            f"pretrain epoch {record['epoch']}/{epochs}: loss {record['train_loss']:.3f}, "
            f"held-out accuracy {record['val_accuracy']:.3f}"
        )

    kept, history = fit(
        distributed.parallel(model, ranks, device, sync_batchnorm),
        train_loader,
        val_loader,
        nn.CrossEntropyLoss(),
        optimizer,
        epochs,
        device,
        select=last_epoch,
        scheduler=scheduler,
        amp=amp,
        on_epoch=report,
        accumulate=accumulate,
    )
    model.load_state_dict(kept)
    return model.backbone.cpu(), features, history[-1]["val_accuracy"]


def materialize(
    arch: str, weights: str, image_size: int, pretrain: Callable[[], tuple[nn.Module, int, float]]
) -> tuple[BackboneCheckpoint, dict[str, float]]:
    """The backbone checkpoint and its metrics for ``weights``; ``pretrain`` trains one on the
    glyph task (weights: pretrain)."""
    mean, std, resize, metrics = PLAIN_MEAN, PLAIN_STD, image_size, {}
    if weights == "pretrain":
        model, features, accuracy = pretrain()
        metrics["pretrain_accuracy"] = round(accuracy, 6)
    elif weights == "none":
        model, features = build_backbone(arch, image_size=image_size)
    elif Path(weights).is_file():
        model, features = load_checkpoint_backbone(arch, weights, image_size)
    else:
        model, features, preprocessing = download_backbone(arch, weights, image_size)
        mean, std = preprocessing["mean"], preprocessing["std"]
        resize = round(image_size * preprocessing["resize_ratio"])
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    checkpoint = backbone_checkpoint(
        arch, weights, model.state_dict(), features, image_size, resize, mean, std
    )
    return checkpoint, metrics


def main() -> None:
    params = load_params()
    config, seed, settings = params["backbone"], params["seed"], params["distributed"]
    plan, ranks, device = distributed.start("backbone", settings, params["device"])
    seed_everything(seed)
    pretrain = functools.partial(
        pretrain_on_glyphs,
        config["arch"],
        config["image_size"],
        config["pretrain_images"],
        config["pretrain_epochs"],
        config["pretrain_lr"],
        config["pretrain_batch_size"],
        seed,
        device,
        params["amp"],
        ranks,
        settings["sync_batchnorm"],
        settings["max_batch_per_process"],
    )
    checkpoint, metrics = materialize(config["arch"], config["weights"], config["image_size"], pretrain)
    if not ranks.main:
        return
    if config["weights"] == "pretrain":
        metrics.update(world_size=ranks.world_size, backend=plan.backend)
    save_torch(BACKBONE_FILE, checkpoint)
    write_json(METRICS_DIR / "backbone.json", metrics)
    print(f"backbone: {checkpoint['arch']} ({checkpoint['weights']}) -> {BACKBONE_FILE}")


if __name__ == "__main__":
    run_stage(main, stage="backbone")
