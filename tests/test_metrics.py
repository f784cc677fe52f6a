import numpy as np
import pytest

from pipeline.core.metrics import (
    calibration,
    highest_losses,
    most_confused_pairs,
    paired_comparison,
    per_class_metrics,
    probe_comparison_note,
    summary_metrics,
)


def test_metrics_match_hand_counts():
    actual = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    summary = summary_metrics(actual, predicted)
    assert summary["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    details = per_class_metrics(actual, predicted, ["a", "b", "c"])
    assert details["per_class"]["b"] == {
        "precision": pytest.approx(2 / 3, abs=1e-6),
        "recall": 1.0,
        "f1": 0.8,
        "support": 2,
    }
    assert details["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    f1s = [details["per_class"][c]["f1"] for c in "abc"]
    assert summary["macro_f1"] == pytest.approx(np.mean(f1s), abs=1e-5)


def test_expected_calibration_error_of_a_handcrafted_case():
    """Four predictions at 0.95, all right (gap 0.05); six at 0.55, three right (gap 0.05):
    ECE = 0.4 * 0.05 + 0.6 * 0.05 = 0.05. The same confidences, every one right: the gaps
    are 0.05 and 0.45, ECE = 0.4 * 0.05 + 0.6 * 0.45 = 0.29."""
    confidence = np.array([0.95] * 4 + [0.55] * 6)
    correct = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    result = calibration(confidence, correct, bins=10)
    assert result["ece"] == pytest.approx(0.05, abs=1e-6)
    filled = {row["lower"]: row for row in result["bins"] if row["count"]}
    assert filled == {
        0.5: {"lower": 0.5, "upper": 0.6, "count": 6, "confidence": 0.55, "accuracy": 0.5},
        0.9: {"lower": 0.9, "upper": 1.0, "count": 4, "confidence": 0.95, "accuracy": 1.0},
    }
    assert calibration(confidence, np.ones(10, dtype=bool), bins=10)["ece"] == pytest.approx(0.29, abs=1e-6)
    assert calibration(np.array([0.9] * 10), np.arange(10) < 9)["ece"] == pytest.approx(0.0, abs=1e-9)


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    result = calibration(np.array([0.5, 1.0]), np.array([True, True]), bins=2)
    assert [row["count"] for row in result["bins"]] == [1, 1]


def test_highest_losses_come_largest_first_and_ties_keep_the_earlier_image():
    losses = np.array([0.1, 2.5, 0.3, 2.5, 7.0, 0.0])
    assert highest_losses(losses, 3).tolist() == [4, 1, 3]
    assert highest_losses(losses, 10).tolist() == [4, 1, 3, 2, 0, 5]


def test_most_confused_pairs_add_both_directions_and_name_the_classes():
    matrix = [[5, 1, 0], [4, 6, 2], [0, 2, 9]]  # row: true class, column: predicted
    pairs = most_confused_pairs(matrix, ["cat", "dog", "fox"])
    assert pairs == [
        {"a": "cat", "b": "dog", "a_as_b": 1, "b_as_a": 4, "total": 5},
        {"a": "dog", "b": "fox", "a_as_b": 2, "b_as_a": 2, "total": 4},
    ]
    assert most_confused_pairs(matrix, ["cat", "dog", "fox"], count=1) == pairs[:1]


def test_paired_comparison_counts_the_examples_only_one_model_gets_right_and_tests_them():
    actual = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probe = np.array([0, 1, 2, 1, 1, 0, 0, 0])  # wrong on 3, 5, 7
    finetuned = np.array([0, 2, 2, 0, 1, 2, 0, 0])  # wrong on 1, 7
    comparison = paired_comparison(actual, probe, finetuned)
    assert comparison == {"examples": 8, "only_finetuned_right": 2, "only_probe_right": 1, "p_value": 1.0}
    ten_to_none = paired_comparison(np.zeros(10), np.ones(10), np.zeros(10))
    assert ten_to_none["p_value"] == pytest.approx(2 / 2**10, abs=1e-6)  # exact two-sided binomial
    one_to_three = paired_comparison(np.zeros(4), np.array([0, 0, 0, 1]), np.array([1, 1, 1, 0]))
    assert one_to_three["p_value"] == pytest.approx(0.625)
    assert paired_comparison(actual, probe, probe)["p_value"] == 1.0  # no disagreement at all


def test_the_comparison_note_says_whether_the_test_split_tells_the_models_apart():
    within = probe_comparison_note(
        {"examples": 450, "only_finetuned_right": 1, "only_probe_right": 3, "p_value": 0.625}, "images"
    )
    assert within.startswith(
        "Of the 450 test images, the fine-tuned model gets 1 right that the linear probe"
    )
    assert "p = 0.62, a split at least this uneven comes 62% of the time" in within
    assert "cannot tell them apart" in within
    clear = probe_comparison_note(
        {"examples": 1000, "only_finetuned_right": 90, "only_probe_right": 10, "p_value": 0.0}, "images"
    )
    assert "Exact McNemar test on those 100: p < 0.001, a split this uneven" in clear
    assert clear.endswith("unlikely from two equally good models: the fine-tuned model is better here.")
    probe = probe_comparison_note(
        {"examples": 1000, "only_finetuned_right": 2, "only_probe_right": 20, "p_value": 1e-4}, "texts"
    )
    assert probe.endswith("the linear probe is better here.")
    same = probe_comparison_note(
        {"examples": 50, "only_finetuned_right": 0, "only_probe_right": 0, "p_value": 1.0}, "images"
    )
    assert same.startswith("The fine-tuned model and the linear probe get the same test images right")
