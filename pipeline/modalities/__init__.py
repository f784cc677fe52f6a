"""What differs between modalities, behind one seam: one package per modality, found by
name in a small registry and imported only when a run asks for it.

The stages are modality-neutral: they ask this package for the modality of params'
``data.modality`` (``for_params``), or of the ``modality`` a checkpoint records
(``for_checkpoint``), and call what pipeline.modalities.contract.Modality declares on it:
params checks, the splits, the backbone, datasets, adapters, the export's inputs, predict's
inputs and the report's views. A modality's package imports pipeline.core and nothing of
another modality, so dvc.yaml makes each stage depend on ``pipeline/modalities/${data.modality}``
alone: an edit to the text code reruns nothing of an image run, and the reverse.

A third modality is a package ``pipeline/modalities/<name>/`` that implements the contract,
plus one line in ``BUILTIN`` (or ``register(name, module)`` for one that lives elsewhere,
whose folder a project's dvc.yaml then lists as a dep).

A batch, whatever the modality, is one tensor that the backbone's forward takes, so the
training and inference loops (pipeline.core.training) never look inside it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import params as core_params
from pipeline.core.common import BACKBONE_FILE, FINETUNED_FILE, PREPARED_DIR
from pipeline.core.errors import ParamsError, StageError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from pipeline.core.checkpoints import ClassifierCheckpoint
    from pipeline.core.distributed import Ranks
    from pipeline.core.models import Classifier
    from pipeline.modalities.contract import Modality

# name: the module that implements it (pipeline.modalities.contract.Modality)
BUILTIN = {"images": "pipeline.modalities.images", "text": "pipeline.modalities.text"}
_registry: dict[str, str] = dict(BUILTIN)


def register(name: str, module: str) -> None:
    """Make the modality ``name``, implemented by the module ``module``, known to the stages."""
    _registry[name] = module


def names() -> list[str]:
    """The modalities a run can name in ``data.modality``."""
    return list(_registry)


def get(name: str) -> Modality:
    """The modality ``name``, imported now (a run imports only its own)."""
    try:
        module = _registry[name]
    except KeyError:
        raise ParamsError(
            f"data.modality: {name!r} is not a modality{core_params.did_you_mean(name, _registry)}; "
            f"choose one of: {', '.join(_registry)}"
        ) from None
    return importlib.import_module(module)


def for_params(params: dict[str, Any]) -> Modality:
    """The modality params' ``data.modality`` names, once ``data.dataset`` is checked to be
    one of its datasets."""
    data = params["data"]
    modality = get(data["modality"])
    if data["dataset"] not in modality.DATASETS:
        owners = [name for name in _registry if data["dataset"] in get(name).DATASETS]
        hint = (
            f"set data.modality: {owners[0]} for it (the stages' code deps in dvc.yaml follow that key)"
            if owners
            else f"the {data['modality']} datasets are: {', '.join(modality.DATASETS)}"
        )
        raise ParamsError(
            f"data.dataset: {data['dataset']!r} is not a dataset of data.modality {data['modality']}; {hint}"
        )
    return modality


def load_params(path: Path | str = core_params.PARAMS_FILE, check_models: bool = True) -> dict[str, Any]:
    """params.yaml, every key checked: the shared keys by pipeline.core.params, the keys
    whose meaning depends on the modality (the backbone, the recipe, the data's path) by the
    run's modality. ``check_models=False`` skips the checks that import the model libraries
    (torchvision's registry), for a stage that builds no model (report)."""
    params = core_params.load_params(path)
    try:
        modality = for_params(params)
        modality.check_params(params, check_models)
        if params["finetune"]["epochs"] == "auto":  # at the fewest, the rule's epochs
            epochs = modality.AUTO_SCHEDULE.epochs
            core_params.check_epoch_counts(params["finetune"], epochs, "finetune.epochs: auto at the fewest")
    except ParamsError as error:
        raise ParamsError(f"{path}: {error}") from None
    return params


def for_checkpoint(checkpoint: dict[str, Any]) -> Modality:
    """The modality a checkpoint, a sidecar or a preprocessing records."""
    name = checkpoint.get("modality")
    if name not in _registry:
        raise StageError(
            f"a model file of modality {name!r}, which this pipeline does not know "
            f"(it knows {', '.join(_registry)}); update the project or rerun: dvc repro"
        )
    return get(name)


def split_dataset(split: str, preprocessing: dict[str, Any], augment: str = "none") -> Dataset:
    """A prepared split as the dataset its modality makes of it, fed as ``preprocessing`` says."""
    return for_checkpoint(preprocessing).dataset(PREPARED_DIR, split, preprocessing, augment)


def inference_loader(
    split: str,
    preprocessing: dict[str, Any],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    ranks: Ranks | None = None,
) -> DataLoader:
    """A loader over this process's share of a prepared split (all of it for one process),
    its items in an order that batches well (loaders.in_dataset_order puts the results
    back in dataset order), files decoded in ``num_workers`` processes: what extraction,
    the baseline, evaluation and the export's parity check run on."""
    from pipeline.core.distributed import Ranks, ShardSampler
    from pipeline.core.loaders import loader_workers, make_loader

    dataset = split_dataset(split, preprocessing)
    sampler = ShardSampler(
        len(dataset), ranks or Ranks(), getattr(dataset, "lengths", None), f"the {split} split"
    )
    workers = loader_workers(dataset, num_workers)
    return make_loader(dataset, batch_size, device, num_workers=workers, sampler=sampler)


def load_backbone(checkpoint: dict[str, Any], source: Path | str = BACKBONE_FILE) -> nn.Module:
    """The backbone a backbone checkpoint (read from ``source``) describes, with its weights."""
    from pipeline.core.checkpoints import load_weights

    model = for_checkpoint(checkpoint).build_backbone(checkpoint)
    load_weights(model, checkpoint["state_dict"], source, "backbone")
    return model


def classifier_from_checkpoint(
    checkpoint: ClassifierCheckpoint, source: Path | str = FINETUNED_FILE
) -> Classifier:
    """The fine-tuned classifier a checkpoint (read from ``source``) describes, with its weights."""
    from pipeline.core.checkpoints import load_weights
    from pipeline.core.models import Classifier, head_from_config

    backbone = for_checkpoint(checkpoint).build_backbone(checkpoint)
    model = Classifier(backbone, head_from_config(checkpoint["head"], len(checkpoint["classes"])))
    load_weights(model, checkpoint["state_dict"], source, "finetune")
    return model


def load_classifier(path: Path | str) -> tuple[Classifier, ClassifierCheckpoint]:
    """The fine-tuned classifier saved at ``path`` and its checkpoint's metadata."""
    from pipeline.core.checkpoints import read_classifier

    checkpoint = read_classifier(path)
    return classifier_from_checkpoint(checkpoint, path), checkpoint
