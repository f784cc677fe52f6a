"""Stage 2, backbone: materialize the pretrained backbone's weights into one pinned file.

Reads params ``seed``, ``device`` and ``backbone.*``. ``backbone.weights`` is ``pretrain``
(train on the synthetic glyph task, offline), ``none`` (random init), a torchvision weights
name (torchvision's download and cache) or a local checkpoint path. Writes
models/backbone.pt (arch, state dict without classifier, feature size, preprocessing) and
metrics/backbone.json. Run: ``python -m pipeline.backbone``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.common import (
    BACKBONE_FILE,
    METRICS_DIR,
    resolve_device,
    run_stage,
    save_torch,
    seed_everything,
    write_json,
)
from pipeline.data import ImageArrayDataset, image_transform
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
from pipeline.training import evaluate_epoch, grad_scaler, make_loader, train_epoch, warmup_cosine


def pretrain_on_glyphs(
    arch: str,
    image_size: int,
    images: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> tuple[nn.Module, int, float]:
    """Train ``arch`` from scratch on rendered glyphs; returns backbone, feature size and the
    accuracy on a held-out 5% of the glyphs."""
    glyphs, labels, classes = render_glyph_dataset(images, image_size, seed)
    held_out = max(1, len(labels) // 20)
    transform = image_transform(image_size, PLAIN_MEAN, PLAIN_STD)
    train = ImageArrayDataset(glyphs[held_out:], labels[held_out:], transform)
    val = ImageArrayDataset(glyphs[:held_out], labels[:held_out], transform)
    train_loader = make_loader(train, batch_size, device, shuffle=True, seed=seed)
    val_loader = make_loader(val, 512, device)

    backbone, features = build_backbone(arch, image_size=image_size)
    model = Classifier(backbone, nn.Linear(features, len(classes)))
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * len(train_loader)
    scheduler = warmup_cosine(optimizer, warmup_steps=max(1, steps // 10), total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    scaler = grad_scaler(device, amp=True)
    for epoch in range(1, epochs + 1):
        train = train_epoch(model, train_loader, loss_fn, device, optimizer, scaler, scheduler, amp=True)
        print(f"pretrain epoch {epoch}/{epochs}: loss {train['loss']:.3f}, accuracy {train['accuracy']:.3f}")
    val = evaluate_epoch(model, val_loader, loss_fn, device, amp=True)
    return model.backbone.cpu(), features, val["accuracy"]


def materialize(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """The backbone checkpoint and its metrics, for the configured weights."""
    config, seed = params["backbone"], params["seed"]
    arch, weights, size = config["arch"], config["weights"], config["image_size"]
    mean, std, resize, metrics = PLAIN_MEAN, PLAIN_STD, size, {}
    if weights == "pretrain":
        model, features, accuracy = pretrain_on_glyphs(
            arch,
            size,
            config["pretrain_images"],
            config["pretrain_epochs"],
            config["pretrain_lr"],
            config["pretrain_batch_size"],
            seed,
            resolve_device(params["device"]),
        )
        metrics["pretrain_accuracy"] = round(accuracy, 6)
    elif weights == "none":
        model, features = build_backbone(arch, image_size=size)
    elif Path(weights).is_file():
        model, features = load_checkpoint_backbone(arch, weights, size)
    else:
        model, features, preprocessing = download_backbone(arch, weights, size)
        mean, std = preprocessing["mean"], preprocessing["std"]
        resize = round(size * preprocessing["resize_ratio"])
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    checkpoint = {
        "arch": arch,
        "weights": weights,
        "state_dict": model.state_dict(),
        "feature_dim": features,
        "image_size": size,
        "resize_size": resize,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
    return checkpoint, metrics


def main() -> None:
    params = load_params()
    seed_everything(params["seed"])
    checkpoint, metrics = materialize(params)
    save_torch(BACKBONE_FILE, checkpoint)
    write_json(METRICS_DIR / "backbone.json", metrics)
    print(f"backbone: {checkpoint['arch']} ({checkpoint['weights']}) -> {BACKBONE_FILE}")


if __name__ == "__main__":
    run_stage(main)
