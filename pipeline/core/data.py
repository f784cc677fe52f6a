"""What every modality's data shares: stratified splits, the prepared files prepare writes
and the stages after it read, and seeded per-item augmentation.

A prepared split is one file under data/prepared/: ``<split>.npz`` (images held in memory:
digits, CIFAR) or ``<split>.json`` (columns of strings, each as long as the labels: ``paths``
of image files that later stages stream, or ``texts`` with their ``sources``, file and
line). classes.json holds the class names in label order; skipped.json the inputs prepare
skipped (unreadable images, empty texts) where params asked it to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.common import atomic_path, read_json, write_json
from pipeline.core.errors import StageError

SPLITS = ("train", "val", "test")

# A split's inputs: an array of images, or columns of strings (paths; texts and sources).
Inputs = np.ndarray | dict[str, list[str]]
Splits = dict[str, tuple[Inputs, np.ndarray]]


def val_size(val_fraction: float, test_fraction: float, rest: int, min_val: int) -> float | int:
    """What train_test_split holds out of the ``rest`` that test left: ``val_fraction`` of
    all (as a share of the rest), or, where that is fewer than ``min_val`` examples, that
    many, but never more than a quarter of the rest (tiny data keeps most for training)."""
    share = val_fraction / (1.0 - test_fraction)
    floor = min(min_val, rest // 4)
    return floor if math.ceil(share * rest) < floor else share


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int, min_val: int = 0
) -> dict[str, np.ndarray]:
    """Indices of a deterministic train/val/test split that keeps the class proportions;
    val holds at least ``min_val`` examples (``val_size``).

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
        held = val_size(val_fraction, test_fraction, len(rest), min_val)
        train, val = train_test_split(rest, test_size=held, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def split_indices(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    what: str = "images",
    min_val: int = 0,
) -> dict[str, np.ndarray]:
    """Stratified indices, as a clear error where a class has too few ``what`` to split."""
    try:
        return stratified_split(labels, val_fraction, test_fraction, seed, min_val)
    except ValueError as error:
        counts = np.bincount(labels)
        raise StageError(
            f"data: cannot split {len(labels)} {what} stratified by class (fewest in a class: "
            f"{counts[counts > 0].min()}): {error}; add {what} or lower data.val_fraction/test_fraction"
        ) from None


def cap_per_class(indices: np.ndarray, labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep at most ``cap`` indices of each class (a seeded choice); 0 keeps all."""
    if cap == 0:
        return indices
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(indices[labels[indices] == label])[:cap] for label in np.unique(labels[indices])]
    return np.sort(np.concatenate(kept))


def take(inputs: Inputs, index: np.ndarray) -> Inputs:
    """The rows ``index`` of a split's inputs, whichever form they have."""
    if isinstance(inputs, dict):
        return {name: [column[i] for i in index] for name, column in inputs.items()}
    return inputs[index]


def split_given(
    given: dict[str, tuple[Inputs, np.ndarray]],
    val_fraction: float,
    test_fraction: float,
    max_train_per_class: int,
    seed: int,
    what: str = "images",
    min_val: int = 0,
) -> Splits:
    """The train/val/test splits of what the data brought: ``given["all"]`` is split
    stratified; else ``given`` has a train split and keeps the val and test splits it has,
    holding out of train only the ones it lacks (val at least ``min_val`` examples, up to a
    quarter of train). Then at most ``max_train_per_class`` of each class stay in train
    (few-shot); val and test stay whole."""
    inputs, labels = given.get("all") or given["train"]
    fractions = {
        name: 0.0 if name in given else fraction
        for name, fraction in (("val", val_fraction), ("test", test_fraction))
    }
    indices = split_indices(labels, fractions["val"], fractions["test"], seed, what, min_val)
    indices["train"] = cap_per_class(indices["train"], labels, max_train_per_class, seed)
    splits = {name: (take(inputs, index), labels[index]) for name, index in indices.items()}
    splits.update({name: given[name] for name in ("val", "test") if name in given})
    return splits


def save_prepared(out_dir: Path, splits: Splits, classes: list[str], skipped: list[str] = ()) -> None:
    """Write each split atomically: images in memory as ``<split>.npz`` (images, labels),
    columns of strings as ``<split>.json`` (the columns, labels); then the class names and
    what was skipped."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, (inputs, labels) in splits.items():
            if isinstance(inputs, dict):
                write_json(tmp / f"{name}.json", {**inputs, "labels": [int(x) for x in labels]})
            else:
                np.savez_compressed(tmp / f"{name}.npz", images=inputs, labels=labels)
        write_json(tmp / "classes.json", classes)
        write_json(tmp / "skipped.json", list(skipped))


def load_split(prepared_dir: Path, split: str) -> tuple[Inputs, np.ndarray]:
    """A prepared split's inputs (an image array, or columns of strings) and labels."""
    stem = Path(prepared_dir) / split
    if stem.with_suffix(".npz").is_file():
        with np.load(stem.with_suffix(".npz")) as archive:
            return archive["images"], archive["labels"]
    if stem.with_suffix(".json").is_file():
        columns: dict[str, Any] = read_json(stem.with_suffix(".json"))
        labels = np.asarray(columns.pop("labels"), dtype=np.int64)
        return columns, labels
    raise StageError(f"{stem}.npz: not found; run the prepare stage first (dvc repro prepare)")


def split_sources(prepared_dir: Path, split: str) -> list[str]:
    """Where each item of a prepared split came from: its image file, or its text's file
    and line; empty strings for images held in memory."""
    inputs, labels = load_split(prepared_dir, split)
    if isinstance(inputs, dict):
        return inputs.get("paths") or inputs.get("sources") or [""] * len(labels)
    return [""] * len(labels)


def load_classes(prepared_dir: Path) -> list[str]:
    return read_json(Path(prepared_dir) / "classes.json")


class SeededAugmentation(Dataset):
    """A training dataset whose random transforms are seeded by (seed, epoch, index).

    An item gets the same augmentation whichever process or DataLoader worker loads it, so
    fine-tuning gives the same result with 1 or N processes and any ``data.num_workers``.
    The epoch lives in shared memory, so DataLoader workers that persist across epochs
    see each ``set_epoch``; it must come before the epoch's iterator is made. The wrapped dataset's
    ``labels``, and its ``lengths``, ``collate`` and ``reads_files`` where it has them,
    show through.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self.shared_epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self.labels = dataset.labels
        for shown in ("lengths", "collate", "reads_files"):
            if hasattr(dataset, shown):
                setattr(self, shown, getattr(dataset, shown))

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            return self.dataset[index]


class SeededBatchTransform:
    """A transform of whole training batches (MixUp, CutMix) whose randomness is seeded by
    (seed, epoch, step, rank): a rerun mixes the same batches the same way, and each process
    draws its own. ``set_epoch`` (fit calls it) restarts the step count."""

    def __init__(self, transform: Callable, seed: int, rank: int = 0) -> None:
        self.transform, self.seed, self.rank = transform, seed, rank
        self.epoch, self.step = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.step += 1
        key = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.step) * 1_000_003 + self.rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key % 2**63)
            return self.transform(inputs, labels)


@dataclass(frozen=True)
class PredictRequest:
    """What a user gave ``python -m pipeline predict``: files and folders (``-`` for
    standard input), ``--text`` arguments, and the column a table of texts keeps them in.
    Each modality reads what it takes and refuses the rest."""

    paths: list[str]
    texts: list[str] = field(default_factory=list)
    text_column: str = "text"


@dataclass
class PredictInputs:
    """What ``python -m pipeline predict`` was given, as its modality reads it: the CSV's
    first columns (an image's path; a text's source and the text), a dataset of (position,
    input tensor or None, the error that kept it from being read), how a batch of inputs is
    made (``stack``), an order to read them in, and what it says of them."""

    columns: dict[str, list[str]]
    dataset: Dataset
    stack: Callable[[list[torch.Tensor]], torch.Tensor]
    order: list[int] | None = None  # None: as given
    reads_files: bool = False  # DataLoader workers decode them
    items: str = "input(s)"
    unreadable: str = "could be read"  # none of the N items ...
    notes: list[str] = field(default_factory=list)
