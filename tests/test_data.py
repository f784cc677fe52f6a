import numpy as np
import pytest
import torch

from pipeline.core.data import (
    SeededAugmentation,
    cap_per_class,
    load_classes,
    load_split,
    save_prepared,
    split_given,
    split_sources,
    stratified_split,
)
from pipeline.modalities.images.data import ImageArrayDataset, image_transform, load_digits_dataset


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_split_is_disjoint_deterministic_and_stratified(digits):
    _, labels, _ = digits
    split = stratified_split(labels, 0.15, 0.25, seed=3)
    again = stratified_split(labels, 0.15, 0.25, seed=3)
    other = stratified_split(labels, 0.15, 0.25, seed=4)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], other["test"])
    joined = np.concatenate(list(split.values()))
    assert len(joined) == len(labels) == len(set(joined))
    assert len(split["test"]) == pytest.approx(0.25 * len(labels), abs=1)
    assert len(split["val"]) == pytest.approx(0.15 * len(labels), abs=1)
    overall = np.bincount(labels) / len(labels)
    for indices in split.values():
        assert np.abs(np.bincount(labels[indices]) / len(indices) - overall).max() < 0.02


def test_cap_per_class_keeps_at_most_n_of_each(digits):
    _, labels, _ = digits
    indices = np.arange(len(labels))
    capped = cap_per_class(indices, labels, 10, seed=0)
    assert np.bincount(labels[capped]).tolist() == [10] * 10
    assert np.array_equal(capped, cap_per_class(indices, labels, 10, seed=0))
    assert np.array_equal(cap_per_class(indices, labels, 0, seed=0), indices)


def test_prepared_round_trip(tmp_path, digits):
    images, labels, classes = digits
    splits = {
        "train": (images[:5], labels[:5]),
        "val": (images[5:7], labels[5:7]),
        "test": (images[7:9], labels[7:9]),
    }
    save_prepared(tmp_path / "prepared", splits, classes)
    loaded_images, loaded_labels = load_split(tmp_path / "prepared", "val")
    assert np.array_equal(loaded_images, images[5:7]) and np.array_equal(loaded_labels, labels[5:7])
    assert load_classes(tmp_path / "prepared") == classes


def test_seeded_augmentation_depends_on_seed_epoch_and_index_only():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    dataset = SeededAugmentation(
        ImageArrayDataset(images, np.arange(4), image_transform(16, [0.5], [0.5], "jitter")), 7
    )
    dataset.set_epoch(1)
    torch.manual_seed(0)
    first = dataset[2][0]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(dataset[2][0], first)  # whatever the process's random state
    torch.manual_seed(0)
    dataset[2]
    assert torch.equal(torch.get_rng_state(), state)  # which it leaves as it was
    assert not torch.equal(dataset[3][0], first)
    dataset.set_epoch(2)
    assert not torch.equal(dataset[2][0], first)


def test_prepared_columns_round_trip_with_their_sources(tmp_path):
    texts = {"texts": ["a b", "c", "d e f"], "sources": ["t.csv:2", "t.csv:3", "t.csv:5"]}
    splits = {"train": (texts, np.array([0, 1, 0])), "val": (texts, np.array([1, 1, 0]))}
    save_prepared(tmp_path / "prepared", splits, ["x", "y"])
    columns, labels = load_split(tmp_path / "prepared", "val")
    assert columns == texts and labels.tolist() == [1, 1, 0] and labels.dtype == np.int64
    assert split_sources(tmp_path / "prepared", "train") == ["t.csv:2", "t.csv:3", "t.csv:5"]


def test_split_given_keeps_the_splits_the_data_brings_and_holds_out_the_others():
    labels = np.arange(40) % 4
    inputs = {"texts": [f"text {i}" for i in range(40)]}
    test = ({"texts": ["t1", "t2"]}, np.array([0, 1]))
    splits = split_given({"train": (inputs, labels), "test": test}, 0.2, 0.25, 0, seed=1)
    assert splits["test"] == test  # the data's own test split, whole
    assert len(splits["val"][1]) == 8 and len(splits["train"][1]) == 32  # val from train alone
    assert sorted(splits["train"][0]["texts"] + splits["val"][0]["texts"]) == sorted(inputs["texts"])
    capped = split_given({"all": (inputs, labels)}, 0.2, 0.2, 3, seed=1)
    assert np.bincount(capped["train"][1]).tolist() == [3, 3, 3, 3]
    assert len(capped["val"][1]) == len(capped["test"][1]) == 8


def test_val_holds_at_least_min_val_examples_up_to_a_quarter_of_train():
    """cifar10-dev's layout: 500 training images and a test folder of its own."""
    labels = np.arange(500) % 10
    given = {
        "train": (np.zeros((500, 2, 2), dtype=np.uint8), labels),
        "test": (np.zeros((20, 2, 2), dtype=np.uint8), np.arange(20) % 10),
    }
    sizes = {
        floor: {
            name: len(split[1]) for name, split in split_given(given, 0.15, 0.25, 0, 1, min_val=floor).items()
        }
        for floor in (0, 100, 1000)
    }
    assert sizes[0] == {"train": 425, "val": 75, "test": 20}  # the fraction alone
    assert sizes[100] == {"train": 400, "val": 100, "test": 20}
    assert sizes[1000] == {"train": 375, "val": 125, "test": 20}  # a quarter of train at most


def test_workers_kept_across_epochs_augment_each_epoch_as_fresh_ones_do():
    """Persistent DataLoader workers see each set_epoch (through shared memory): two epochs
    give what a loader without workers gives, and differ from each other."""
    from pipeline.core.loaders import make_loader

    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16), dtype=np.uint8)

    def epochs(workers: int) -> list[torch.Tensor]:
        dataset = SeededAugmentation(
            ImageArrayDataset(images, np.arange(6), image_transform(16, [0.5], [0.5], "jitter")), 7
        )
        loader = make_loader(dataset, 3, torch.device("cpu"), num_workers=workers)
        seen = []
        for epoch in (1, 2):
            dataset.set_epoch(epoch)
            seen.append(torch.cat([batch for batch, _ in loader]))
        return seen

    kept, fresh = epochs(2), epochs(0)
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh, strict=True))
    assert not torch.equal(kept[0], kept[1])


def test_auto_workers_are_the_cores_this_process_may_use_split_over_the_machines_processes(monkeypatch):
    import os

    from pipeline.core.loaders import loader_workers, worker_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert worker_count("auto") == 8 and worker_count(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert worker_count("auto") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert worker_count("auto") == 1
    in_memory = ImageArrayDataset(
        np.zeros((2, 4, 4), dtype=np.uint8), np.arange(2), image_transform(4, [0.5], [0.5])
    )
    assert loader_workers(in_memory, "auto") == 0  # items already in memory need no workers
