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


# --- finetune.epochs and finetune.batch_size: auto, a schedule sized to the training set ---

IMAGES = modalities.get("images").AUTO_SCHEDULE
TEXTS = modalities.get("text").AUTO_SCHEDULE


@pytest.mark.parametrize(
    ("examples", "epochs", "batch", "steps"),
    [
        (100, 36, 16, 252),  # tiny: the smallest batch, and epochs until the minimum of steps
        (400, 10, 16, 250),  # small: 25 steps an epoch at 16, 10 epochs to 250 steps
        (600, 14, 32, 266),  # halved once: 19 steps an epoch at 32
        (50_000, 8, 64, 6256),  # large: the rule's 8 epochs at its largest batch
    ],
)
def test_auto_sizes_the_photo_schedule_to_the_training_set(examples, epochs, batch, steps):
    schedule = recipe.resolved_schedule("auto", "auto", IMAGES, examples)
    assert (schedule.epochs, schedule.batch_size, schedule.steps) == (epochs, batch, steps)
    assert schedule.steps >= IMAGES.min_steps
    assert f"batch {batch} (auto)" in schedule.reason and f"{epochs} epochs (auto)" in schedule.reason
    if epochs > IMAGES.epochs:  # the cost of the extra epochs, and the cheaper setting, said
        assert (
            f"{epochs / IMAGES.epochs:.1f}x the time of finetune.epochs: {IMAGES.epochs}" in schedule.reason
        )


def test_texts_get_berts_recipe_whatever_the_size():
    for examples in (100, 1_700, 100_000):
        schedule = recipe.resolved_schedule("auto", "auto", TEXTS, examples)
        assert (schedule.epochs, schedule.batch_size) == (3, 32)


def test_an_explicit_epochs_or_batch_size_overrides_the_rule():
    schedule = recipe.resolved_schedule(4, "auto", IMAGES, 400)
    assert (schedule.epochs, schedule.batch_size, schedule.steps) == (4, 16, 100)
    assert schedule.reason.endswith("4 epochs as set")
    schedule = recipe.resolved_schedule("auto", 64, IMAGES, 400)  # 7 steps an epoch: epochs grow
    assert (schedule.epochs, schedule.batch_size, schedule.steps) == (36, 64, 252)
    assert recipe.resolved_schedule(8, 64, IMAGES, 400).steps == 56


def test_the_auto_batch_splits_evenly_over_the_processes():
    schedule = recipe.resolved_schedule("auto", "auto", IMAGES, 400, world_size=3)
    assert schedule.batch_size == 18 and schedule.batch_size % 3 == 0
    assert recipe.smallest_auto_batch(IMAGES, 8) == 16


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "lots", "finetune.epochs: expected 'auto' or a number of passes over the training set"),
        ("epochs", 0, "finetune.epochs: expected 'auto' or a number of passes over the training set"),
        ("batch_size", "max", "finetune.batch_size: expected 'auto' or a number of examples a step"),
        ("batch_size", -16, "finetune.batch_size: expected 'auto' or a number of examples a step"),
    ],
)
def test_an_invalid_schedule_value_names_the_key_and_what_is_allowed(tmp_path, key, value, message):
    params = default_params()
    params["finetune"][key] = value
    with pytest.raises(ParamsError, match=message):
        load_params(write(tmp_path, params), check_models=False)


def test_with_auto_epochs_the_warmup_must_fit_the_fewest_epochs_the_rule_gives(tmp_path):
    params = default_params()
    params["finetune"].update(epochs="auto", warmup_epochs=IMAGES.epochs)
    with pytest.raises(ParamsError, match=f"finetune.warmup_epochs: {IMAGES.epochs} leaves no epoch"):
        load_params(write(tmp_path, params), check_models=False)
    params["finetune"].update(warmup_epochs=1, ema_epochs=IMAGES.epochs + 1)
    with pytest.raises(ParamsError, match=r"finetune\.ema_epochs: 9 averages"):
        load_params(write(tmp_path, params), check_models=False)


def test_the_images_guide_quotes_the_log_line_as_the_code_writes_it():
    from tests.conftest import ROOT

    schedule = recipe.resolved_schedule("auto", "auto", IMAGES, 400)
    guide = " ".join((ROOT / "docs/guides/images.md").read_text().split())
    assert f"`finetune: {schedule.steps} optimizer steps ({schedule.reason})`" in guide
