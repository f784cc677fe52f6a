"""Image files: any mode or size Pillow opens, EXIF orientation, bad files, folder layouts;
and a generated image folder through every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import backbone, baseline, evaluate, export, extract, finetune, prepare, report, train_head
from pipeline.core.errors import StageError
from pipeline.modalities.images.data import (
    ImageArrayDataset,
    image_transform,
    load_cifar,
    load_digits_dataset,
    read_rgb,
    scan_tree,
    unreadable_files,
)
from tests.conftest import make_tree, odd_images, tiny_params


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_load_offline_as_uint8_images(digits):
    images, labels, classes = digits
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and classes == [str(i) for i in range(10)]
    assert set(labels) == set(range(10))


def test_transform_makes_normalized_rgb_at_image_size(digits):
    images, labels, _ = digits
    dataset = ImageArrayDataset(images, labels, image_transform(24, [0.5] * 3, [0.5] * 3))
    image, label = dataset[0]
    assert image.shape == (3, 24, 24) and image.dtype.is_floating_point
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert label.item() == labels[0]
    for policy in ("jitter", "photo", "strong"):
        augmented = image_transform(24, [0.5] * 3, [0.5] * 3, augment=policy)(images[0])
        assert augmented.shape == (3, 24, 24) and augmented.dtype.is_floating_point


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
    fake_cifar10(tmp_path)
    # The fake batches have other checksums than the real files torchvision verifies.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    splits, classes = load_cifar("cifar10", tmp_path)
    assert classes[0] == "airplane" and splits["train"][0].shape == (30, 32, 32, 3)
    assert splits["test"][1].tolist() == list(range(6))


def test_cifar_offline_without_a_copy_says_where_to_put_the_files(tmp_path, monkeypatch):
    from pipeline.core.errors import StageError

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(StageError) as error:
        load_cifar("cifar100", tmp_path / "cifar100")
    message = str(error.value)
    assert "cifar-100-python.tar.gz" in message and str(tmp_path / "cifar100") in message


def test_every_mode_reads_as_rgb_uint8(tmp_path):
    for name, image in odd_images(np.random.default_rng(1), (31, 17)).items():
        image.save(tmp_path / name)
        array = read_rgb(tmp_path / name)
        assert array.shape == (17, 31, 3) and array.dtype == np.uint8, name


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "white.png")
    assert read_rgb(tmp_path / "white.png").min() == 255


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_rgb(tmp_path / "rotated.jpg").shape == (20, 10, 3)


def test_scan_ignores_non_images_and_reads_split_folders(tmp_path):
    tree = scan_tree(make_tree(tmp_path / "flat"))
    assert tree.classes == ["cat", "dog"] and set(tree.files) == {"all"}
    assert len(tree.files["all"]) == 2 * 4 * 7
    assert not any(path.suffix in (".txt", "") for path, _ in tree.files["all"])
    make_tree(tmp_path / "split" / "train")
    make_tree(tmp_path / "split" / "test", per_class=1)
    assert set(scan_tree(tmp_path / "split").files) == {"train", "test"}


def test_empty_class_folder_and_single_class_are_clear_errors(tmp_path):
    root = make_tree(tmp_path / "images")
    (root / "empty").mkdir()
    with pytest.raises(StageError, match=r"class folder .*empty holds no image files"):
        scan_tree(root)
    one = make_tree(tmp_path / "one", classes=("cat",))
    with pytest.raises(StageError, match="a classifier needs at least 2"):
        scan_tree(one)


def test_unreadable_files_are_all_listed_by_path(tmp_path):
    root = make_tree(tmp_path / "images")
    truncated = root / "cat" / "truncated.jpg"
    truncated.write_bytes((root / "cat" / "0_rgb.jpg").read_bytes()[:200])
    garbage = root / "dog" / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    problems = unreadable_files([truncated, garbage, root / "cat" / "0_rgb.jpg"], num_workers=2)
    assert list(problems) == [str(truncated), str(garbage)]
    assert all(reason for reason in problems.values())


def imagefolder_params(skip: bool) -> dict:
    params = tiny_params()
    params["data"].update(dataset="imagefolder", path="data/raw/images", skip_bad_images=skip, num_workers=2)
    params["data"].update(val_fraction=0.25, test_fraction=0.25, max_train_per_class=0)
    params["backbone"].update(weights="none", image_size=32)
    params["head"].update(max_epochs=3)
    params["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=1, batch_size=8)
    params["class_weighted_loss"] = True
    return params


def setup_run(tmp_path: Path, monkeypatch, skip: bool) -> Path:
    root = make_tree(tmp_path / "data" / "raw" / "images", classes=("cat", "dog", "bird"))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(imagefolder_params(skip)))
    monkeypatch.chdir(tmp_path)
    return root


def test_bad_images_fail_prepare_with_every_path_listed(tmp_path, monkeypatch):
    setup_run(tmp_path, monkeypatch, skip=False)
    with pytest.raises(StageError) as error:
        prepare.main()
    assert "1 unreadable image file(s)" in str(error.value)
    assert "data/raw/images/dog/broken.jpg" in str(error.value)
    assert "data.skip_bad_images: true" in str(error.value)
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.slow
def test_generated_image_folder_goes_through_every_stage(tmp_path, monkeypatch):
    setup_run(tmp_path, monkeypatch, skip=True)
    for stage in (prepare, backbone, extract, train_head, finetune, baseline, evaluate, export, report):
        stage.main()
    assert json.loads(Path("data/prepared/skipped.json").read_text()) == ["data/raw/images/dog/broken.jpg"]
    manifest = json.loads(Path("data/prepared/train.json").read_text())
    assert all(path.startswith("data/raw/images/") for path in manifest["paths"])
    test = json.loads(Path("metrics/test.json").read_text())
    assert set(test) == {"linear_probe", "finetuned", "finetuned_vs_probe"}
    text = Path("reports/report.md").read_text()
    assert "1 unreadable image file(s) skipped" in text and "| bird |" in text
    assert "augmentation photo, BatchNorm frozen, mixing none" in text  # augment auto, for photos
    # Each augmentation policy, BatchNorm mode and mixing trains on the tiny folder, and the
    # metrics record what was used (auto resolved: weights none trains BatchNorm).
    for augment, bn, mix in (
        ("strong", "frozen", "none"),
        ("none", "auto", "cutmix"),
        ("jitter", "train", "mixup"),
    ):
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["finetune"].update(augment=augment, bn=bn, mix=mix)
        Path("params.yaml").write_text(yaml.safe_dump(params))
        finetune.main()
        used = json.loads(Path("reports/live/finetune/metrics.json").read_text())["finetune"]
        assert (used["augment"], used["bn"], used["mix"]) == (augment, "train" if bn == "auto" else bn, mix)
        assert used["train_loss"] > 0


@pytest.mark.parametrize("contents", ["empty class folders", "only unreadable files"])
def test_an_empty_given_val_folder_is_refused_by_prepare_naming_it(contents, tmp_path):
    from pipeline.modalities import images

    root = tmp_path / "data" / "raw" / "images"
    make_tree(root / "train")
    make_tree(root / "test", per_class=1)
    for name in ("cat", "dog"):
        (root / "val" / name).mkdir(parents=True)
    if contents == "only unreadable files":
        (root / "val" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    data = {**imagefolder_params(skip=True)["data"], "path": str(root), "num_workers": 0}
    with pytest.raises(StageError, match=r"images/val/ holds no (readable )?image files; put images"):
        images.prepare_splits(data, seed=0)


def test_an_image_over_the_pixel_limit_is_refused_by_name_before_it_is_decoded(tmp_path, monkeypatch):
    """A 3000 x 3000 PNG of one colour is a few kB on disk and 27 MB decoded: over a limit
    of 4 megapixels it is listed as unreadable, naming the key, and skipped when asked."""
    root = setup_run(tmp_path, monkeypatch, skip=False)
    Image.new("RGB", (3000, 3000)).save(root / "cat" / "huge.png")
    params = imagefolder_params(skip=False)
    params["data"]["max_image_pixels"] = 4_000_000
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dog" / "broken.jpg").unlink()
    with pytest.raises(StageError) as error:
        prepare.main()
    message = str(error.value)
    assert (
        "data/raw/images/cat/huge.png: TooManyPixels: 3000 x 3000 = 9,000,000 pixels, over the limit"
        in message
    )
    assert "of 4,000,000 pixels (data.max_image_pixels)" in message
    params["data"]["skip_bad_images"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()
    assert json.loads((tmp_path / "data/prepared/skipped.json").read_text()) == [
        "data/raw/images/cat/huge.png"
    ]


def test_pillows_own_limit_is_an_error_not_a_warning(tmp_path, monkeypatch):
    from pipeline.modalities.images.data import TooManyPixels

    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 40,000 pixels: Pillow would only warn
    with pytest.raises(TooManyPixels, match="200 x 200 = 40,000 pixels, over the limit of 30,000"):
        read_rgb(tmp_path / "big.png")


def test_every_stage_reading_the_files_holds_them_to_prepares_pixel_limit(tmp_path, monkeypatch):
    """prepare records data.max_image_pixels with each split; the datasets extract,
    finetune, evaluate and export read refuse a larger file by that key, where Pillow's own
    limit (89 MP) would have decided."""
    from pipeline.core.common import PREPARED_DIR
    from pipeline.modalities import images
    from pipeline.modalities.images.data import TooManyPixels

    root = setup_run(tmp_path, monkeypatch, skip=True)
    params = imagefolder_params(skip=True)
    params["data"]["max_image_pixels"] = 1_000
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Image.new("RGB", (40, 40)).save(root / "cat" / "wide.png")
    prepare.main()
    checkpoint = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    train = images.dataset(PREPARED_DIR, "train", checkpoint)
    assert train.max_pixels == 1_000
    with pytest.raises(
        TooManyPixels,
        match=r"40 x 40 = 1,600 pixels, over the limit of 1,000 pixels \(data.max_image_pixels\)",
    ):
        train.paths[0] = str(root / "cat" / "wide.png")  # a file grown since prepare checked it
        train[0]


def test_a_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    """Pillow refuses twice its own limit whatever data.max_image_pixels says: the reader
    sets Pillow's to the key's, so an image under the key is read, and Pillow's is put back."""
    Image.new("RGB", (50, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 2,500 pixels: over 2x Pillow's
    assert read_rgb(tmp_path / "big.png", max_pixels=10_000).shape == (50, 50, 3)
    assert Image.MAX_IMAGE_PIXELS == 1_000


def test_a_pixel_limit_past_a_gigapixel_is_refused(tmp_path):
    from pipeline.core.params import ParamsError, validate
    from tests.conftest import default_params

    params = default_params()
    params["data"]["max_image_pixels"] = 10**12
    with pytest.raises(
        ParamsError, match=r"data.max_image_pixels: 1,000,000,000,000 pixels, over the most allowed"
    ):
        validate(params)


def test_images_are_resized_in_uint8_and_made_float_at_the_models_size():
    """A large photo becomes float32 (4 bytes a value) only once it is the size the model
    takes, as torchvision's weights transforms do, not at its full size."""
    from torchvision.transforms import v2

    transform = image_transform(32, [0.5] * 3, [0.5] * 3, resize_size=36)
    kinds = [type(step) for step in transform.transforms]
    assert kinds.index(v2.ToDtype) > kinds.index(v2.CenterCrop) > kinds.index(v2.Resize)
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    reference = v2.functional.center_crop(
        v2.functional.resize(v2.functional.to_image(photo), 36, antialias=True), 32
    )
    expected = (reference.float() / 255 - 0.5) / 0.5
    assert torch.allclose(transform(photo), expected, atol=1e-6)


def test_only_photo_formats_are_read_and_eps_is_not(tmp_path):
    from PIL import UnidentifiedImageError

    from pipeline.modalities.images.data import IMAGE_EXTENSIONS

    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp", ".gif"} <= IMAGE_EXTENSIONS
    assert not {".eps", ".ps", ".pdf", ".psd"} & IMAGE_EXTENSIONS
    disguised = tmp_path / "photo.png"  # an EPS file, which Pillow decodes by running Ghostscript
    disguised.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with Image.open(disguised) as image:
        assert image.format == "EPS"
    with pytest.raises(UnidentifiedImageError):
        read_rgb(disguised)


def test_hidden_folders_are_not_entered(tmp_path):
    root = make_tree(tmp_path / "images")
    hidden = root / "cat" / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.new("RGB", (9, 9)).save(hidden / "0_rgb-checkpoint.png")
    files = [path for path, _ in scan_tree(root).files["all"]]
    assert len(files) == 2 * 4 * 7 and not any(".ipynb_checkpoints" in str(path) for path in files)


def test_file_names_that_are_not_utf8_are_refused_by_the_scan_naming_them(tmp_path):
    import os

    root = make_tree(tmp_path / "images")
    Image.new("RGB", (9, 9)).save(os.fsdecode(os.fsencode(root / "cat") + b"/caf\xe9.png"))
    with pytest.raises(
        StageError, match=r"1 file name\(s\) under .* are not UTF-8: .*cat/caf\\xe9\.png; rename"
    ):
        scan_tree(root)
