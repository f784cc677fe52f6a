"""What `auto` resolves to in the finetune recipe, and the combinations params refuse."""

from __future__ import annotations

import pytest
import yaml

from pipeline import modalities
from pipeline.core import recipe
from pipeline.core.params import ParamsError
from pipeline.modalities import load_params
from tests.conftest import default_params, tiny_text_params


def auto_augment(dataset: str) -> str:
    """What the modality of ``dataset`` has ``finetune.augment: auto`` pick."""
    (modality,) = [
        modalities.get(name) for name in modalities.names() if dataset in modalities.get(name).DATASETS
    ]
    return modality.auto_augment(dataset)


@pytest.mark.parametrize(
    ("dataset", "weights", "augment", "bn"),
    [
        ("digits", "pretrain", "jitter", "train"),
        ("imagefolder", "IMAGENET1K_V1", "photo", "frozen"),
        ("cifar10", "data/weights/mine.pt", "photo", "frozen"),
        ("imagefolder", "none", "photo", "train"),
        ("imagefolder", "pretrain", "photo", "train"),
        ("text", "pretrain", "none", "train"),
    ],
)
def test_auto_resolves_from_the_data_and_the_backbone(dataset, weights, augment, bn):
    config = {"augment": "auto", "bn": "auto", "mix": "none"}
    assert recipe.resolved(config, auto_augment(dataset), weights) == {
        "augment": augment,
        "bn": bn,
        "mix": "none",
    }
    chosen = {"augment": "strong", "bn": "train", "mix": "cutmix"}
    assert recipe.resolved(chosen, auto_augment(dataset), weights) == chosen  # what is named is used


def test_photos_never_get_the_digit_jitter_by_default():
    """The default a user pointing the pipeline at photos gets: crops and flips, not the
    affine jitter chosen for digits."""
    from torchvision.transforms import v2

    from pipeline.modalities.images.data import image_transform

    finetune = default_params()["finetune"]
    for dataset in ("imagefolder", "cifar10", "cifar100"):
        policy = recipe.resolved(finetune, auto_augment(dataset), "IMAGENET1K_V1")["augment"]
        kinds = {type(step) for step in image_transform(96, [0.5] * 3, [0.5] * 3, policy).transforms}
        assert v2.RandomResizedCrop in kinds and v2.RandomHorizontalFlip in kinds
        assert v2.RandomAffine not in kinds
    assert recipe.resolved(finetune, auto_augment("digits"), "pretrain")["augment"] == "jitter"


def write(tmp_path, params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "augment",
            "jitter",
            "finetune.augment: 'jitter' transforms images, and data.modality is text; choose auto or none",
        ),
        ("mix", "mixup", "finetune.mix: 'mixup' transforms images, and data.modality is text; choose none"),
    ],
)
def test_image_recipes_are_refused_for_texts_before_any_work(tmp_path, monkeypatch, key, value, message):
    monkeypatch.chdir(tmp_path)
    params = tiny_text_params()
    (tmp_path / "data/raw/texts").mkdir(parents=True)
    params["backbone"]["arch"] = "sentence-transformers/all-MiniLM-L6-v2"
    params["finetune"][key] = value
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params), check_models=False)
    assert message in str(error.value)


def test_true_and_false_read_as_auto_and_none(tmp_path):
    params = default_params()
    for given, read in ((True, "auto"), (False, "none")):
        params["finetune"]["augment"] = given
        assert load_params(write(tmp_path, params), check_models=False)["finetune"]["augment"] == read
