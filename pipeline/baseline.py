"""Stage baseline: the same probe on features of a random-init backbone, for comparison.

Transfer is worth what the pretrained features add over an untrained network's: this stage
extracts features with ``backbone.arch`` at random init (seeded), fed as that architecture
is fed without pretrained weights, fits the configured head the way train_head does, and
scores it on the test split. Reads params ``seed``, ``device``, ``amp``,
``class_weighted_loss``, ``data.modality``, ``data.num_workers``, ``backbone.arch``, ``backbone.image_size``,
``extract.batch_size``, ``head.*`` and ``distributed.{nproc_per_node,backend,timeout_s}``;
reads data/prepared/ (and the image files it lists); writes metrics/baseline.json.
Run: ``python -m pipeline.baseline``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import modalities
from pipeline.core import distributed
from pipeline.core.common import METRICS_DIR, PREPARED_DIR, seed_everything, write_json
from pipeline.core.data import SPLITS, load_classes
from pipeline.core.entry import run_stage
from pipeline.core.metrics import summary_metrics
from pipeline.core.training import extract_features, fit_new_head
from pipeline.modalities import load_params

if TYPE_CHECKING:
    from pipeline.modalities.contract import Modality


def random_init_features(
    modality: Modality,
    config: dict[str, Any],
    batch_size: int,
    num_workers: int,
    ranks: distributed.Ranks,
    device: torch.device,
    amp: str,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each split's features from params' ``backbone`` architecture (``config``) at random
    init (seeded), and the labels, in dataset order; each process extracts a share."""
    backbone, preprocessing = modality.random_init_backbone(config)
    features = {}
    for split in SPLITS:
        loader = modalities.inference_loader(split, preprocessing, batch_size, num_workers, device, ranks)
        features[split] = extract_features(backbone, loader, device, amp, desc=f"random-init {split}")
    return features


def main() -> None:
    params = load_params()
    head, seed = params["head"], params["seed"]
    _, ranks, device = distributed.start("baseline", params["distributed"], params["device"])
    seed_everything(seed)
    features = random_init_features(
        modalities.get(params["data"]["modality"]),
        params["backbone"],
        params["extract"]["batch_size"],
        params["data"]["num_workers"],
        ranks,
        device,
        params["amp"],
    )
    if not ranks.main:  # the probe trains on the CPU in moments: rank 0 alone
        return
    probe, _ = fit_new_head(
        features["train"],
        features["val"],
        len(load_classes(PREPARED_DIR)),
        head,
        seed,
        class_weighted=params["class_weighted_loss"],
    )
    test_features, test_labels = features["test"]
    with torch.inference_mode():
        predicted = probe.eval()(test_features).argmax(1).numpy()
    metrics = summary_metrics(np.asarray(test_labels), predicted)
    write_json(METRICS_DIR / "baseline.json", {"random_init_probe": metrics})
    print(f"baseline: random-init probe test accuracy {metrics['accuracy']:.4f}")


if __name__ == "__main__":
    run_stage(main, "baseline", distributed=True)
