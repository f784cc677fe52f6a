"""Classification metrics with scikit-learn, in the JSON shapes the pipeline writes."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest
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


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins (Guo et al., 2017).

    Predictions fall into ``bins`` equal-width bins of their confidence (the predicted
    class's probability), right edges inclusive; ECE is the share-weighted mean gap between
    each bin's accuracy and its mean confidence. Empty bins have ``count`` 0 and no means.
    """
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(confidence, edges[1:-1], right=True)
    rows, ece = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        row: dict[str, Any] = {"lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6)}
        row["count"] = count
        if count:
            row["confidence"] = round(float(confidence[members].mean()), 6)
            row["accuracy"] = round(float(correct[members].mean()), 6)
            ece += count / len(confidence) * abs(correct[members].mean() - confidence[members].mean())
        rows.append(row)
    return {"ece": round(float(ece), 6), "bins": rows}


def exact_mcnemar(only_first: int, only_second: int) -> float:
    """The exact McNemar test's two-sided p-value for two models scored on the same
    examples, given how many only the first gets right and how many only the second (a
    binomial test on those two counts, scipy's binomtest): the chance of a split at least
    this uneven if the two models were equally good. 1 when they never disagree."""
    disagreements = only_first + only_second
    return round(float(binomtest(only_first, disagreements).pvalue), 6) if disagreements else 1.0


def p_text(p_value: float) -> str:
    """A p-value as papers give it: two significant digits, under 0.001 as a bound (the
    metrics keep six decimals)."""
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.2g}"


def mcnemar_verdict(p_value: float, if_real: str, items: str) -> str:
    """What an exact McNemar p-value says of two models, as the end of a sentence: under
    0.05, that a split this uneven is unlikely between equally good models, then
    ``if_real`` (which model is better); otherwise how often chance gives such a split, and
    that the test split (of ``items``: images, texts, examples) cannot tell them apart."""
    if p_value < 0.05:
        return f"a split this uneven is unlikely from two equally good models: {if_real}."
    return (
        f"a split at least this uneven comes {p_value:.0%} of the time from two equally good models, "
        f"so this test split cannot tell them apart (more test {items}, or more seeds, can)."
    )


def only_right(actual: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[int, int]:
    """Of the examples two models predicted, how many only ``first`` gets right and how many
    only ``second``: the two counts a paired test of the models rests on."""
    actual = np.asarray(actual)
    first_right, second_right = np.asarray(first) == actual, np.asarray(second) == actual
    return int(np.sum(first_right & ~second_right)), int(np.sum(second_right & ~first_right))


def paired_comparison(actual: np.ndarray, probe: np.ndarray, finetuned: np.ndarray) -> dict[str, Any]:
    """The two models on the same examples: how many only the fine-tuned model gets right,
    how many only the probe, and the exact McNemar p-value on those two counts. Examples
    both get right or both get wrong say nothing about which is better; with few left, a
    gap of a point can be chance."""
    only_finetuned, only_probe = only_right(actual, finetuned, probe)
    return {
        "examples": len(actual),
        "only_finetuned_right": only_finetuned,
        "only_probe_right": only_probe,
        "p_value": exact_mcnemar(only_finetuned, only_probe),
    }


def probe_comparison_note(comparison: dict[str, Any], items: str) -> str:
    """Whether the test split can tell the fine-tuned model from the probe: the examples
    only one of them gets right, and the exact McNemar test on them."""
    tuned, probe = comparison["only_finetuned_right"], comparison["only_probe_right"]
    if not tuned + probe:
        return (
            f"The fine-tuned model and the linear probe get the same test {items} right: this test "
            "split cannot tell them apart."
        )
    p_value = comparison["p_value"]
    better = "fine-tuned model" if tuned > probe else "linear probe"
    return (
        f"Of the {comparison['examples']:,} test {items}, the fine-tuned model gets {tuned} right that the "
        f"linear probe gets wrong, and the probe {probe} that the fine-tuned model gets wrong; the rest "
        f"both get right or both get wrong. Exact McNemar test on those {tuned + probe}: {p_text(p_value)}, "
        + mcnemar_verdict(p_value, f"the {better} is better here", items)
    )


def highest_losses(losses: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` largest losses, largest first (ties: the earlier image)."""
    order = np.argsort(-np.asarray(losses, dtype=np.float64), kind="stable")
    return order[:count]


def most_confused_pairs(matrix: list[list[int]], classes: list[str], count: int = 5) -> list[dict[str, Any]]:
    """The class pairs (a, b) with the most mistakes between them, either way, most first;
    pairs with none are left out. ``matrix[i][j]`` counts images of class i predicted as j."""
    matrix = np.asarray(matrix)
    pairs = [
        {
            "a": classes[i],
            "b": classes[j],
            "a_as_b": int(matrix[i, j]),
            "b_as_a": int(matrix[j, i]),
            "total": int(matrix[i, j] + matrix[j, i]),
        }
        for i in range(len(classes))
        for j in range(i + 1, len(classes))
        if matrix[i, j] + matrix[j, i]
    ]
    return sorted(pairs, key=lambda pair: -pair["total"])[:count]
