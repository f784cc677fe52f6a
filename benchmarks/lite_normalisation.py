"""Measurement: EfficientNet-Lite0's input scaling, its own (mean = std = 0.5) vs ImageNet's.

Lite0's ImageNet weights were trained on inputs scaled to [-1, 1], the TF-Lite convention;
the pipeline used ImageNet's mean and std until it was measured here. This extracts Lite0
features of a class-per-folder tree with train/ and test/ folders (cifar10-dev by default)
under each scaling and fits scikit-learn's logistic regression on them, in one run.
Needs the lite extra. Run from the repository root:
``python -m benchmarks.lite_normalisation [--data ../shared/data/cifar10-dev] [--size 96]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks import results
from pipeline.core.loaders import make_loader
from pipeline.core.training import extract_features
from pipeline.modalities.images.data import ImageFileDataset, image_transform, scan_tree
from pipeline.modalities.images.models import LITE_MEAN, LITE_STD, download_backbone
from pipeline.tools.samples import chosen

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def first_per_class(files: list[tuple[Path, int]], per_class: int) -> list[tuple[Path, int]]:
    return [files[i] for i in chosen(np.array([label for _, label in files]), per_class)]


def probe_accuracy(root: Path, size: int, mean: list[float], std: list[float], per_class: int) -> float:
    """Test accuracy of a logistic regression on Lite0 features under one input scaling."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tree = scan_tree(root)
    model, _, preprocessing = download_backbone("efficientnet_lite0", "IMAGENET1K_V1")
    transform = image_transform(size, mean, std, resize_size=round(size * preprocessing["resize_ratio"]))
    features = {}
    for split in ("train", "test"):
        files = tree.files[split]
        if split == "train":
            files = first_per_class(files, per_class)
        dataset = ImageFileDataset([str(p) for p, _ in files], [label for _, label in files], transform)
        loader = make_loader(dataset, 128, torch.device("cpu"), num_workers=2)
        extracted, labels = extract_features(model, loader, torch.device("cpu"), "off")
        features[split] = (extracted.numpy(), labels.numpy())
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    classifier.fit(*features["train"])
    return classifier.score(*features["test"])


NAME = "lite_normalisation"


def table(record: dict) -> str:
    """Each input scaling's test accuracy, from the results file."""
    lines = ["| input scaling | test accuracy |", "|---|---:|"]
    lines += [f"| {row['scaling']} | {row['accuracy']:.2%} |" for row in record["results"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-dev"))
    parser.add_argument("--size", type=int, default=96, help="input side in pixels")
    parser.add_argument("--per-class", type=int, default=50, help="training images per class")
    args = parser.parse_args()
    torch.manual_seed(0)
    measured = [
        {
            "scaling": name,
            "accuracy": round(probe_accuracy(args.data, args.size, mean, std, args.per_class), 4),
        }
        for name, (mean, std) in (
            ("mean = std = 0.5 (Lite's own)", (LITE_MEAN, LITE_STD)),
            ("ImageNet mean/std", IMAGENET),
        )
    ]
    command = f"python -m benchmarks.lite_normalisation --size {args.size} --per-class {args.per_class}"
    print(table(results.save(NAME, command, measured)))


if __name__ == "__main__":
    main()
