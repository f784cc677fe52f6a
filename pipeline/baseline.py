"""Stage baseline: the same probe on features of a random-init backbone, for comparison.

Transfer is worth what the pretrained features add over an untrained network's: this stage
extracts features with ``backbone.arch`` at random init (seeded), fits the configured head
the way train_head does, and scores it on the test split. Reads params ``seed``, ``device``,
``class_weighted_loss``, ``data.num_workers``, ``backbone.arch``, ``backbone.image_size``,
``extract.batch_size`` and ``head.*``; reads data/prepared/ (and the image files it lists);
writes metrics/baseline.json. Run: ``python -m pipeline.baseline``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.common import METRICS_DIR, PREPARED_DIR, resolve_device, run_stage, seed_everything, write_json
from pipeline.data import SPLITS, image_transform, load_classes, loader_workers, split_dataset
from pipeline.metrics import summary_metrics
from pipeline.models import PLAIN_MEAN, PLAIN_STD, build_backbone
from pipeline.params import load_params
from pipeline.training import extract_features, fit_configured_head, make_loader


def random_init_probe_accuracy(params: dict, device: torch.device) -> dict[str, float]:
    """Test metrics of the configured head trained on random-init features."""
    config, seed = params["head"], params["seed"]
    backbone, _ = build_backbone(params["backbone"]["arch"], image_size=params["backbone"]["image_size"])
    transform = image_transform(params["backbone"]["image_size"], PLAIN_MEAN, PLAIN_STD)
    features = {}
    for split in SPLITS:
        dataset = split_dataset(PREPARED_DIR, split, transform)
        workers = loader_workers(dataset, params["data"]["num_workers"])
        loader = make_loader(dataset, params["extract"]["batch_size"], device, num_workers=workers)
        features[split] = extract_features(backbone, loader, device, desc=f"random-init {split}")
    classes = load_classes(PREPARED_DIR)
    head, _ = fit_configured_head(
        config, features["train"], features["val"], len(classes), seed, params["class_weighted_loss"]
    )
    test_features, test_labels = features["test"]
    with torch.inference_mode():
        predicted = head.eval()(test_features).argmax(1).numpy()
    return summary_metrics(np.asarray(test_labels), predicted)


def main() -> None:
    params = load_params()
    seed_everything(params["seed"])
    metrics = random_init_probe_accuracy(params, resolve_device(params["device"]))
    write_json(METRICS_DIR / "baseline.json", {"random_init_probe": metrics})
    print(f"baseline: random-init probe test accuracy {metrics['accuracy']:.4f}")


if __name__ == "__main__":
    run_stage(main)
