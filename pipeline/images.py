"""Image files on disk: decoding any image Pillow opens, scanning a class-per-folder tree,
checking every file, and a streaming dataset over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.common import progress
from pipeline.errors import StageError

IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
SPLIT_FOLDERS = ("train", "val", "test")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey band


def read_rgb(path: Path | str) -> np.ndarray:
    """Any image Pillow opens as an HxWx3 uint8 array, EXIF orientation applied.

    Transparent pixels (LA, PA, RGBA, P with transparency) are composed over white; 16- and
    32-bit grey images are scaled to 8 bits; CMYK and the rest convert through Pillow.
    """
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            grey = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") else max(float(grey.max()), 1.0)
            grey = np.clip(grey / top * 255.0, 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        if image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, (255, 255, 255))
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return np.array(canvas)  # writable: torch warns on read-only arrays
        return np.array(image.convert("RGB"))


def is_image_file(path: Path) -> bool:
    """Files with an image extension Pillow knows; hidden files and notes are not images."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class ImageTree:
    """The files of a class-per-folder tree, by split ('all' where the tree has no splits)."""

    classes: list[str]
    files: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_tree(root: Path) -> ImageTree:
    """Classes and image files of ``root``: ``root/<class>/*`` or ``root/<split>/<class>/*``.

    Raises on a missing root, an empty class folder, or fewer than two classes.
    """
    if not root.is_dir():
        raise StageError(f"data.path: {root} is not a folder; put one sub-folder of images per class there")
    split_roots = {name: root / name for name in SPLIT_FOLDERS if (root / name).is_dir()}
    if split_roots and "train" not in split_roots:
        raise StageError(f"data.path: {root} has {', '.join(split_roots)} but no train/ folder")
    roots = split_roots or {"all": root}
    names = sorted({folder.name for r in roots.values() for folder in _class_folders(r)})
    if len(names) < 2:
        raise StageError(
            f"data.path: {root} holds {len(names)} class folder(s) ({', '.join(names) or 'none'}); "
            "a classifier needs at least 2, one sub-folder of images per class"
        )
    tree = ImageTree(classes=names)
    for split, split_root in roots.items():
        tree.files[split] = []
        for label, name in enumerate(names):
            folder = split_root / name
            images = sorted(p for p in folder.rglob("*") if is_image_file(p)) if folder.is_dir() else []
            if not images and split in ("all", "train"):
                raise StageError(f"data.path: class folder {folder} holds no image files")
            tree.files[split] += [(path, label) for path in images]
    return tree


class _CheckFiles(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str]:
        try:
            read_rgb(self.paths[index])
        except Exception as error:  # any decoding failure makes the file unusable
            return str(self.paths[index]), f"{type(error).__name__}: {error}"
        return str(self.paths[index]), ""


def unreadable_files(paths: list[Path], num_workers: int) -> dict[str, str]:
    """Decode every file fully, in worker processes; the failures' paths and reasons, in order."""
    loader = DataLoader(_CheckFiles(paths), batch_size=64, num_workers=num_workers, collate_fn=list)
    return {path: reason for batch in progress(loader, "check images") for path, reason in batch if reason}


class ImageFileDataset(Dataset):
    """Images read from disk on access, so memory stays bounded whatever the dataset's size."""

    def __init__(self, paths: list[str], labels: list[int], transform: v2.Compose) -> None:
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(read_rgb(self.paths[index])), self.labels[index]
