"""evaluate's check that the probe and the fine-tuned model were scored on the same examples."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import StageError
from pipeline.evaluate import same_examples


def test_the_comparison_uses_the_labels_both_models_were_scored_on():
    labels = np.array([0, 1, 2])
    probe, finetuned = np.array([0, 1, 1]), np.array([0, 2, 2])
    assert [a.tolist() for a in same_examples((labels, probe), (labels.copy(), finetuned))] == [
        [0, 1, 2],
        [0, 1, 1],
        [0, 2, 2],
    ]


def test_labels_that_differ_between_the_cached_features_and_the_split_are_an_error():
    with pytest.raises(
        StageError, match=r"data/features/test\.pt and the prepared test split disagree.*rerun extract"
    ):
        same_examples((np.array([0, 1]), np.array([0, 1])), (np.array([1, 0]), np.array([0, 1])))
