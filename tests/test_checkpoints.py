"""The files stages hand each other: each read through one function that refuses a file
of another layout with a message naming what is missing and the stage that remakes it."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.core import checkpoints
from pipeline.core.errors import StageError


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
    complete_file = {key: checkpoints.KEY_TYPES.get(key, int)() for key in keys}
    if "modality" in keys:  # and the modality's own preprocessing
        complete_file |= {key: 0 for key in checkpoints.PREPROCESSING_KEYS["images"]} | {"modality": "images"}
    torch.save(complete_file, path)
    assert set(reader(path)) == set(complete_file)


@pytest.mark.parametrize("modality", ["images", "text"])
def test_a_backbone_missing_its_modality_s_preprocessing_is_refused_naming_it(tmp_path, modality):
    path = tmp_path / "backbone.pt"
    keys = checkpoints.PREPROCESSING_KEYS[modality]
    own = [key for key in keys if key not in checkpoints.Preprocessing.__required_keys__]
    saved = {key: 0 for key in [*keys, "feature_dim"] if key != own[-1]} | {"state_dict": {}}
    torch.save({**saved, "modality": modality}, path)
    with pytest.raises(StageError) as error:
        checkpoints.read_backbone(path)
    assert str(error.value) == (
        f"{path}: not a file this pipeline wrote for {modality!r} (missing {own[-1]}); "
        "rerun the stage that writes it: dvc repro backbone"
    )


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
    shared = tuple(checkpoints.Preprocessing.__annotations__)
    assert shared == ("modality", "arch", "weights")
    for modality, keys in checkpoints.PREPROCESSING_KEYS.items():
        assert keys[: len(shared)] == shared, modality  # the shared keys first, then the modality's
    for schema in (checkpoints.BackboneCheckpoint, checkpoints.ClassifierCheckpoint, checkpoints.OnnxSidecar):
        assert checkpoints.Preprocessing.__required_keys__ <= schema.__required_keys__, schema.__name__
    checkpoint = {"modality": "text", **{key: key for key in checkpoints.PREPROCESSING_KEYS["text"][1:]}}
    assert list(checkpoints.preprocessing_of({"extra": 1, **checkpoint})) == list(checkpoint)
    assert "params" not in checkpoints.ClassifierCheckpoint.__required_keys__  # how it trained: optional


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"classes": "cat,dog"}, "classes holds str, not list"),
        ({"classes": ["cat", 2]}, "classes holds 2, not a name"),
        ({"state_dict": [1, 2]}, "state_dict holds list, not dict"),
    ],
)
def test_a_head_file_of_the_wrong_types_is_refused_naming_the_key(tmp_path, changes, problem):
    config = {"type": "linear", "hidden_units": 16, "dropout": 0.0}
    head = checkpoints.head_checkpoint(torch.nn.Linear(4, 2).state_dict(), config, 4, ["cat", "dog"])
    torch.save({**head, **changes}, tmp_path / "head.pt")
    with pytest.raises(StageError) as error:
        checkpoints.read_head(tmp_path / "head.pt")
    assert str(error.value) == (
        f"{tmp_path / 'head.pt'}: not a HeadCheckpoint this pipeline wrote ({problem}); "
        "rerun the stage that writes it: dvc repro train_head"
    )


def test_weights_that_do_not_fit_the_model_are_one_line_naming_the_file(tmp_path):
    from pipeline.core.models import build_head, load_head

    config = {"type": "linear", "hidden_units": 16, "dropout": 0.0}
    weights = build_head("linear", 5, 2, 16, 0.0).state_dict()  # trained on 5 features, says 4
    head = checkpoints.head_checkpoint(weights, config, 4, ["cat", "dog"])
    torch.save(head, tmp_path / "head.pt")
    with pytest.raises(StageError) as error:
        load_head(checkpoints.read_head(tmp_path / "head.pt"), tmp_path / "head.pt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'head.pt'}: its weights do not fit the model it describes (")
    assert "size mismatch for" in message and message.endswith(
        "rerun the stage that writes it: dvc repro train_head"
    )
    assert "\n" not in message
