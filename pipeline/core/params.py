"""Load and validate params.yaml, the pipeline's only configuration.

Every stage calls :func:`load_params` first, so a bad file fails before any work, with a
message that names the key and what is allowed. The schema below is the one place that
knows every key; params.yaml holds the defaults.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ParamsError
from pipeline.core.recipe import AUGMENTS, BN_MODES, MIXES

PARAMS_FILE = Path("params.yaml")

RAW_DIR = Path("data/raw")
WEIGHTS_DIR = Path("data/weights")  # local backbone checkpoints (backbone.weights: a path)
HEAD_TYPES = ("linear", "mlp")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("auto", "bfloat16", "float16", "off")
BACKENDS = ("auto", "nccl", "gloo")
STRATEGIES = ("full", "adapters")
HEAD_INITS = ("probe", "fresh")
SELECTIONS = ("loss", "accuracy")
OPTIMIZERS = ("adamw", "sgd")
BUILTIN_WEIGHTS = ("pretrain", "none")
TRUNCATION_SIDES = ("right", "left")
PADDINGS = ("dynamic", "max_length")
POOLINGS = ("mean", "cls")


# Numbers as YAML or DVC may write them, quoted or not: 0.001, 1e-05, 3.0E+2.
NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _number(value: Any, key: str) -> float:
    """Read a number, also from the strings DVC writes back (``lr: 1e-05``)."""
    if isinstance(value, bool):
        raise ParamsError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, int | float) or (isinstance(value, str) and NUMBER.fullmatch(value)):
        number = float(value)
    else:
        raise ParamsError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ParamsError(f"{key}: expected a finite number, got {value!r}")
    return number


def positive_float(value: Any, key: str) -> float:
    number = _number(value, key)
    if number <= 0:
        raise ParamsError(f"{key}: must be greater than 0, got {value!r}")
    return number


def non_negative_float(value: Any, key: str) -> float:
    number = _number(value, key)
    if number < 0:
        raise ParamsError(f"{key}: must be 0 or more, got {value!r}")
    return number


def fraction(value: Any, key: str) -> float:
    number = _number(value, key)
    if not 0 < number < 1:
        raise ParamsError(f"{key}: must be between 0 and 1 (exclusive), got {value!r}")
    return number


def below_one(value: Any, key: str) -> float:
    """At least 0 and below 1: momentum, and shares that must leave something (dropout or
    label smoothing of 1 leaves no signal)."""
    number = _number(value, key)
    if not 0 <= number < 1:
        raise ParamsError(f"{key}: must be at least 0 and below 1, got {value!r}")
    return number


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ParamsError(f"{key}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ParamsError(f"{key}: expected a whole number, got {value!r}")


def positive_int(value: Any, key: str) -> int:
    number = _integer(value, key)
    if number <= 0:
        raise ParamsError(f"{key}: must be a whole number greater than 0, got {value!r}")
    return number


def non_negative_int(value: Any, key: str) -> int:
    number = _integer(value, key)
    if number < 0:
        raise ParamsError(f"{key}: must be a whole number, 0 or more, got {value!r}")
    return number


def seed_value(value: Any, key: str) -> int:
    """numpy's generator takes seeds from 0 to 2**32 - 1."""
    number = non_negative_int(value, key)
    if number >= 2**32:
        raise ParamsError(f"{key}: must be below 2**32 (4294967296), got {value!r}")
    return number


def text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParamsError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def optional_text(value: Any, key: str) -> str:
    """A string that may be empty ("": leave the choice to the tool that reads it)."""
    if value is None:
        return ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ParamsError(f'{key}: expected a string ("" for the default), got {value!r}')
    return str(value).strip()


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a mistyped ``value`` (difflib's
    ratio, at least 0.6), or an empty string where none is close: the end of a message
    that then lists every choice."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def text_lines(value: Any, key: str) -> list[str]:
    """A list of one-line strings (shell lines, sbatch options); a single string is a list of one."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
        raise ParamsError(f"{key}: expected a list of strings, one a line, got {value!r}")
    for line in value:
        if "\n" in line:
            raise ParamsError(f"{key}: {line!r} holds a line break; give each line as its own item")
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ParamsError(f"{key}: expected true or false, got {value!r}")
    return value


def one_of(*choices: str) -> Callable[[Any, str], str]:
    def check(value: Any, key: str) -> str:
        if value not in choices:
            hint = did_you_mean(value, choices)
            raise ParamsError(f"{key}: unknown value {value!r}{hint}; choose one of: {', '.join(choices)}")
        return value

    check.choices = choices  # what the params reference lists
    return check


def is_under(path: Path | str, folder: Path) -> bool:
    """Whether ``path`` lies inside ``folder`` once ``..`` and ``.`` are resolved (in the
    text, not through links: DVC may link tracked files into its cache, and those stay
    where they are named). data/raw/../../pipeline is not under data/raw."""
    inside = Path(os.path.normpath(os.path.abspath(path)))
    return Path(os.path.normpath(os.path.abspath(folder))) in inside.parents


def is_weights_file(weights: str) -> bool:
    """Whether ``backbone.weights`` names a local checkpoint rather than a built-in source
    or a torchvision weights name."""
    return weights not in BUILTIN_WEIGHTS and not re.fullmatch(r"[A-Z][A-Z0-9_]*", weights)


def weights_source(value: Any, key: str) -> str:
    """``pretrain``, ``none``, a torchvision weights name, or a local checkpoint path."""
    if not isinstance(value, str) or not value:
        raise ParamsError(f"{key}: expected a string, got {value!r}")
    if not is_weights_file(value) or Path(value).is_file():
        return value
    raise ParamsError(
        f"{key}: {value!r} is neither a torchvision weights name (e.g. IMAGENET1K_V1, DEFAULT), "
        f"nor 'pretrain' (train on the synthetic glyph task), nor 'none' (random init), "
        f"nor an existing checkpoint file"
    )


def amp_mode(value: Any, key: str) -> str:
    """Mixed precision: auto, bfloat16, float16 or off; true and false read as auto and off."""
    if isinstance(value, bool):
        return "auto" if value else "off"
    return one_of(*AMP_MODES)(value, key)


def auto_or_positive_int(value: Any, key: str, what: str) -> str | int:
    """``auto`` (what the code picks: sized to the data, the machine) or a whole number of
    ``what`` above 0."""
    if value == "auto":
        return "auto"
    try:
        return positive_int(value, key)
    except ParamsError:
        raise ParamsError(
            f"{key}: expected 'auto' or a number of {what} (1 or more), got {value!r}"
        ) from None


def process_count(value: Any, key: str) -> str | int:
    """``auto`` or a number of processes."""
    return auto_or_positive_int(value, key, "processes")


MAX_WORKERS = 64
MAX_PIXEL_LIMIT = 1_000_000_000


def at_most(number: int, most: int, key: str, unit: str, why: str) -> int:
    """``number`` where it is at most ``most``; else an error saying ``why`` not more."""
    if number > most:
        raise ParamsError(f"{key}: {number:,} {unit}, over the most allowed, {most:,}: {why}")
    return number


def pixel_limit(value: Any, key: str) -> int:
    """The most pixels an image may have: 1 to MAX_PIXEL_LIMIT (a gigapixel)."""
    why = (
        "one image of that many decodes to 3 GB of memory in each DataLoader worker; shrink such images first"
    )
    return at_most(positive_int(value, key), MAX_PIXEL_LIMIT, key, "pixels", why)


MAX_TIMEOUT_S = 7 * 24 * 3600


def timeout_seconds(value: Any, key: str) -> int:
    """Seconds a process waits for the others: 1 to MAX_TIMEOUT_S (a week)."""
    why = "a week; a process waiting longer for the others is a hung job"
    return at_most(positive_int(value, key), MAX_TIMEOUT_S, key, "seconds", why)


def epoch_setting(value: Any, key: str) -> str | int:
    return auto_or_positive_int(value, key, "passes over the training set")


def batch_setting(value: Any, key: str) -> str | int:
    return auto_or_positive_int(value, key, "examples a step")


def worker_setting(value: Any, key: str) -> str | int:
    """``auto`` or 0 to MAX_WORKERS DataLoader worker processes."""
    if value == "auto":
        return "auto"
    try:
        number = non_negative_int(value, key)
    except ParamsError:
        raise ParamsError(
            f"{key}: expected 'auto' or a number of worker processes (0 or more), got {value!r}"
        ) from None
    why = (
        "each is a process with its own batches in flight, and more than the cores only compete "
        "for them; use auto (the cores this process may use)"
    )
    return at_most(number, MAX_WORKERS, key, "worker processes", why)


def rank_spec(value: Any, key: str) -> str | int:
    """``auto`` or a machine's rank."""
    if value == "auto":
        return "auto"
    try:
        return non_negative_int(value, key)
    except ParamsError:
        raise ParamsError(f"{key}: expected 'auto' or a rank (0 or more), got {value!r}") from None


def endpoint(value: Any, key: str) -> str:
    """``auto`` ($MASTER_ADDR:$MASTER_PORT, as a job script sets them) or ``host:port``."""
    if value == "auto":
        return "auto"
    host, _, port = str(value).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParamsError(f"{key}: expected auto or host:port (e.g. node001:29400), got {value!r}")
    return str(value)


def augment_policy(value: Any, key: str) -> str:
    """An augmentation policy (recipe.AUGMENTS); true and false, as params.yaml once had
    them, read as auto and none."""
    if isinstance(value, bool):
        return "auto" if value else "none"
    return one_of(*AUGMENTS)(value, key)


def above_zero_up_to_one(value: Any, key: str) -> float:
    """A share or a factor where 1 turns the feature off: layer_decay, interpolate."""
    number = _number(value, key)
    if not 0 < number <= 1:
        raise ParamsError(f"{key}: must be above 0 and at most 1 (1 is off), got {value!r}")
    return number


def unfreeze_spec(value: Any, key: str) -> str | int:
    if value == "all":
        return "all"
    try:
        return positive_int(value, key)
    except ParamsError:
        raise ParamsError(
            f"{key}: expected 'all' or a number of last blocks (1 or more), got {value!r}"
        ) from None


SCHEMA: dict[str, Any] = {
    "seed": seed_value,
    "lr": positive_float,
    "device": one_of(*DEVICES),
    "amp": amp_mode,
    "deterministic": boolean,
    "class_weighted_loss": boolean,
    "data": {
        "modality": text,  # a registered modality: checked by pipeline.modalities.for_params
        "dataset": text,  # one of that modality's datasets: checked there too
        "path": text,
        "text_column": text,
        "label_column": text,
        "skip_bad_images": boolean,
        "max_image_pixels": pixel_limit,
        "skip_bad_texts": boolean,
        "num_workers": worker_setting,
        "val_fraction": fraction,
        "min_val_examples": non_negative_int,
        "test_fraction": fraction,
        "max_train_per_class": non_negative_int,
    },
    "backbone": {
        "arch": text,  # checked by the modality's check_params
        "weights": weights_source,
        "revision": text,
        "image_size": positive_int,
        "max_length": positive_int,
        "truncation": one_of(*TRUNCATION_SIDES),
        "padding": one_of(*PADDINGS),
        "pooling": one_of(*POOLINGS),
        "pretrain_images": positive_int,
        "pretrain_epochs": positive_int,
        "pretrain_lr": positive_float,
        "pretrain_batch_size": positive_int,
    },
    "extract": {
        "batch_size": positive_int,
    },
    "head": {
        "type": one_of(*HEAD_TYPES),
        "hidden_units": positive_int,
        "dropout": below_one,
        "lr": positive_float,
        "weight_decay": non_negative_float,
        "batch_size": positive_int,
        "max_epochs": positive_int,
        "patience": positive_int,
    },
    "finetune": {
        "strategy": one_of(*STRATEGIES),
        "epochs": epoch_setting,
        "select": one_of(*SELECTIONS),
        "batch_size": batch_setting,
        "unfreeze": unfreeze_spec,
        "head_init": one_of(*HEAD_INITS),
        "optimizer": one_of(*OPTIMIZERS),
        "momentum": below_one,
        "backbone_lr_ratio": positive_float,
        "layer_decay": above_zero_up_to_one,
        "warmup_epochs": non_negative_int,
        "weight_decay": non_negative_float,
        "l2sp": non_negative_float,
        "label_smoothing": below_one,
        "ema_epochs": non_negative_float,
        "interpolate": above_zero_up_to_one,
        "augment": augment_policy,
        "mix": one_of(*MIXES),
        "mix_alpha": positive_float,
        "bn": one_of(*BN_MODES),
        "adapter_rank": positive_int,
    },
    "export": {
        "tolerance": positive_float,
    },
    "distributed": {
        "nproc_per_node": process_count,
        "nnodes": positive_int,
        "node_rank": rank_spec,
        "rdzv_endpoint": endpoint,
        "backend": one_of(*BACKENDS),
        "sync_batchnorm": boolean,
        "max_batch_per_process": non_negative_int,
        "timeout_s": timeout_seconds,
    },
    "launch": {
        "git_remote": text,
        "work_dir": text,
        "partition": optional_text,
        "account": optional_text,
        "time": optional_text,
        "cpus_per_task": non_negative_int,
        "gpus_per_node": non_negative_int,
        "mem": optional_text,
        "requeue": boolean,
        "sbatch": text_lines,
        "setup": text_lines,
    },
}


def validate(raw: Any, schema: dict[str, Any] = SCHEMA, prefix: str = "") -> dict[str, Any]:
    """Return the params with every value checked and converted; raise on the first problem."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    unknown = sorted(set(raw) - set(schema), key=str)  # YAML keys may be numbers: 1: beside zzz:
    if unknown:
        raise ParamsError(
            f"{prefix}{unknown[0]}: unknown key{did_you_mean(unknown[0], schema)}; "
            f"allowed keys in {where}: {', '.join(schema)}"
        )
    missing = [key for key in schema if key not in raw]
    if missing:
        raise ParamsError(f"{prefix}{missing[0]}: missing; add it to params.yaml")
    checked: dict[str, Any] = {}
    for key, rule in schema.items():
        if isinstance(rule, dict):
            checked[key] = validate(raw[key], rule, f"{prefix}{key}.")
        else:
            checked[key] = rule(raw[key], f"{prefix}{key}")
    return checked


def check_weights_file(weights: str) -> None:
    """A local checkpoint lives under data/raw/weights/, which the backbone stage depends on:
    DVC then reruns it when the file's bytes change, and the run-cache never restores a
    backbone made from other bytes."""
    if is_weights_file(weights) and not is_under(weights, WEIGHTS_DIR):
        raise ParamsError(
            f"backbone.weights: {weights!r} must be a file under {WEIGHTS_DIR}/ (the backbone stage "
            f"depends on that folder, so DVC reruns it when the checkpoint changes); copy it "
            f"there, track it with `dvc add`, and set backbone.weights: {WEIGHTS_DIR}/{Path(weights).name}"
        )


def require_raw_path(data: dict[str, Any]) -> Path:
    """``data.path``, once checked to lie under data/raw/: the stages depend on that folder,
    so DVC reruns them when the data there changes. The modalities check what must be there."""
    path = Path(data["path"])
    if not is_under(path, RAW_DIR):
        raise ParamsError(
            f"data.path: {data['path']!r} must be a folder under {RAW_DIR}/ (the stages depend "
            f"on {RAW_DIR}, so DVC reruns them when its data changes)"
        )
    return path


def cross_check(params: dict[str, Any]) -> None:
    """Checks that need more than one key."""
    distributed = params["distributed"]
    if distributed["node_rank"] != "auto" and distributed["node_rank"] >= distributed["nnodes"]:
        raise ParamsError(
            f"distributed.node_rank: {distributed['node_rank']} is not below distributed.nnodes "
            f"({distributed['nnodes']}); ranks run from 0 (the head node) to nnodes - 1"
        )
    finetune = params["finetune"]
    if finetune["epochs"] != "auto":
        check_epoch_counts(finetune, finetune["epochs"], f"finetune.epochs: {finetune['epochs']}")
    if finetune["interpolate"] < 1 and finetune["head_init"] != "probe":
        raise ParamsError(
            f"finetune.interpolate: {finetune['interpolate']} blends the fine-tuned weights with the "
            f"starting model's, whose head is random under finetune.head_init: "
            f"{finetune['head_init']}; use head_init: probe, or interpolate: 1 (off)"
        )
    check_weights_file(params["backbone"]["weights"])
    data = params["data"]
    if data["val_fraction"] + data["test_fraction"] >= 0.9:
        raise ParamsError(
            "data.val_fraction + data.test_fraction: must leave at least 10% of the images "
            f"for training, got {data['val_fraction']} + {data['test_fraction']}"
        )


def check_epoch_counts(finetune: dict[str, Any], epochs: int, trains: str) -> None:
    """The warmup and the weight average fit in ``epochs`` (``trains``: what sets them, for
    the message)."""
    if finetune["warmup_epochs"] >= epochs:
        raise ParamsError(
            f"finetune.warmup_epochs: {finetune['warmup_epochs']} leaves no epoch for the cosine decay "
            f"of the {epochs} epochs {trains} trains; use fewer warmup epochs (0 for none)"
        )
    if finetune["ema_epochs"] > epochs:
        raise ParamsError(
            f"finetune.ema_epochs: {finetune['ema_epochs']:g} averages the weights over more epochs "
            f"than the {epochs} {trains} trains, so the average would keep much of the starting "
            f"weights; use at most {epochs} (0: no average)"
        )


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml, validate every key the stages share and return plain, typed values.
    The stages load params through pipeline.modalities.load_params, which also has the run's
    modality check the keys whose meaning is its own (the backbone, the recipe, the data)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run the pipeline from the project's root") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    try:
        params = validate(raw)
        cross_check(params)
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    return params
