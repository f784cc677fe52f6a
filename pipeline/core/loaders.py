"""DataLoaders the stages share: batches to the device's liking, worker processes where decoding
needs them, and the bookkeeping that puts a sharded, reordered loader's results back in
dataset order."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.core.distributed import gather_in_order, sharded, sum_over_ranks


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
        pin_memory=device.type == "cuda",
        collate_fn=getattr(dataset, "collate", None),
    )


def loader_workers(dataset: Dataset, num_workers: int) -> int:
    """Worker processes for a dataset: decoding files needs them (a dataset that
    ``reads_files``); items already in memory do not."""
    return num_workers if getattr(dataset, "reads_files", False) else 0


def loader_indices(loader: DataLoader) -> torch.Tensor:
    """The dataset positions an inference loader visits, in its order."""
    return torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long)


def in_dataset_order(loader: DataLoader, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An inference loader's rows of ``tensors`` in dataset order: every process's share put
    together where the loader is sharded; this process's rows sorted back where its sampler
    ordered them otherwise (texts by length)."""
    indices = loader_indices(loader)
    if sharded(loader.sampler):
        return gather_in_order(indices, *tensors)
    order = indices.argsort()
    return tuple(tensor[order] for tensor in tensors)


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
