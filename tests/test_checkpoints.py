"""The files stages hand each other: each read through one function that refuses a file
of another layout with a message naming what is missing and the stage that remakes it."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline import checkpoints
from pipeline.errors import StageError


@pytest.mark.parametrize(
    ("reader", "stage", "complete"),
    [
        (checkpoints.read_backbone, "backbone", checkpoints.BackboneCheckpoint),
        (checkpoints.read_head, "train_head", checkpoints.HeadCheckpoint),
    ],
)
def test_a_checkpoint_missing_keys_is_refused_naming_them(tmp_path, reader, stage, complete):
    path = tmp_path / "file.pt"
    keys = sorted(complete.__required_keys__)
    torch.save({key: 0 for key in keys[1:]}, path)  # the first key missing
    with pytest.raises(StageError) as error:
        reader(path)
    assert str(error.value) == (
        f"{path}: not a {complete.__name__} this pipeline wrote (missing {keys[0]}); "
        f"rerun the stage that writes it: dvc repro {stage}"
    )
    torch.save({key: 0 for key in keys}, path)
    assert set(reader(path)) == set(keys)


def test_features_are_read_by_split_and_checked(tmp_path):
    torch.save({"features": torch.zeros(2, 3), "labels": torch.zeros(2)}, tmp_path / "val.pt")
    with pytest.raises(
        StageError, match=re.escape("val.pt: not a Features this pipeline wrote (missing classes)")
    ):
        checkpoints.read_features("val", tmp_path)
    with pytest.raises(StageError, match=r"test\.pt: not found; run the stage that writes it first"):
        checkpoints.read_features("test", tmp_path)


def test_a_head_checkpoint_keeps_the_head_s_shape_from_params():
    config = {"type": "mlp", "hidden_units": 16, "dropout": 0.1, "lr": 1.0}
    head = checkpoints.head_checkpoint({"w": torch.ones(1)}, config, 8, ["a", "b"])
    assert set(head) == checkpoints.HeadCheckpoint.__required_keys__
    assert (head["type"], head["in_features"], head["hidden_units"], head["dropout"]) == ("mlp", 8, 16, 0.1)


def test_every_format_carries_the_preprocessing_in_one_order():
    assert set(checkpoints.PREPROCESSING_KEYS) == checkpoints.Preprocessing.__required_keys__
    for schema in (checkpoints.BackboneCheckpoint, checkpoints.ClassifierCheckpoint, checkpoints.OnnxSidecar):
        assert checkpoints.Preprocessing.__required_keys__ <= schema.__required_keys__, schema.__name__
    assert "params" not in checkpoints.ClassifierCheckpoint.__required_keys__  # how it trained: optional
