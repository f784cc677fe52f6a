"""Classification metrics with scikit-learn, in the JSON shapes the pipeline writes."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def summary_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1, rounded for stable, readable diffs."""
    return {
        "accuracy": round(float(accuracy_score(actual, predicted)), 6),
        "macro_f1": round(float(f1_score(actual, predicted, average="macro", zero_division=0)), 6),
    }


def per_class_metrics(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support of each class, and the confusion matrix."""
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=labels, zero_division=0
    )
    return {
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(actual, predicted, labels=labels).tolist(),
    }
