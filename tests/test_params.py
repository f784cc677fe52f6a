from pathlib import Path

import pytest
import yaml

from pipeline.core.params import ParamsError, validate
from pipeline.modalities import load_params
from tests.conftest import ROOT, default_params


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params["backbone"]["weights"] == "pretrain"
    assert params["data"]["dataset"] == "digits"


def test_lr_as_dvc_writes_it_is_read_as_a_number(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("lr: 0.001 ", "lr: 1e-05 ", 1))
    assert yaml.safe_load(path.read_text())["lr"] == "1e-05"  # what PyYAML alone gives
    assert load_params(path)["lr"] == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (None, "lr", "fast", "lr: expected a number, got 'fast'"),
        ("data", "num_workers", -1, "data.num_workers: expected 'auto' or a number of worker processes"),
        (
            "data",
            "num_workers",
            100000,
            "data.num_workers: 100,000 worker processes, over the most allowed, 64",
        ),
        (None, "lr", -0.1, "lr: must be greater than 0"),
        (None, "lr", 0, "lr: must be greater than 0"),
        (None, "lr", True, "lr: expected a number"),
        (None, "lr", ".nan", "lr: expected a number"),
        (None, "deterministic", "fast", "deterministic: expected true or false"),
        (
            "data",
            "dataset",
            "mnist",
            "data.dataset: 'mnist' is not a dataset of data.modality images; the images datasets are: digits",
        ),
        (
            "data",
            "modality",
            "audio",
            "data.modality: 'audio' is not a modality; choose one of: images, text",
        ),
        (
            "backbone",
            "arch",
            "resnet19",
            "backbone.arch: unknown architecture 'resnet19' (did you mean 'resnet18'?)",
        ),
        ("backbone", "weights", "imagenet", "backbone.weights: 'imagenet' is neither"),
        ("head", "type", "svm", "head.type: unknown value 'svm'; choose one of: linear, mlp"),
        ("head", "max_epochs", 2.5, "head.max_epochs: expected a whole number"),
        ("finetune", "unfreeze", "some", "finetune.unfreeze: expected 'all' or a number"),
        (
            "finetune",
            "augment",
            "yes",
            "finetune.augment: unknown value 'yes'; choose one of: auto, none, jitter",
        ),
        ("finetune", "bn", "eval", "finetune.bn: unknown value 'eval'; choose one of: auto, train, frozen"),
        (
            "finetune",
            "bn",
            "frozn",
            "finetune.bn: unknown value 'frozn' (did you mean 'frozen'?); choose one of",
        ),
        (
            "finetune",
            "mix",
            "blend",
            "finetune.mix: unknown value 'blend'; choose one of: none, mixup, cutmix",
        ),
        ("finetune", "layer_decay", 1.5, "finetune.layer_decay: must be above 0 and at most 1 (1 is off)"),
        ("finetune", "ema_epochs", -1, "finetune.ema_epochs: must be 0 or more, got -1"),
        ("finetune", "interpolate", 0, "finetune.interpolate: must be above 0 and at most 1 (1 is off)"),
        (
            "finetune",
            "augment",
            "photo",
            "finetune.augment: 'photo' flips images left to right, which changes",
        ),
        ("finetune", "augment", "strong", "choose one of: auto, none, jitter"),
        ("data", "val_fraction", 1.5, "data.val_fraction: must be between 0 and 1"),
        (None, "seed", 2**32, "seed: must be below 2**32 (4294967296), got 4294967296"),
        ("head", "dropout", 1.0, "head.dropout: must be at least 0 and below 1, got 1.0"),
        ("finetune", "label_smoothing", 1.0, "finetune.label_smoothing: must be at least 0 and below 1"),
        ("finetune", "warmup_epochs", 8, "finetune.warmup_epochs: 8 leaves no epoch for the cosine decay"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, section, key, value, message):
    params = default_params()
    (params[section] if section else params)[key] = value
    with pytest.raises(ParamsError, match=r"params\.yaml: ") as error:
        load_params(write(tmp_path, params))
    assert message in str(error.value)


def test_unknown_key_is_named_with_the_allowed_ones(tmp_path):
    params = default_params()
    params["head"]["epochz"] = 5
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params))
    assert (
        "head.epochz: unknown key (did you mean 'max_epochs'?); allowed keys in head: type, hidden_units"
        in str(error.value)
    )


def test_unknown_top_level_key(tmp_path):
    params = default_params()
    params["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match=r"learning_rate: unknown key; allowed keys in the top level"):
        load_params(write(tmp_path, params))


def test_missing_key_is_named(tmp_path):
    params = default_params()
    del params["finetune"]["epochs"]
    with pytest.raises(ParamsError, match=r"finetune\.epochs: missing"):
        load_params(write(tmp_path, params))


def test_fractions_must_leave_training_images(tmp_path):
    params = default_params()
    params["data"].update(val_fraction=0.5, test_fraction=0.45)
    with pytest.raises(ParamsError, match=r"at least 10% of the images for training"):
        load_params(write(tmp_path, params))


def test_interpolating_toward_a_random_head_is_refused(tmp_path):
    params = default_params()
    params["finetune"].update(interpolate=0.5, head_init="fresh")
    with pytest.raises(
        ParamsError, match=r"finetune\.interpolate: 0\.5 blends .*finetune\.head_init: fresh; use head_init"
    ):
        load_params(write(tmp_path, params))
    params["finetune"]["head_init"] = "probe"
    assert load_params(write(tmp_path, params))["finetune"]["interpolate"] == 0.5


def test_not_yaml_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_weights_accepts_torchvision_names_and_existing_files(tmp_path):
    checkpoint = tmp_path / "backbone.pth"
    checkpoint.write_bytes(b"")
    for weights in ("IMAGENET1K_V1", "DEFAULT", "none", "pretrain", str(checkpoint)):
        params = default_params()
        params["backbone"]["weights"] = weights
        assert validate(params)["backbone"]["weights"] == weights


def test_unfreeze_takes_all_or_a_count():
    params = default_params()
    params["finetune"]["unfreeze"] = 2
    assert validate(params)["finetune"]["unfreeze"] == 2


def test_image_data_must_live_under_data_raw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = default_params()
    params["data"].update(dataset="imagefolder", path="photos")
    with pytest.raises(ParamsError, match=r"data.path: 'photos' must be a folder under data/raw/"):
        load_params(write(tmp_path, params))
    params["data"]["path"] = "data/raw/photos"
    with pytest.raises(ParamsError, match=r"data.path: 'data/raw/photos' is not a folder"):
        load_params(write(tmp_path, params))
    (tmp_path / "data" / "raw" / "photos").mkdir(parents=True)
    assert load_params(write(tmp_path, params))["data"]["dataset"] == "imagefolder"
    params["data"].update(dataset="cifar10", path="data/raw/cifar10")  # torchvision may download it there
    assert load_params(write(tmp_path, params))["data"]["path"] == "data/raw/cifar10"


@pytest.mark.parametrize(
    ("arch", "weights", "suggested"),
    [
        ("resnet18", "IMAGENET1K_V3", "IMAGENET1K_V1"),
        ("efficientnet_lite0", "IMAGENET1K_V2", "IMAGENET1K_V1"),
    ],
)
def test_misspelt_weights_name_fails_the_params_check(tmp_path, arch, weights, suggested):
    params = default_params()
    params["backbone"].update(arch=arch, weights=weights)
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params))
    message = str(error.value)
    assert f"backbone.weights: {weights!r} is not a weights name of {arch}" in message
    assert suggested in message and "DEFAULT" in message


@pytest.mark.parametrize(
    ("value", "read"),
    [("auto", "auto"), ("bfloat16", "bfloat16"), ("off", "off"), (True, "auto"), (False, "off")],
)
def test_amp_takes_a_mode_or_true_and_false(value, read):
    params = default_params()
    params["amp"] = value
    assert validate(params)["amp"] == read


def test_amp_names_its_modes_when_wrong(tmp_path):
    params = default_params()
    params["amp"] = "fp8"
    with pytest.raises(
        ParamsError, match="amp: unknown value 'fp8'; choose one of: auto, bfloat16, float16, off"
    ):
        load_params(write(tmp_path, params))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("nproc_per_node", 0, "distributed.nproc_per_node: expected 'auto' or a number of processes"),
        ("nproc_per_node", "all", "distributed.nproc_per_node: expected 'auto' or a number of processes"),
        ("node_rank", -1, "distributed.node_rank: expected 'auto' or a rank"),
        ("rdzv_endpoint", "head", "distributed.rdzv_endpoint: expected auto or host:port"),
        ("rdzv_endpoint", "head:99999", "distributed.rdzv_endpoint: expected auto or host:port"),
        ("backend", "mpi", "distributed.backend: unknown value 'mpi'; choose one of: auto, nccl, gloo"),
    ],
)
def test_distributed_values_name_the_key_and_what_is_allowed(tmp_path, key, value, message):
    params = default_params()
    params["distributed"][key] = value
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params))
    assert message in str(error.value)


def test_a_node_rank_must_be_below_the_number_of_nodes(tmp_path):
    params = default_params()
    params["distributed"].update(nnodes=2, node_rank=2)
    with pytest.raises(
        ParamsError, match=r"distributed\.node_rank: 2 is not below distributed\.nnodes \(2\)"
    ):
        load_params(write(tmp_path, params))
    params["distributed"].update(node_rank=1, nproc_per_node="auto", rdzv_endpoint="node001:29400")
    assert load_params(write(tmp_path, params))["distributed"]["rdzv_endpoint"] == "node001:29400"


@pytest.mark.parametrize(
    ("arch", "size", "problem", "larger"),
    [
        ("vit_b_16", 30, "Input shape indivisible by patch size!", 32),
        ("inception_v3", 60, "Kernel size can't be greater than actual input size", 75),
        ("alexnet", 16, "Output size is too small", 63),
    ],
)
def test_an_image_size_the_architecture_cannot_take_fails_the_params_check(
    tmp_path, arch, size, problem, larger
):
    """A size each family refuses in its own way fails before any stage builds the model,
    naming the next size up that it takes (which then passes)."""
    params = default_params()
    params["backbone"].update(arch=arch, image_size=size)
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params))
    message = str(error.value)
    assert f"backbone.image_size: {arch} cannot take {size}-pixel images (" in message and problem in message
    assert message.endswith(f"the next size up that it takes is {larger}")
    params["backbone"]["image_size"] = larger
    assert load_params(write(tmp_path, params))["backbone"]["image_size"] == larger


def test_a_local_checkpoint_must_live_under_data_weights(tmp_path, monkeypatch):
    """The backbone stage depends on data/weights/, so a checkpoint elsewhere (whose bytes DVC
    would not watch) is refused, saying where to put it."""
    monkeypatch.chdir(tmp_path)
    params = default_params()
    elsewhere = tmp_path / "resnet18.pt"
    elsewhere.write_bytes(b"")
    params["backbone"]["weights"] = str(elsewhere)
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, params))
    assert f"backbone.weights: {str(elsewhere)!r} must be a file under data/weights/" in str(error.value)
    assert "backbone.weights: data/weights/resnet18.pt" in str(error.value)
    (tmp_path / "data" / "weights").mkdir(parents=True)
    (tmp_path / "data" / "weights" / "resnet18.pt").write_bytes(b"")
    params["backbone"]["weights"] = "data/weights/resnet18.pt"
    assert load_params(write(tmp_path, params))["backbone"]["weights"] == "data/weights/resnet18.pt"


def test_every_selection_params_allows_has_a_rule_in_training_and_no_more():
    """params.py names finetune.select's choices without importing torch; training.py holds
    the rules: the two must list the same names."""
    from pipeline.core import params
    from pipeline.core.selection import SELECTIONS

    assert set(params.SELECTIONS) == set(SELECTIONS)


def test_paths_that_climb_out_of_data_raw_or_data_weights_are_refused(tmp_path, monkeypatch):
    """`..` is resolved before the check: data/raw/../../pipeline lies outside what DVC
    watches, so the run-cache could restore outputs made from other bytes."""
    monkeypatch.chdir(tmp_path)
    for folder in ("data/raw/photos/cat", "pipeline", "data/weights"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    params = default_params()
    params["data"].update(dataset="imagefolder", path="data/raw/../../pipeline")
    with pytest.raises(
        ParamsError, match=r"data.path: 'data/raw/../../pipeline' must be a folder under data/raw/"
    ):
        load_params(write(tmp_path, params))
    params["data"]["path"] = "data/raw/./photos/../photos"
    assert load_params(write(tmp_path, params))["data"]["path"] == "data/raw/./photos/../photos"
    params["backbone"]["weights"] = "data/weights/../../pyproject.toml"
    with pytest.raises(
        ParamsError, match=r"backbone.weights: 'data/weights/../../pyproject.toml' must be a file under"
    ):
        load_params(write(tmp_path, params))


def test_unknown_keys_of_mixed_types_are_named_not_a_crash(tmp_path):
    text = (ROOT / "params.yaml").read_text() + "1: one\nzzz: two\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(
        ParamsError, match=r"params.yaml: 1: unknown key; allowed keys in the top level: seed"
    ):
        load_params(path)


def test_a_timeout_beyond_a_week_is_refused_before_timedelta_overflows(tmp_path):
    params = default_params()
    params["distributed"]["timeout_s"] = 10**14
    with pytest.raises(
        ParamsError,
        match=r"distributed.timeout_s: 100,000,000,000,000 seconds, over the most allowed, 604,800",
    ):
        load_params(write(tmp_path, params))


@pytest.mark.parametrize("ema", [2, 1e308])
def test_a_weight_average_longer_than_the_training_is_refused(tmp_path, ema):
    params = default_params()
    params["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=ema)
    with pytest.raises(ParamsError, match=r"finetune.ema_epochs: .* use at most 1 \(0: no average\)"):
        load_params(write(tmp_path, params))
    params["finetune"]["ema_epochs"] = 1
    assert load_params(write(tmp_path, params))["finetune"]["ema_epochs"] == 1


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"finetune": {"batch_size": 1, "bn": "train"}}, "finetune.batch_size"),
        (
            {
                "finetune": {"batch_size": 2},
                "backbone": {"weights": "none"},
                "distributed": {"max_batch_per_process": 1},
            },
            "finetune.batch_size",
        ),
        ({"backbone": {"pretrain_batch_size": 1}}, "backbone.pretrain_batch_size"),
        (  # auto: held to the smallest batch the rule can pick
            {
                "finetune": {"batch_size": "auto"},
                "backbone": {"weights": "none"},
                "distributed": {"max_batch_per_process": 1},
            },
            "finetune.batch_size",
        ),
    ],
)
def test_steps_of_one_image_where_batchnorm_trains_on_1x1_maps_are_refused(tmp_path, changes, key):
    """resnet18 at 32 px: its last block's maps are 1x1, so BatchNorm in training mode needs
    2 images a step; 64 px (2x2 maps), or BatchNorm frozen, takes 1."""
    params = default_params()
    params["backbone"].update(arch="resnet18", image_size=32)
    for section, values in changes.items():
        params[section].update(values)
    with pytest.raises(ParamsError, match=rf"{key}: .* make steps of 1 image, and BatchNorm trains"):
        load_params(write(tmp_path, params))
    params["backbone"]["image_size"] = 64
    load_params(write(tmp_path, params))
    if key.startswith("finetune"):
        params["backbone"]["image_size"] = 32
        params["finetune"]["bn"] = "frozen"
        load_params(write(tmp_path, params))
