"""The files the stages hand each other, each defined once: its schema (a TypedDict), the
function that builds it, and the one function that reads it back, checked.

- models/backbone.pt (backbone stage): BackboneCheckpoint, read_backbone
- data/features/<split>.pt (extract): Features, read_features
- models/head.pt (train_head): HeadCheckpoint, read_head
- models/finetuned.pt (finetune): ClassifierCheckpoint, read_classifier
- models/model.json beside models/model.onnx (export): OnnxSidecar, read_sidecar

A file that is not the one a reader expects (another tool's, an older layout, a sidecar
beside other ONNX bytes) is a StageError that names it and says how to remake it, not a
KeyError in the middle of a stage. torch is imported inside the functions that use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.core.common import (
    BACKBONE_FILE,
    FEATURES_DIR,
    FINETUNED_FILE,
    HEAD_FILE,
    file_sha256,
    load_torch,
)
from pipeline.core.errors import StageError

if TYPE_CHECKING:
    import torch

StateDict = dict[str, "torch.Tensor"]


class Preprocessing(TypedDict):
    """What a model needs to be fed as its backbone was; every format below carries it,
    its keys at the top level: these three, then the modality's own (PREPROCESSING_KEYS)."""

    modality: str  # images | text: which module of pipeline.modalities reads the rest
    arch: str
    weights: str  # the params' backbone.weights the backbone came from


class ImagePreprocessing(Preprocessing):
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]


class TextPreprocessing(Preprocessing):
    revision: str  # the Hugging Face Hub commit the encoder was read at ("" for a folder or package)
    config: dict[str, Any]  # the encoder's Hugging Face config: rebuilds it with no download
    tokenizer: str  # the tokenizer, as the tokenizers library's JSON
    max_length: int
    truncation: str
    padding: str
    pooling: str


# Each modality's preprocessing keys in the order the files hold them (their bytes, and so
# their hashes in dvc.lock, depend on it).
PREPROCESSING_KEYS = {
    "images": tuple(ImagePreprocessing.__annotations__),  # the base class's keys first
    "text": tuple(TextPreprocessing.__annotations__),
}


def preprocessing_of(checkpoint: dict[str, Any]) -> Preprocessing:
    """The preprocessing keys of a checkpoint or sidecar, in their order."""
    return {key: checkpoint[key] for key in PREPROCESSING_KEYS[checkpoint["modality"]]}


class BackboneCheckpoint(Preprocessing):
    """models/backbone.pt: the backbone without its classifier, and its preprocessing."""

    feature_dim: int
    state_dict: StateDict


class Features(TypedDict):
    """data/features/<split>.pt: the frozen backbone's pooled features of one split."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


class HeadShape(TypedDict):
    """What rebuilds a head, without its weights."""

    type: str
    in_features: int
    hidden_units: int
    dropout: float
    classes: list[str]


class HeadCheckpoint(HeadShape):
    """models/head.pt: the linear probe (or MLP) trained on the cached features."""

    state_dict: StateDict


class FinetuneRun(TypedDict, total=False):
    """How a classifier was trained, where finetune wrote it (not needed to load it)."""

    params: dict[str, Any]
    world_size: int
    backend: str


class ClassifierCheckpoint(FinetuneRun, Preprocessing):
    """models/finetuned.pt: everything that loads the fine-tuned model without params."""

    format: str
    format_version: int
    classes: list[str]
    head: HeadShape
    state_dict: StateDict


class OnnxSidecar(Preprocessing):
    """models/model.json: how to feed models/model.onnx and read its output, and the sha256
    of the model.onnx it describes and of the checkpoint that one came from."""

    format: str
    format_version: int
    onnx_sha256: str
    inputs: list[dict[str, Any]]
    output: dict[str, str]
    classes: list[str]
    opset: int | None
    source: str
    source_sha256: str


CLASSIFIER_FORMAT = "dvc-transfer-learning classifier"
CLASSIFIER_VERSION = 2  # 2: the preprocessing names its modality
ONNX_FORMAT = "dvc-transfer-learning onnx"
ONNX_FORMAT_VERSION = 3  # 2: the sidecar pins model.onnx's own sha256; 3: inputs by modality
ONNX_OUTPUT = "logits"


# The type each of these keys holds, where a file has it: a file that holds another is refused
# when read, not when the value is first used, mid-stage.
KEY_TYPES = {"classes": list, "state_dict": dict, "head": dict, "feature_dim": int, "in_features": int}


def _require_keys(loaded: Any, schema: type, path: Path, stage: str) -> None:
    missing = sorted(schema.__required_keys__ - set(loaded)) if isinstance(loaded, dict) else ["(all)"]
    if missing:
        raise StageError(
            f"{path}: not a {schema.__name__} this pipeline wrote (missing {', '.join(missing)}); "
            f"rerun the stage that writes it: dvc repro {stage}"
        )
    wrong = [
        f"{key} holds {type(loaded[key]).__name__}, not {kind.__name__}"
        for key, kind in KEY_TYPES.items()
        if key in schema.__required_keys__ and not isinstance(loaded[key], kind)
    ]
    if "classes" in loaded and isinstance(loaded["classes"], list):
        wrong += [
            f"classes holds {name!r}, not a name" for name in loaded["classes"] if not isinstance(name, str)
        ][:1]
    if wrong:
        raise StageError(
            f"{path}: not a {schema.__name__} this pipeline wrote ({'; '.join(wrong)}); "
            f"rerun the stage that writes it: dvc repro {stage}"
        )


def load_weights(model: torch.nn.Module, state_dict: StateDict, source: Path | str, stage: str) -> None:
    """``model`` given a checkpoint's weights; weights that do not fit the model the checkpoint
    describes (a name or a shape) are a one-line error naming the file, not torch's list."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        first = lines[0] if lines else str(error).strip()
        raise StageError(
            f"{source}: its weights do not fit the model it describes ({first}); rerun the stage "
            f"that writes it: dvc repro {stage}"
        ) from None


def backbone_checkpoint(
    preprocessing: Preprocessing | dict[str, Any], feature_dim: int, state_dict: StateDict
) -> BackboneCheckpoint:
    """models/backbone.pt: the preprocessing (its keys in order), the feature size, the weights."""
    return {**preprocessing_of(preprocessing), "feature_dim": feature_dim, "state_dict": state_dict}


def _require_preprocessing(loaded: dict[str, Any], path: Path, stage: str) -> None:
    """The modality's own preprocessing keys are there too (the schemas hold the shared ones)."""
    modality = loaded["modality"]
    missing = [key for key in PREPROCESSING_KEYS.get(modality, ("(a known modality)",)) if key not in loaded]
    if missing:
        raise StageError(
            f"{path}: not a file this pipeline wrote for {modality!r} (missing {', '.join(missing)}); "
            f"rerun the stage that writes it: dvc repro {stage}"
        )


def read_backbone(path: Path | str = BACKBONE_FILE) -> BackboneCheckpoint:
    path = Path(path)
    loaded = load_torch(path)
    _require_keys(loaded, BackboneCheckpoint, path, "backbone")
    _require_preprocessing(loaded, path, "backbone")
    return loaded


def read_features(split: str, directory: Path | str = FEATURES_DIR) -> Features:
    path = Path(directory) / f"{split}.pt"
    loaded = load_torch(path)
    _require_keys(loaded, Features, path, "extract")
    return loaded


def head_checkpoint(
    state_dict: StateDict, config: dict[str, Any], in_features: int, classes: list[str]
) -> HeadCheckpoint:
    """models/head.pt from the head's weights and its shape in params' ``head`` section."""
    return {
        "type": config["type"],
        "in_features": in_features,
        "hidden_units": config["hidden_units"],
        "dropout": config["dropout"],
        "classes": classes,
        "state_dict": state_dict,
    }


def read_head(path: Path | str = HEAD_FILE) -> HeadCheckpoint:
    path = Path(path)
    loaded = load_torch(path)
    _require_keys(loaded, HeadCheckpoint, path, "train_head")
    return loaded


def classifier_checkpoint(
    state_dict: StateDict, backbone: BackboneCheckpoint, head: HeadCheckpoint, **extra: Any
) -> ClassifierCheckpoint:
    """models/finetuned.pt: the weights, the preprocessing its backbone expects, the class
    names and the head's shape, and ``extra`` (params, world_size, backend)."""
    return {
        "format": CLASSIFIER_FORMAT,
        "format_version": CLASSIFIER_VERSION,
        **preprocessing_of(backbone),
        "classes": head["classes"],
        "head": {key: value for key, value in head.items() if key != "state_dict"},
        **extra,
        "state_dict": {key: value.detach().cpu() for key, value in state_dict.items()},
    }


def read_classifier(path: Path | str = FINETUNED_FILE) -> ClassifierCheckpoint:
    """A classifier checkpoint this pipeline wrote; a clear error for any other file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run the pipeline first (dvc repro) or give a model file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one that pickles code: not ours either way
        raise StageError(
            f"{path}: not a model written by this pipeline (torch.load failed: {type(error).__name__}); "
            "give models/finetuned.pt from dvc repro"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CLASSIFIER_FORMAT:
        ours = isinstance(checkpoint, dict) and {"arch", "classes", "state_dict"} <= checkpoint.keys()
        if ours and "format" not in checkpoint:
            raise StageError(
                f"{path}: written by an older version of this pipeline (no format version; this one "
                f"reads version {CLASSIFIER_VERSION}); rerun the finetune stage: dvc repro finetune"
            )
        raise StageError(
            f"{path}: not a model written by this pipeline's finetune stage (it holds "
            f"{type(checkpoint).__name__}{' without a format' if isinstance(checkpoint, dict) else ''}); "
            "give models/finetuned.pt from dvc repro"
        )
    version = checkpoint.get("format_version")
    if version != CLASSIFIER_VERSION:
        newer = isinstance(version, int) and version > CLASSIFIER_VERSION
        raise StageError(
            f"{path}: classifier format version {version}, but this pipeline reads version "
            f"{CLASSIFIER_VERSION}; "
            + ("update this project (git pull, pip install -e .)" if newer else "rerun: dvc repro finetune")
        )
    _require_keys(checkpoint, ClassifierCheckpoint, path, "finetune")
    _require_preprocessing(checkpoint, path, "finetune")
    return checkpoint


def sidecar_path(onnx_file: Path | str) -> Path:
    """models/model.onnx's description: models/model.json."""
    return Path(onnx_file).with_suffix(".json")


def onnx_sidecar(
    checkpoint: ClassifierCheckpoint | dict[str, Any],
    inputs: list[dict[str, Any]],
    checkpoint_hash: str,
    onnx_hash: str,
    opset: int | None,
) -> OnnxSidecar:
    """What a caller needs to feed model.onnx (``inputs``: each input's name, shape and
    dtype, as the modality exports them; the preprocessing) and read its output, and the
    sha256 of the model.onnx it describes (a sidecar beside another model.onnx is refused)."""
    return {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "onnx_sha256": onnx_hash,
        "inputs": inputs,
        "output": {"name": ONNX_OUTPUT, "meaning": "logits; softmax gives class probabilities"},
        **preprocessing_of(checkpoint),
        "classes": checkpoint["classes"],
        "opset": opset,
        "source": str(FINETUNED_FILE),
        "source_sha256": checkpoint_hash,
    }


def read_sidecar(onnx_file: Path | str) -> OnnxSidecar:
    """models/model.json for ``onnx_file``, checked to be one the export stage wrote for
    these very ONNX bytes."""
    path = sidecar_path(onnx_file)
    if not Path(onnx_file).is_file():
        raise StageError(f"{onnx_file}: not found; run the export stage first (dvc repro export)")
    if not path.is_file():
        raise StageError(f"{path}: not found beside {onnx_file}; the export stage writes both")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StageError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise StageError(f"{path}: not written by this pipeline's export stage; rerun: dvc repro export")
    if meta.get("format_version") != ONNX_FORMAT_VERSION:
        raise StageError(
            f"{path}: sidecar format version {meta.get('format_version')}, but this pipeline reads "
            f"version {ONNX_FORMAT_VERSION}; rerun: dvc repro export"
        )
    try:
        onnx_hash = file_sha256(onnx_file)
    except OSError as error:
        raise StageError(f"{onnx_file}: cannot be read ({error.strerror})") from None
    if meta.get("onnx_sha256") != onnx_hash:
        raise StageError(
            f"{path} describes another model than {onnx_file} (its sha256 differs: an export "
            "interrupted between the two files, or one of them replaced); rerun: dvc repro export"
        )
    _require_keys(meta, OnnxSidecar, path, "export")
    _require_preprocessing(meta, path, "export")
    return meta
