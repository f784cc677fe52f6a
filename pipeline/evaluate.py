"""Stage 6, evaluate: the linear-probe and the fine-tuned model on the test split.

Reads params ``device``, ``amp``, ``data.num_workers``, ``extract.batch_size`` and
``distributed.{nproc_per_node,backend,timeout_s}`` (each process predicts a share); reads data/prepared/,
data/features/test.pt, models/head.pt and models/finetuned.pt; writes metrics/test.json
(accuracy and macro-F1 of both models; declared as dvc metrics), metrics/per_class.json
(per-class precision, recall, F1, support and the confusion matrices) and
reports/plots/confusion_{linear_probe,finetuned}.csv (for dvc plots).
Run: ``python -m pipeline.evaluate``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed
from pipeline.common import (
    FEATURES_DIR,
    FINETUNED_FILE,
    HEAD_FILE,
    METRICS_DIR,
    PLOTS_DIR,
    PREPARED_DIR,
    load_torch,
    run_stage,
    write_json,
    write_text,
)
from pipeline.data import checkpoint_transform, loader_workers, split_dataset
from pipeline.metrics import per_class_metrics, summary_metrics
from pipeline.models import load_classifier, load_head
from pipeline.params import load_params
from pipeline.training import make_loader, predict


@torch.inference_mode()
def linear_probe_predictions(head_checkpoint: dict, features_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The probe's predictions on the cached test features (the frozen backbone's output)."""
    head = load_head(head_checkpoint).eval()
    test = load_torch(features_file)
    return head(test["features"]).argmax(1).numpy(), test["labels"].numpy()


def finetuned_predictions(
    batch_size: int, num_workers: int, ranks: distributed.Ranks, device: torch.device, amp: str
) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuned model's predictions on the test split, in order; each process
    predicts a share."""
    model, checkpoint = load_classifier(FINETUNED_FILE)
    test = split_dataset(PREPARED_DIR, "test", checkpoint_transform(checkpoint))
    sampler = distributed.ShardSampler(len(test), ranks)
    loader = make_loader(
        test, batch_size, device, num_workers=loader_workers(test, num_workers), sampler=sampler
    )
    return predict(model, loader, device, amp)


def confusion_csv(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> str:
    """One row per test image, the format of dvc's confusion-matrix template."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(actual, predicted, strict=True))
    return buffer.getvalue()


def main() -> None:
    params = load_params()
    _, ranks, device = distributed.start("evaluate", params["distributed"], params["device"])
    finetuned = finetuned_predictions(
        params["extract"]["batch_size"], params["data"]["num_workers"], ranks, device, params["amp"]
    )
    if not ranks.main:
        return
    head_checkpoint = load_torch(HEAD_FILE)
    classes = head_checkpoint["classes"]
    predictions = {
        "linear_probe": linear_probe_predictions(head_checkpoint, FEATURES_DIR / "test.pt"),
        "finetuned": finetuned,
    }
    summary, details = {}, {"classes": classes}
    for name, (predicted, actual) in predictions.items():
        summary[name] = summary_metrics(actual, predicted)
        details[name] = per_class_metrics(actual, predicted, classes)
        write_text(PLOTS_DIR / f"confusion_{name}.csv", confusion_csv(actual, predicted, classes))
    write_json(METRICS_DIR / "test.json", summary)
    write_json(METRICS_DIR / "per_class.json", details)
    for name, scores in summary.items():
        print(f"evaluate: {name}: test accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}")


if __name__ == "__main__":
    run_stage(main, stage="evaluate")
