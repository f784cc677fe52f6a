"""Datasets: loading the configured source, stratified splits, and image tensors for the models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pipeline.common import atomic_path, read_json, write_json
from pipeline.errors import StageError

SPLITS = ("train", "val", "test")


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


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of a deterministic train/val/test split that keeps the class proportions.

    A fraction of 0 leaves that split empty (for datasets that bring their own).
    """
    from sklearn.model_selection import train_test_split  # here: only prepare splits (1.8 s to import)

    indices = np.arange(len(labels))
    empty = indices[:0]
    rest, test = indices, empty
    if test_fraction > 0:
        rest, test = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = rest, empty
    if val_fraction > 0:
        val_of_rest = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=val_of_rest, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def cap_per_class(indices: np.ndarray, labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep at most ``cap`` indices of each class (a seeded choice); 0 keeps all."""
    if cap == 0:
        return indices
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(indices[labels[indices] == label])[:cap] for label in np.unique(labels[indices])]
    return np.sort(np.concatenate(kept))


def save_prepared(
    out_dir: Path,
    splits: dict[str, tuple[np.ndarray | list[str], np.ndarray]],
    classes: list[str],
    skipped: list[str] = (),
) -> None:
    """Write each split atomically: images in memory as ``<split>.npz`` (images, labels),
    image files as ``<split>.json`` (paths, labels); then the class names and skipped files."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, (images, labels) in splits.items():
            if isinstance(images, list):
                write_json(tmp / f"{name}.json", {"paths": images, "labels": [int(x) for x in labels]})
            else:
                np.savez_compressed(tmp / f"{name}.npz", images=images, labels=labels)
        write_json(tmp / "classes.json", classes)
        write_json(tmp / "skipped.json", list(skipped))


def load_split(prepared_dir: Path, split: str) -> tuple[np.ndarray | list[str], np.ndarray]:
    """A prepared split's images (an array, or file paths) and labels."""
    stem = Path(prepared_dir) / split
    if stem.with_suffix(".npz").is_file():
        with np.load(stem.with_suffix(".npz")) as archive:
            return archive["images"], archive["labels"]
    if stem.with_suffix(".json").is_file():
        manifest = read_json(stem.with_suffix(".json"))
        return manifest["paths"], np.asarray(manifest["labels"], dtype=np.int64)
    raise StageError(f"{stem}.npz: not found; run the prepare stage first (dvc repro prepare)")


def split_dataset(prepared_dir: Path, split: str, transform: v2.Compose) -> Dataset:
    """The prepared split as a dataset: in memory, or streamed from the image files."""
    from pipeline.images import ImageFileDataset

    images, labels = load_split(prepared_dir, split)
    if isinstance(images, list):
        return ImageFileDataset(images, labels, transform)
    return ImageArrayDataset(images, labels, transform)


def loader_workers(dataset: Dataset, num_workers: int) -> int:
    """Worker processes for a dataset: decoding files needs them; arrays in memory do not."""
    from pipeline.images import ImageFileDataset

    return num_workers if isinstance(dataset, ImageFileDataset) else 0


def load_classes(prepared_dir: Path) -> list[str]:
    return read_json(Path(prepared_dir) / "classes.json")


def image_transform(
    image_size: int,
    mean: list[float],
    std: list[float],
    augment: bool = False,
    resize_size: int | None = None,
) -> v2.Compose:
    """uint8 HxW or HxWxC array -> normalized float CxHxW tensor, ``image_size`` square.

    The shorter side is resized to ``resize_size`` (default ``image_size``), then the centre
    cropped, as torchvision's weights preprocess (e.g. 256 then 224). Augmentation is a mild
    affine jitter (no flips: they change what a glyph or digit means).
    """
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RGB(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize(resize_size or image_size, antialias=True),
        v2.CenterCrop(image_size),
    ]
    if augment:
        steps.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)))
    steps.append(v2.Normalize(mean=mean, std=std))
    return v2.Compose(steps)


def checkpoint_transform(checkpoint: dict, augment: bool = False) -> v2.Compose:
    """The preprocessing a backbone checkpoint records (size, resize, mean, std)."""
    return image_transform(
        checkpoint["image_size"],
        checkpoint["mean"],
        checkpoint["std"],
        augment,
        checkpoint.get("resize_size"),
    )


class SeededAugmentation(Dataset):
    """A training dataset whose random transforms are seeded by (seed, epoch, index).

    An image gets the same augmentation whichever process or DataLoader worker loads it, so
    fine-tuning gives the same result with 1 or N processes and any ``data.num_workers``.
    ``set_epoch`` must come before each epoch's iterator is made (workers copy the dataset
    then; the loaders here do not keep workers between epochs).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.labels = dataset.labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            return self.dataset[index]


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
