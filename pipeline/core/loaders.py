"""DataLoaders the stages share: batches to the device's liking, worker processes where decoding
needs them, and the bookkeeping that puts a sharded, reordered loader's results back in
dataset order."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.distributed import gather_rows_on_main, sharded, sum_over_ranks


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A seeded DataLoader (workers draw their seeds from it); pinned memory for a GPU.

    Its worker processes, if any, persist from one epoch to the next (a training dataset's
    per-epoch seeding reaches them through shared memory: data.SeededAugmentation), each
    with two batches in flight, PyTorch's default prefetch.

    ``sampler`` picks this process's items (distributed.GlobalBatchSampler for training,
    distributed.ShardSampler for inference) in place of a plain order or shuffle. A
    dataset's own ``collate`` (texts padded into one tensor) makes its batches.
    """
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=getattr(dataset, "collate", None),
    )


def worker_count(setting: str | int) -> int:
    """``data.num_workers`` as a number: ``auto`` is the cores this process may use (its CPU
    affinity, which Slurm and containers set) split over the stage's processes on this
    machine (torchrun's LOCAL_WORLD_SIZE), at least 1."""
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_workers(dataset: Dataset, num_workers: str | int) -> int:
    """Worker processes for a dataset (``num_workers``: data.num_workers): decoding files
    needs them (a dataset that ``reads_files``); items already in memory do not."""
    return worker_count(num_workers) if getattr(dataset, "reads_files", False) else 0


def loader_indices(loader: DataLoader) -> torch.Tensor:
    """The dataset positions an inference loader visits, in its order."""
    return torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long)


def in_dataset_order(
    loader: DataLoader, batches: Iterable[tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """An inference loader's results in dataset order: ``batches`` yields, for each batch of
    ``loader``, a tuple of CPU tensors with a row for each of its items.

    Each result is allocated once, at its full size, and filled as the batches come: no list
    of batches, no concatenated copy, so memory holds the results once. Where the loader is
    sharded, rank 0 gathers every process's rows into its results
    (distributed.gather_rows_on_main) and the other ranks return their own share.
    """
    positions = loader_indices(loader)
    share = sharded(loader.sampler) and not loader.sampler.ranks.main
    rows = len(positions) if share else len(loader.dataset)
    targets = torch.arange(rows) if share else positions
    outputs: tuple[torch.Tensor, ...] = ()
    start = 0
    for batch in batches:
        if not outputs:
            outputs = tuple(torch.empty((rows, *part.shape[1:]), dtype=part.dtype) for part in batch)
        where = targets[start : start + len(batch[0])]
        for output, part in zip(outputs, batch, strict=True):
            output[where] = part
        start += len(batch[0])
    if sharded(loader.sampler):
        gather_rows_on_main(outputs, positions)
    return outputs


def totals(loader: DataLoader, *values: float) -> list[float]:
    """Sums over a loader: over every process where the loader is sharded, else this one's."""
    return sum_over_ranks(*values) if sharded(loader.sampler) else list(values)


def batch_sizes(loader: DataLoader) -> list[int]:
    """How many items each batch of ``loader`` holds, in order (the last may be short)."""
    full, rest = divmod(len(loader.sampler), loader.batch_size)
    return [loader.batch_size] * full + ([rest] if rest else [])


def optimizer_steps(loader: DataLoader, accumulate: int = 1) -> int:
    """Optimizer steps per epoch: one per ``accumulate`` batches, and one for a remainder."""
    return -(-len(loader) // accumulate)
