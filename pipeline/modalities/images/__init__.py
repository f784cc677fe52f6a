"""The image modality: what the stages need of images, behind the seam pipeline.modalities
describes (every function here has its twin in pipeline.modalities.text).

Images come from scikit-learn's digits or CIFAR (in memory) or a class-per-folder tree of
files (streamed); the backbone is any torchvision classification model, pretrained on the
offline glyph task, at random init, with torchvision's weights or from a local checkpoint.
A batch is a float tensor N x 3 x H x W, normalised as the backbone's preprocessing says.

torch and torchvision are imported inside the functions that use them: the report stage
imports this module for its view of the mistakes and needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import ParamsError, StageError
from pipeline.core.params import require_raw_path
from pipeline.core.recipe import ScheduleRule, smallest_auto_batch

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from pipeline.core import distributed
    from pipeline.core.checkpoints import BackboneCheckpoint, ImagePreprocessing
    from pipeline.core.data import PredictInputs, PredictRequest, Splits

NAME = "images"
DATASETS = ("digits", "imagefolder", "cifar10", "cifar100")
ORIENTED = ("digits",)  # datasets whose classes a flip changes (a mirrored 2 is no digit)
ITEMS = "images"  # what messages and the report count
# finetune.epochs and batch_size auto: 8 epochs at batch 64 where that makes 250 optimizer
# steps (about 2,000 training photos or more); on fewer, the batch halves down to 16 while an
# epoch has under 16 steps, and the epochs grow to 250 steps: as much as 500 gained on photo
# sets of 100 and 400, in half the time (pipeline.core.recipe; docs/guides/images.md)
AUTO_SCHEDULE = ScheduleRule(epochs=8, batch_size=64, smallest_batch=16, steps_per_epoch=16, min_steps=250)
SKIPPED = "unreadable image file(s) skipped (`data.skip_bad_images: true`)"  # the report's note


def check_params(params: dict[str, Any], check_models: bool = True) -> None:
    """The keys whose meaning is the images': the data's folder, an augmentation the data can
    take, and (``check_models``) the backbone."""
    from pipeline.core.recipe import AUGMENTS, FLIPPING

    data, augment = params["data"], params["finetune"]["augment"]
    if data["dataset"] != "digits":  # the others are read from data.path
        path = require_raw_path(data)
        if data["dataset"] == "imagefolder" and not path.is_dir():
            raise ParamsError(
                f"data.path: {data['path']!r} is not a folder; put your class-per-folder images "
                "there and track them with `dvc add`"
            )
    if data["dataset"] in ORIENTED and augment in FLIPPING:
        allowed = [name for name in AUGMENTS if name not in FLIPPING]
        raise ParamsError(
            f"finetune.augment: {augment!r} flips images left to right, which changes "
            f"the class of a {data['dataset']} image (a mirrored 2 or 5); choose one of: {', '.join(allowed)}"
        )
    if check_models:
        check_backbone(params["backbone"])
        check_batchnorm_steps(params)


def check_batchnorm_steps(params: dict[str, Any]) -> None:
    """BatchNorm that trains on one image a step fails where a layer of it sees one value per
    channel (a 1x1 map: resnet18's last block at 32 px), and only after the earlier stages
    ran: refused when params load. Each training that trains BatchNorm (the glyph
    pretraining; fine-tuning with ``finetune.bn`` train) is checked at its per-process step."""
    from pipeline.core import distributed
    from pipeline.core.recipe import resolved_bn
    from pipeline.modalities.images import models as image_models

    backbone, finetune, spread = params["backbone"], params["finetune"], params["distributed"]
    world = distributed.local_processes(spread["nproc_per_node"]) * spread["nnodes"]
    trainings = []
    if backbone["weights"] == "pretrain":
        trainings.append(("backbone.pretrain_batch_size", "the glyph pretraining trains it"))
    if resolved_bn(finetune["bn"], backbone["weights"]) == "train":
        trainings.append(("finetune.batch_size", "finetune.bn resolves to train"))
    for key, why in trainings:
        section, name = key.split(".")
        batch = given = params[section][name]
        if batch == "auto":  # the smallest batch the rule can pick
            batch = smallest_auto_batch(AUTO_SCHEDULE, world)
            given = f"auto ({batch} on a small set)"
        step, _ = distributed.split_batch(batch, world, spread["max_batch_per_process"], key)
        if step == 1 and image_models.single_image_step_fails(backbone["arch"], backbone["image_size"]):
            raise ParamsError(
                f"{key}: {given} image(s) over {world} process(es) (distributed.max_batch_per_process: "
                f"{spread['max_batch_per_process']}) make steps of 1 image, and BatchNorm trains "
                f"({why}): {backbone['arch']} at {backbone['image_size']} px has a BatchNorm layer "
                "that then sees one value per channel, which torch refuses; give each process at "
                "least 2 images a step, or set finetune.bn: frozen"
            )


def auto_augment(dataset: str) -> str:
    """The augmentation policy ``finetune.augment: auto`` picks: no flip where a flip changes
    the class, the photo policy elsewhere (pipeline.core.recipe says what each does)."""
    return "jitter" if dataset in ORIENTED else "photo"


def check_backbone(config: dict[str, Any]) -> None:
    """``backbone.arch`` is a model torchvision (or the lite extra) builds, a weights name is
    one of its own, and it takes ``backbone.image_size``: checked when params load, before
    any stage works. Imports torchvision, the slow part of loading params."""
    from pipeline.core.params import BUILTIN_WEIGHTS, did_you_mean, is_weights_file
    from pipeline.modalities.images import models as image_models

    arch, weights, size = config["arch"], config["weights"], config["image_size"]
    available = image_models.architectures()
    if arch not in available:
        raise ParamsError(
            f"backbone.arch: unknown architecture {arch!r}{did_you_mean(arch, available)}; "
            "choose a torchvision classification "
            f"model, one of: {', '.join(available)} (for texts, data.modality: text with a "
            "Hugging Face encoder)"
        )
    if weights not in BUILTIN_WEIGHTS and not is_weights_file(weights):
        valid = image_models.weights_names(arch)
        if weights not in valid:  # the name alone looks valid: fail before prepare, not after
            raise ParamsError(
                f"backbone.weights: {weights!r} is not a weights name of {arch}"
                f"{did_you_mean(weights, valid)}; choose one of: {', '.join(valid)}, "
                "or 'pretrain', 'none', or a checkpoint path"
            )
    problem = image_models.image_size_problem(arch, size)
    if problem is not None:  # a forward pass on torch's meta device: a ViT's patch size, a minimum
        larger = image_models.next_image_size(arch, size)
        hint = f"the next size up that it takes is {larger}" if larger else "try 224, ImageNet's"
        raise ParamsError(f"backbone.image_size: {arch} cannot take {size}-pixel images ({problem}); {hint}")


def prepare_splits(data: dict[str, Any], seed: int) -> tuple[Splits, list[str], list[str]]:
    """The splits of ``data.dataset`` (digits, cifar10, cifar100, imagefolder), the class
    names and the files skipped as unreadable."""
    from pipeline.core.data import split_given
    from pipeline.modalities.images import data as image_data

    fractions = (data["val_fraction"], data["test_fraction"], data["max_train_per_class"], seed)
    if data["dataset"] == "imagefolder":
        given, classes, skipped = imagefolder_files(data)
        splits = split_given(given, *fractions, min_val=data["min_val_examples"])
        for files, _ in splits.values():  # every later reader holds the files to prepare's limit
            files["max_image_pixels"] = data["max_image_pixels"]
        return splits, classes, skipped
    if data["dataset"] in ("cifar10", "cifar100"):
        given, classes = image_data.load_cifar(data["dataset"], Path(data["path"]))
        return split_given(given, *fractions, min_val=data["min_val_examples"]), classes, []
    images, labels, classes = image_data.load_digits_dataset()
    return split_given({"all": (images, labels)}, *fractions, min_val=data["min_val_examples"]), classes, []


def imagefolder_files(data: dict[str, Any]) -> tuple[dict, list[str], list[str]]:
    """A class-per-folder tree's files by split ('all' where it has no split folders), its
    classes and the unreadable files skipped; unreadable files are an error listing them
    all, unless ``data.skip_bad_images``."""
    from pipeline.core.loaders import worker_count
    from pipeline.modalities.images.data import scan_tree, unreadable_files

    tree = scan_tree(Path(data["path"]))
    problems = unreadable_files(
        [path for files in tree.files.values() for path, _ in files],
        worker_count(data["num_workers"]),
        data["max_image_pixels"],
        " (data.max_image_pixels)",
    )
    if problems and not data["skip_bad_images"]:
        raise StageError(
            f"data.path: {len(problems)} unreadable image file(s); fix or remove them, or set "
            "data.skip_bad_images: true to skip them:\n  "
            + "\n  ".join(f"{path}: {reason}" for path, reason in problems.items())
        )
    bad = set(problems)
    files = {
        split: (
            {"paths": [str(p) for p, _ in pairs if str(p) not in bad]},
            np.array([y for p, y in pairs if str(p) not in bad]),
        )
        for split, pairs in tree.files.items()
    }
    for split, (_, labels) in files.items():
        if len(labels) == 0:  # a given val/ or test/ tree: an empty train/ class folder fails the scan
            readable = " readable" if tree.files[split] else ""
            raise StageError(
                f"data.path: {Path(data['path']) / split}/ holds no{readable} image files; put images "
                f"of each class in it, or remove it to hold {split} out of train/ "
                f"(data.{split}_fraction)"
            )
    return files, tree.classes, sorted(bad)


def materialize(
    config: dict[str, Any],
    seed: int,
    device: torch.device,
    amp: str,
    ranks: distributed.Ranks,
    settings: dict[str, Any],
) -> tuple[BackboneCheckpoint, dict[str, Any]]:
    """The backbone checkpoint and its metrics for ``backbone.weights``: pretrained on the
    glyph task (``pretrain``, in ``ranks``' processes), random init (``none``), a local
    checkpoint, or torchvision's named weights."""
    from pipeline.core.checkpoints import backbone_checkpoint
    from pipeline.modalities.images import glyphs
    from pipeline.modalities.images import models as image_models

    arch, weights, size = config["arch"], config["weights"], config["image_size"]
    mean, std, resize, metrics = image_models.PLAIN_MEAN, image_models.PLAIN_STD, size, {}
    if weights == "pretrain":
        model, features, accuracy = glyphs.pretrain_on_glyphs(
            arch,
            size,
            config["pretrain_images"],
            config["pretrain_epochs"],
            config["pretrain_lr"],
            config["pretrain_batch_size"],
            seed,
            device,
            amp,
            ranks,
            settings["sync_batchnorm"],
            settings["max_batch_per_process"],
        )
        metrics["pretrain_accuracy"] = round(accuracy, 6)
    elif weights == "none":
        model, features = image_models.build_backbone(arch, image_size=size)
    elif Path(weights).is_file():
        model, features = image_models.load_checkpoint_backbone(arch, weights, size)
    else:
        model, features, weights_preprocessing = image_models.download_backbone(arch, weights, size)
        mean, std = weights_preprocessing["mean"], weights_preprocessing["std"]
        resize = round(size * weights_preprocessing["resize_ratio"])
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    chosen = preprocessing(arch, weights, size, resize, mean, std)
    return backbone_checkpoint(chosen, features, model.state_dict()), metrics


def preprocessing(
    arch: str, weights: str, image_size: int, resize_size: int, mean: list[float], std: list[float]
) -> ImagePreprocessing:
    return {
        "modality": NAME,
        "arch": arch,
        "weights": weights,
        "image_size": image_size,
        "resize_size": resize_size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def random_init_backbone(config: dict[str, Any]) -> tuple[nn.Module, ImagePreprocessing]:
    """``backbone.arch`` at random init (from torch's seeded generator), for the baseline,
    and the preprocessing that goes with no pretrained weights."""
    from pipeline.modalities.images import models as image_models

    arch, size = config["arch"], config["image_size"]
    model, _ = image_models.build_backbone(arch, image_size=size)
    return model, preprocessing(arch, "none", size, size, image_models.PLAIN_MEAN, image_models.PLAIN_STD)


def build_backbone(preprocessing: dict[str, Any]) -> nn.Module:
    """The architecture ``preprocessing`` names, for its image size, with untrained weights
    (load_backbone puts a checkpoint's in)."""
    from pipeline.modalities.images.models import build_backbone

    return build_backbone(preprocessing["arch"], image_size=preprocessing["image_size"])[0]


def dataset(prepared_dir: Path, split: str, preprocessing: dict[str, Any], augment: str = "none") -> Dataset:
    """A prepared split as a dataset of (image tensor, label): in memory, or streamed from
    the image files (``reads_files``: DataLoader workers decode them); ``augment`` names the
    training images' augmentation policy (image_data.augmentation)."""
    from pipeline.core.data import load_split
    from pipeline.modalities.images.data import ImageArrayDataset, ImageFileDataset, checkpoint_transform

    images, labels = load_split(prepared_dir, split)
    transform = checkpoint_transform(preprocessing, augment)
    if isinstance(images, dict):
        return ImageFileDataset(images["paths"], labels, transform, images.get("max_image_pixels"))
    return ImageArrayDataset(images, labels, transform)


def batch_mixing(mix: str, alpha: float, num_classes: int) -> Callable | None:
    """The training batches' MixUp or CutMix (``finetune.mix``), None for none."""
    from pipeline.modalities.images.data import batch_mixing

    return batch_mixing(mix, alpha, num_classes)


def blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages in order, for ``finetune.unfreeze``."""
    from pipeline.modalities.images.models import feature_blocks

    return feature_blocks(backbone)


def add_adapters(backbone: nn.Module, checkpoint: dict[str, Any], config: dict[str, Any]) -> None:
    """Residual adapters beside every kxk convolution of the frozen backbone, BatchNorm's
    scale and shift trainable (pipeline.modalities.images.adapters)."""
    from pipeline.modalities.images.adapters import add_adapters

    add_adapters(backbone, checkpoint["arch"])


def fold_adapters(model: nn.Module) -> nn.Module:
    """The model with its adapters folded into the convolutions' kernels (exact)."""
    from pipeline.modalities.images.adapters import fold_adapters

    fold_adapters(model)
    return model


def onnx_signature(
    model: nn.Module, checkpoint: dict[str, Any]
) -> tuple[nn.Module, tuple, list[dict], tuple]:
    """What the export traces: the model, an example input, the input's description for
    model.json, and its dynamic axes (the batch)."""
    import torch

    size = checkpoint["image_size"]
    inputs = [
        {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW, RGB"}
    ]
    batch = torch.export.Dim("batch", min=1)
    return model, (torch.zeros(2, 3, size, size),), inputs, ({0: batch},)


def onnx_feed(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """A batch as onnxruntime's inputs."""
    return {"images": batch.numpy().astype(np.float32, copy=False)}


def predict_inputs(request: PredictRequest, meta: dict[str, Any]) -> PredictInputs:
    """Image files and folders (searched recursively for files with an image extension) for
    ``python -m pipeline predict``, preprocessed as ``meta`` (the model's) says; a file
    that cannot be read is a row with its error."""
    import torch

    from pipeline.core.data import PredictInputs
    from pipeline.modalities.images.data import ImagesToPredict, checkpoint_transform, image_files, printable

    if request.texts:
        raise ParamsError("--text: this model classifies images; give image files or folders")
    files, others = image_files(request.paths)
    if not files:
        raise StageError(f"no image files in {', '.join(request.paths)}")
    return PredictInputs(
        columns={"path": [printable(path) for path in files]},
        dataset=ImagesToPredict(files, checkpoint_transform(meta)),
        stack=torch.stack,
        reads_files=True,
        items="image(s)",
        unreadable="file(s) could be read as an image",
        notes=[f"{others} non-image file(s) in the folders skipped"] if others else [],
    )


def write_samples(prepared_dir: Path, split: str, keep: list[int], classes: list[str], out: Path) -> None:
    """The ``keep`` items of a prepared split as files in ``out``, one folder per class: an
    image held in memory as a PNG named by its index in the split (``<class>/test-00042.png``),
    so predict sees the very pixels evaluate saw; an image file copied."""
    import shutil

    from PIL import Image

    from pipeline.core.common import atomic_path
    from pipeline.core.data import load_split

    images, labels = load_split(prepared_dir, split)
    with atomic_path(out) as staged:
        for name in classes:
            (staged / name).mkdir(parents=True)
        for index in keep:
            folder = staged / classes[labels[index]]
            if isinstance(images, dict):
                source = Path(images["paths"][index])
                shutil.copyfile(source, folder / f"{split}-{index:05d}{source.suffix.lower()}")
            else:
                Image.fromarray(images[index]).save(folder / f"{split}-{index:05d}.png")


def describe(backbone: dict[str, Any]) -> str:
    """How images reach the backbone (params' ``backbone`` section), for the report's first line."""
    return f"at {backbone['image_size']} px"


def mistakes_view(rows: list[dict[str, str]], prepared_dir: Path, save_figure: Callable) -> str:
    """The report's view of the highest-loss test images (``rows``, highest first): a figure
    of them with true class, prediction and probability (fastai's plot_top_losses), saved
    with the report's ``save_figure``."""
    import matplotlib.pyplot as plt

    columns = 4
    lines = max(1, -(-len(rows) // columns))
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 3.0 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row, image in zip(axes.flat, rows, gallery_images(rows, prepared_dir), strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(
            f"true: {row['actual']}\npredicted: {row['predicted']} ({float(row['probability']):.2f})\n"
            f"loss {float(row['loss']):.2f}",
            fontsize=9,
            color="black" if row["actual"] == row["predicted"] else "tab:red",
        )
    figure = save_figure(fig, "top_losses.png")
    return (
        f"The {len(rows)} test images with the highest loss (red: misclassified; the probability "
        f"is the predicted class's):\n\n![highest-loss test images]({figure})"
    )


def gallery_images(rows: list[dict[str, str]], prepared_dir: Path) -> list[np.ndarray]:
    """The pixels of the test images ``rows`` name: from the prepared array, or their files."""
    archive = Path(prepared_dir) / "test.npz"
    if archive.is_file():
        with np.load(archive) as data:
            images = data["images"]
            return [images[int(row["index"])] for row in rows]
    from pipeline.modalities.images.data import read_rgb  # imports torch: only image files need it

    return [read_rgb(row["source"]) for row in rows]
