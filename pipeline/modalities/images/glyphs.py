"""A synthetic source task for offline pretraining: glyphs rendered from matplotlib's fonts,
and the pretraining of a backbone on them (``backbone.weights: pretrain`` for images).

Latin and Greek letters and symbols (never digits, so the target task stays unseen), drawn
from the TrueType fonts that matplotlib ships, with a random font, size, rotation and offset,
then a random loss of resolution, so that the features learnt transfer to small, blurry
handwriting.
"""

from __future__ import annotations

import string
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from pipeline.core import distributed, resume
from pipeline.core.loaders import make_loader, optimizer_steps
from pipeline.core.models import Classifier
from pipeline.core.optim import warmup_cosine
from pipeline.core.selection import last_epoch
from pipeline.core.training import fit
from pipeline.modalities.images.data import ImageArrayDataset, image_transform
from pipeline.modalities.images.models import PLAIN_MEAN, PLAIN_STD, build_backbone

GREEK = "ΓΔΘΛΞΠΣΦΨΩαβγδεζηθικλμνξπρστυφχψω"
SYMBOLS = "#$%&@*+=?!<>/\\{}[]()§¶~^"
CHARACTERS = string.ascii_letters + GREEK + SYMBOLS
FONT_FAMILIES = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIXGeneral")
CANVAS = 64  # glyphs are drawn at this size in pixels, then shrunk


def _font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def glyph_fonts() -> tuple[Path, ...]:
    """matplotlib's bundled fonts of the chosen families that draw every character."""
    fonts = []
    for path in sorted(_font_dir().glob("*.ttf")):
        if not path.stem.startswith(FONT_FAMILIES) or "Display" in path.stem:
            continue
        with TTFont(path, lazy=True) as font:
            cmap = font.getBestCmap()
        if all(ord(char) in cmap for char in CHARACTERS):
            fonts.append(path)
    if not fonts:
        raise RuntimeError(f"no font under {_font_dir()} draws all glyph classes")
    return tuple(fonts)


@cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def render_glyph(char: str, font: Path, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One glyph, bright ink on black, as a uint8 ``image_size`` square.

    Like the digits, the glyph is scaled to fill most of its box, whatever its natural size.
    """
    drawn = Image.new("L", (2 * CANVAS, 2 * CANVAS), 0)
    ImageDraw.Draw(drawn).text((CANVAS, CANVAS), char, fill=255, font=_font(font, CANVAS), anchor="mm")
    glyph = drawn.crop(drawn.getbbox() or (0, 0, 1, 1))
    fill = rng.uniform(0.65, 0.95) * CANVAS
    stretch = rng.uniform(0.8, 1.25)
    scale = fill / max(glyph.width * stretch, glyph.height)
    glyph = glyph.resize(
        (max(1, round(glyph.width * stretch * scale)), max(1, round(glyph.height * scale))),
        Image.BILINEAR,
    )
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(glyph, ((CANVAS - glyph.width) // 2, (CANVAS - glyph.height) // 2))
    shift = rng.uniform(-0.08, 0.08, size=2) * CANVAS
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, translate=tuple(shift))
    low = int(rng.integers(7, max(8, image_size // 2) + 1))
    image = canvas.resize((low, low), Image.BOX).resize((image_size, image_size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) * rng.uniform(0.7, 1.0)
    if rng.random() < 0.5:
        array = np.round(array / 255.0 * 16.0) * (255.0 / 16.0)
    return np.clip(array, 0, 255).astype(np.uint8)


def render_glyph_dataset(count: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` glyph images with balanced labels, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    fonts = glyph_fonts()
    labels = rng.permutation(np.arange(count) % len(CHARACTERS))
    images = np.stack(
        [
            render_glyph(CHARACTERS[label], fonts[rng.integers(len(fonts))], image_size, rng)
            for label in labels
        ]
    )
    return images, labels.astype(np.int64), list(CHARACTERS)


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
    train_sampler = distributed.GlobalBatchSampler(len(train), batch_size, ranks, seed, step=per_process)
    train_loader = make_loader(train, per_process, device, sampler=train_sampler)
    val_sampler = distributed.ShardSampler(len(val), ranks, name="the held-out glyphs")
    val_loader = make_loader(val, 512, device, sampler=val_sampler)

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

    fitted = fit(
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
        resume=resume.for_stage("backbone", ranks.main),
    )
    model.load_state_dict(fitted.weights)
    return model.backbone.cpu(), features, fitted.kept["val_accuracy"]
