import numpy as np
import pytest
import torch

from pipeline.data import (
    ImageArrayDataset,
    SeededAugmentation,
    cap_per_class,
    image_transform,
    load_classes,
    load_digits_dataset,
    load_split,
    save_prepared,
    stratified_split,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_load_offline_as_uint8_images(digits):
    images, labels, classes = digits
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and classes == [str(i) for i in range(10)]
    assert set(labels) == set(range(10))


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


def test_transform_makes_normalized_rgb_at_image_size(digits):
    images, labels, _ = digits
    dataset = ImageArrayDataset(images, labels, image_transform(24, [0.5] * 3, [0.5] * 3))
    image, label = dataset[0]
    assert image.shape == (3, 24, 24) and image.dtype.is_floating_point
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert label.item() == labels[0]
    augmented = image_transform(24, [0.5] * 3, [0.5] * 3, augment=True)(images[0])
    assert augmented.shape == (3, 24, 24)


def fake_cifar10(root, per_batch: int = 6) -> None:
    """CIFAR-10's python layout, with tiny random batches."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar_uses_an_existing_copy(tmp_path, monkeypatch):
    from pipeline.data import load_cifar

    fake_cifar10(tmp_path)
    # The fake batches have other checksums than the real files torchvision verifies.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    splits, classes = load_cifar("cifar10", tmp_path)
    assert classes[0] == "airplane" and splits["train"][0].shape == (30, 32, 32, 3)
    assert splits["test"][1].tolist() == list(range(6))


def test_cifar_offline_without_a_copy_says_where_to_put_the_files(tmp_path, monkeypatch):
    from pipeline.data import load_cifar
    from pipeline.errors import StageError

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(StageError) as error:
        load_cifar("cifar100", tmp_path / "cifar100")
    message = str(error.value)
    assert "cifar-100-python.tar.gz" in message and str(tmp_path / "cifar100") in message


def test_seeded_augmentation_depends_on_seed_epoch_and_index_only():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    dataset = SeededAugmentation(
        ImageArrayDataset(images, np.arange(4), image_transform(16, [0.5], [0.5], True)), 7
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
