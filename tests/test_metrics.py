import numpy as np
import pytest

from pipeline.metrics import per_class_metrics, summary_metrics


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
