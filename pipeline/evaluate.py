"""Stage 6, evaluate: the linear-probe and the fine-tuned model on the test split.

Reads params ``device``, ``amp``, ``data.num_workers``, ``extract.batch_size`` and
``distributed.{nproc_per_node,backend,timeout_s}`` (each process predicts a share); reads data/prepared/,
data/features/test.pt, models/head.pt and models/finetuned.pt; writes metrics/test.json
(accuracy, macro-F1 and expected calibration error of both models, and how many test
examples only one of them gets right, with the exact McNemar test's p-value; declared as
dvc metrics),
metrics/per_class.json (per-class precision, recall, F1, support, the confusion matrices and
the reliability diagram's bins), metrics/test_predictions.csv (the fine-tuned model's
prediction, probability and loss for each test example, for the report's view of mistakes)
and reports/plots/confusion_{linear_probe,finetuned}.csv (for dvc plots).
Run: ``python -m pipeline.evaluate``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.checkpoints import HeadCheckpoint, read_features, read_head
from pipeline.core.common import (
    FEATURES_DIR,
    FINETUNED_FILE,
    METRICS_DIR,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    PREPARED_DIR,
    write_json,
    write_text,
)
from pipeline.core.data import split_sources
from pipeline.core.entry import run_stage
from pipeline.core.errors import StageError
from pipeline.core.metrics import calibration, p_text, paired_comparison, per_class_metrics, summary_metrics
from pipeline.core.models import load_head
from pipeline.core.training import predict_logits
from pipeline.modalities import inference_loader, load_classifier, load_params


@torch.inference_mode()
def linear_probe_logits(
    head_checkpoint: HeadCheckpoint, features_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's logits on the cached test features (the frozen backbone's output), and labels."""
    head = load_head(head_checkpoint).eval()
    test = read_features("test", features_dir)
    return head(test["features"]).float(), test["labels"]


def finetuned_logits(
    batch_size: int, num_workers: int, ranks: distributed.Ranks, device: torch.device, amp: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-tuned model's logits on the test split, in order, and labels; each process
    predicts a share."""
    model, checkpoint = load_classifier(FINETUNED_FILE)
    loader = inference_loader("test", checkpoint, batch_size, num_workers, device, ranks)
    return predict_logits(model, loader, device, amp)


def predictions_csv(
    logits: torch.Tensor, actual: torch.Tensor, sources: list[str], classes: list[str]
) -> str:
    """One row per test example: its index in the split, its source (an image's file, empty
    for images in memory; a text's file and line), true and predicted class, the
    prediction's probability and the example's loss."""
    log_probs = torch.log_softmax(logits.double(), dim=1)
    probability, predicted = log_probs.exp().max(dim=1)
    loss = -log_probs.gather(1, actual[:, None].long())[:, 0]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "source", "actual", "predicted", "probability", "loss"])
    rows = zip(sources, actual.tolist(), predicted.tolist(), probability.tolist(), loss.tolist(), strict=True)
    for index, (source, true, guess, p, nll) in enumerate(rows):
        writer.writerow([index, source, classes[true], classes[guess], f"{p:.6f}", f"{nll:.6f}"])
    return buffer.getvalue()


def confusion_csv(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> str:
    """One row per test image, the format of dvc's confusion-matrix template."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(actual, predicted, strict=True))
    return buffer.getvalue()


def same_examples(
    probe: tuple[np.ndarray, np.ndarray], finetuned: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test labels and each model's predictions, once it is sure both models saw the
    same examples in the same order (the probe reads the cached features, the fine-tuned
    model the prepared split)."""
    (labels, probe_predicted), (finetuned_labels, finetuned_predicted) = probe, finetuned
    if not np.array_equal(labels, finetuned_labels):
        raise StageError(
            f"{FEATURES_DIR / 'test.pt'} and the prepared test split disagree on the labels; "
            "rerun extract (dvc repro)"
        )
    return labels, probe_predicted, finetuned_predicted


def main() -> None:
    params = load_params()
    _, ranks, device = distributed.start("evaluate", params["distributed"], params["device"])
    finetuned = finetuned_logits(
        params["extract"]["batch_size"], params["data"]["num_workers"], ranks, device, params["amp"]
    )
    if not ranks.main:
        return
    head_checkpoint = read_head()
    classes = head_checkpoint["classes"]
    logits = {
        "linear_probe": linear_probe_logits(head_checkpoint, FEATURES_DIR),
        "finetuned": finetuned,
    }
    summary, details, predictions = {}, {"classes": classes}, {}
    for name, (scores, labels) in logits.items():
        probabilities = torch.softmax(scores.double(), dim=1)
        confidence, predicted = probabilities.max(dim=1)
        actual, predicted = labels.numpy(), predicted.numpy()
        predictions[name] = (actual, predicted)
        reliability = calibration(confidence.numpy(), predicted == actual)
        summary[name] = {**summary_metrics(actual, predicted), "ece": reliability["ece"]}
        details[name] = {**per_class_metrics(actual, predicted, classes), "calibration": reliability}
    comparison = paired_comparison(*same_examples(predictions["linear_probe"], predictions["finetuned"]))
    for name, (actual, predicted) in predictions.items():
        write_text(PLOTS_DIR / f"confusion_{name}.csv", confusion_csv(actual, predicted, classes))
    sources = split_sources(PREPARED_DIR, "test")
    write_text(PREDICTIONS_FILE, predictions_csv(*finetuned, sources, classes))
    write_json(METRICS_DIR / "test.json", {**summary, "finetuned_vs_probe": comparison})
    write_json(METRICS_DIR / "per_class.json", details)
    for name, scores in summary.items():
        print(
            f"evaluate: {name}: test accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}, "
            f"ECE {scores['ece']:.4f}"
        )
    print(
        f"evaluate: of {comparison['examples']} test examples only the fine-tuned model gets "
        f"{comparison['only_finetuned_right']} right, only the probe {comparison['only_probe_right']} "
        f"(exact McNemar {p_text(comparison['p_value'])})"
    )


if __name__ == "__main__":
    run_stage(main, "evaluate", distributed=True)
