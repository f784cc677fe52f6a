"""Images as tensors: scikit-learn's digits and CIFAR in memory, and image files on disk
(decoding any image Pillow opens, scanning a class-per-folder tree, checking every file);
the transforms and the datasets over both."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.core.common import progress
from pipeline.core.errors import StageError

# The formats read, by Pillow's names: photos' and scans' own. Pillow knows more (EPS and PS
# among them, decoded by running Ghostscript), which no image folder or predict input needs.
FORMATS = ("BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")  # JPEG opens MPO (phones) too
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, name in Image.registered_extensions().items() if name in FORMATS
)
SPLIT_FOLDERS = ("train", "val", "test")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey band


class TooManyPixels(ValueError):
    """An image larger than the pixel limit: a decompression bomb, or a photo to shrink."""


def open_image(path: Path | str, max_pixels: int | None = None, limit_name: str = "") -> Image.Image:
    """``path`` opened by Pillow (header only) in one of FORMATS, refused where its pixels
    exceed ``max_pixels`` (None: Pillow's own limit) before it is decoded: a small file can
    hold a huge image, which decoded would take the memory of every worker."""
    pillows = Image.MAX_IMAGE_PIXELS
    limit = max_pixels or pillows
    try:
        Image.MAX_IMAGE_PIXELS = None  # the check below is the one limit: Pillow's would refuse 2x its own
        image = Image.open(path, formats=FORMATS)
    finally:
        Image.MAX_IMAGE_PIXELS = pillows
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        image.close()
        raise TooManyPixels(
            f"{image.width} x {image.height} = {pixels:,} pixels, over the limit of {limit:,} "
            f"pixels{limit_name}; shrink the image, or raise the limit"
        )
    return image


def read_rgb(path: Path | str, max_pixels: int | None = None, limit_name: str = "") -> np.ndarray:
    """Any image of FORMATS as an HxWx3 uint8 array, EXIF orientation applied; one of more
    than ``max_pixels`` pixels (None: Pillow's limit) is an error, before it is decoded.

    Transparent pixels (LA, PA, RGBA, P with transparency) are composed over white; 16- and
    32-bit grey images are scaled to 8 bits; CMYK and the rest convert through Pillow.
    """
    with open_image(path, max_pixels, limit_name) as image:
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
    """Files with an image extension of FORMATS; hidden files and notes are not images."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def files_under(folder: Path) -> list[Path]:
    """The files in ``folder`` and its sub-folders, sorted, but for those in hidden folders
    (a notebook's .ipynb_checkpoints/ copies, .git/)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parent.parts)
    )


def images_under(folder: Path) -> list[Path]:
    """The image files in ``folder`` and its sub-folders, sorted; hidden folders are not entered."""
    return [path for path in files_under(folder) if is_image_file(path)]


def printable(path: Path | str) -> str:
    """A path as text that any file takes: a name's bytes that are not UTF-8 (a file named
    on another system) written as backslash escapes (caf\\xe9.png)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def refuse_names_not_utf8(paths: list[Path], root: Path) -> None:
    """File names that are not UTF-8 cannot be stored in the prepared file lists, DVC's
    records and the reports: an error listing them, before any file is read."""
    bad = [shown for path in paths if (shown := printable(path)) != str(path)]
    if bad:
        raise StageError(
            f"data.path: {len(bad)} file name(s) under {printable(root)} are not UTF-8: "
            f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; rename them in UTF-8 "
            f"(for example: convmv -f latin1 -t utf-8 -r --notest {printable(root)})"
        )


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
            images = images_under(folder) if folder.is_dir() else []
            if not images and split in ("all", "train"):
                raise StageError(f"data.path: class folder {folder} holds no image files")
            tree.files[split] += [(path, label) for path in images]
    refuse_names_not_utf8([path for files in tree.files.values() for path, _ in files], root)
    return tree


class _CheckFiles(Dataset):
    def __init__(self, paths: list[Path], max_pixels: int | None, limit_name: str) -> None:
        self.paths, self.max_pixels, self.limit_name = paths, max_pixels, limit_name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, str]:
        try:
            read_rgb(self.paths[index], self.max_pixels, self.limit_name)
        except Exception as error:  # any decoding failure makes the file unusable
            return str(self.paths[index]), f"{type(error).__name__}: {error}"
        return str(self.paths[index]), ""


def unreadable_files(
    paths: list[Path], num_workers: int, max_pixels: int | None = None, limit_name: str = ""
) -> dict[str, str]:
    """Decode every file fully, in worker processes; the failures' paths and reasons, in
    order. A file of more than ``max_pixels`` pixels (``limit_name``: the key that sets it)
    is one of them."""
    checks = _CheckFiles(paths, max_pixels, limit_name)
    loader = DataLoader(checks, batch_size=64, num_workers=num_workers, collate_fn=list)
    return {path: reason for batch in progress(loader, "check images") for path, reason in batch if reason}


class ImageFileDataset(Dataset):
    """Images read from disk on access, so memory stays bounded whatever the dataset's size;
    each held to ``max_pixels`` (data.max_image_pixels, which prepare checked them against;
    None: Pillow's own limit)."""

    reads_files = True  # DataLoader workers decode them (training.loader_workers)

    def __init__(
        self, paths: list[str], labels: list[int], transform: v2.Compose, max_pixels: int | None = None
    ) -> None:
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_rgb(self.paths[index], self.max_pixels, " (data.max_image_pixels)")
        return self.transform(image), self.labels[index]


def load_digits_dataset() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled 8x8 handwritten digits as uint8 images (ink bright), labels, names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    return images, digits.target.astype(np.int64), [str(name) for name in digits.target_names]


def load_cifar(name: str, root: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """CIFAR-10 or CIFAR-100 through torchvision: train and test as HxWx3 uint8 arrays.

    A copy under ``root`` is used as it is; otherwise torchvision downloads it there.
    """
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = cls(root=str(root), train=train, download=True)  # skips a verified copy
        except (OSError, RuntimeError) as error:
            raise StageError(
                f"data.dataset: {name}: no copy under {root} and the download failed ({error}). "
                f"Offline, put {cls.filename} (from {cls.url}) or its extracted folder "
                f"{cls.base_folder}/ in {root}/"
            ) from None
        splits[split] = (
            np.asarray(dataset.data, dtype=np.uint8),
            np.asarray(dataset.targets, dtype=np.int64),
        )
    return splits, list(dataset.classes)


# A random resized crop keeps at least this share of the image: small data needs most of
# each photo, where ImageNet training (0.08) can afford to see a patch.
PHOTO_CROP_SCALE = (0.35, 1.0)


def augmentation(policy: str, image_size: int) -> tuple[list[v2.Transform], list[v2.Transform]]:
    """A policy's random steps (recipe.AUGMENTS): those that replace the resize and centre
    crop and work on uint8, and those that work on the float image after it.

    - ``none``: nothing random;
    - ``jitter``: a mild affine jitter, no flips (they change what a glyph or digit means);
    - ``photo``: a random resized crop (at least 35% of the photo, aspect 3:4 to 4:3) and a
      horizontal flip, fastai's and timm's photo basics;
    - ``strong``: ``photo``, then TrivialAugmentWide (Müller and Hutter, 2021): one random
      operation of random strength per image, colour and geometry alike.
    """
    photo = [
        v2.RandomResizedCrop(image_size, scale=PHOTO_CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    policies: dict[str, tuple[list[v2.Transform], list[v2.Transform]]] = {
        "none": ([], []),
        "jitter": ([], [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]),
        "photo": (photo, []),
        "strong": ([*photo, v2.TrivialAugmentWide()], []),
    }
    return policies[policy]


def image_transform(
    image_size: int,
    mean: list[float],
    std: list[float],
    augment: str = "none",
    resize_size: int | None = None,
) -> v2.Compose:
    """uint8 HxW or HxWxC array -> normalized float CxHxW tensor, ``image_size`` square.

    The shorter side is resized to ``resize_size`` (default ``image_size``), then the centre
    cropped, as torchvision's weights preprocess (e.g. 256 then 224), in uint8 as they do:
    a large photo becomes float32 only at the size the model takes. ``augment`` names a
    policy of random steps (``augmentation``); a policy that crops at random replaces the
    resize and centre crop.
    """
    on_uint8, on_float = augmentation(augment, image_size)
    framing = on_uint8 or [v2.Resize(resize_size or image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            *framing,
            v2.ToDtype(torch.float32, scale=True),
            *on_float,
            v2.Normalize(mean=mean, std=std),
        ]
    )


def batch_mixing(mix: str, alpha: float, num_classes: int) -> v2.Transform | None:
    """MixUp (Zhang et al., 2018: two images blended, their labels in the same proportion)
    or CutMix (Yun et al., 2019: a box of one pasted into the other), the share drawn from
    Beta(alpha, alpha), as torchvision's v2 makes them; None for ``none``."""
    if mix == "none":
        return None
    return {"mixup": v2.MixUp, "cutmix": v2.CutMix}[mix](alpha=alpha, num_classes=num_classes)


def checkpoint_transform(checkpoint: dict, augment: str = "none") -> v2.Compose:
    """The preprocessing a backbone checkpoint records (size, resize, mean, std), with the
    augmentation policy ``augment``."""
    return image_transform(
        checkpoint["image_size"],
        checkpoint["mean"],
        checkpoint["std"],
        augment,
        checkpoint.get("resize_size"),
    )


class ImageArrayDataset(Dataset):
    """Images held in one uint8 array, transformed on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Compose) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def image_files(paths: list[str]) -> tuple[list[Path], int]:
    """The files to predict, in the order given (folders sorted, recursively), and how many
    non-image files the folders held. A missing path fails before any work."""
    files, others = [], 0
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = files_under(path)
            images = [p for p in found if is_image_file(p)]
            files += images
            others += len(found) - len(images)
        elif path.is_file():
            files.append(path)  # named explicitly: tried whatever its extension
        else:
            raise StageError(f"{name}: no such file or folder")
    return files, others


class ImagesToPredict(Dataset):
    """Each file as (its position, the preprocessed image or None, the error reading it,
    one over Pillow's pixel limit included)."""

    def __init__(self, files: list[Path], transform: v2.Compose) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(read_rgb(self.files[index])), ""
        except Exception as error:  # any unreadable file becomes a row with its reason
            return index, None, f"{type(error).__name__}: {error}".replace("\n", " ")
