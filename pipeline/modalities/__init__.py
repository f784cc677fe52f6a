"""What differs between modalities, behind one seam: one module per modality.

The stages are modality-neutral: they ask this package for the module that handles the
data at hand (by params' ``data.dataset`` or ``backbone.arch``, or by the ``modality`` a
checkpoint records) and call the same functions on it:

- ``check_backbone(config)``: params' backbone section, checked when params load;
- ``prepare_splits(data, seed)``: the train/val/test splits, class names, skipped inputs;
- ``materialize(config, seed, device, amp, ranks, settings)``: the backbone checkpoint;
- ``random_init_backbone(config)``: the same architecture untrained, for the baseline;
- ``build_backbone(preprocessing)`` (untrained), ``blocks(backbone)`` (for ``finetune.unfreeze``),
  ``add_adapters(backbone, checkpoint, config)``, ``fold_adapters(model)``;
- ``dataset(prepared_dir, split, preprocessing, augment)``: (input, label) items, with a
  ``collate`` and item ``lengths`` where batching needs them;
- ``onnx_signature(model, checkpoint)``, ``onnx_feed(batch)``: the export and its inputs;
- ``predict_inputs(paths, texts, meta, text_column)``: what ``pipeline.predict`` was given;
- ``describe(preprocessing)``, ``mistakes_view(rows, prepared_dir, save_figure)``: the report.

A batch, whatever the modality, is one tensor that the backbone's forward takes, so the
training and inference loops (pipeline.core.training) never look inside it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.core.common import PREPARED_DIR
from pipeline.core.errors import StageError
from pipeline.modalities import images, text

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from pipeline.core.checkpoints import ClassifierCheckpoint
    from pipeline.core.distributed import Ranks
    from pipeline.core.models import Classifier

MODALITIES: dict[str, ModuleType] = {images.NAME: images, text.NAME: text}


def for_dataset(dataset: str) -> ModuleType:
    """The modality of params' ``data.dataset``: text, or images (digits, imagefolder, CIFAR)."""
    return text if dataset == text.NAME else images


def for_arch(arch: str) -> ModuleType:
    """The modality of params' ``backbone.arch``: images for a torchvision model, else text
    (params check that it agrees with ``data.dataset``)."""
    return images if images.is_architecture(arch) else text


def for_checkpoint(checkpoint: dict[str, Any]) -> ModuleType:
    """The modality a checkpoint, a sidecar or a preprocessing records."""
    try:
        return MODALITIES[checkpoint["modality"]]
    except KeyError:
        raise StageError(
            f"a model file of modality {checkpoint.get('modality')!r}, which this pipeline does not know "
            f"(it knows {', '.join(MODALITIES)}); update the project or rerun: dvc repro"
        ) from None


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
    its items in an order that batches well (training.in_dataset_order puts the results
    back in dataset order), files decoded in ``num_workers`` processes: what extraction,
    the baseline, evaluation and the export's parity check run on."""
    from pipeline.core.distributed import Ranks, ShardSampler
    from pipeline.core.training import loader_workers, make_loader

    dataset = split_dataset(split, preprocessing)
    sampler = ShardSampler(
        len(dataset), ranks or Ranks(), getattr(dataset, "lengths", None), f"the {split} split"
    )
    workers = loader_workers(dataset, num_workers)
    return make_loader(dataset, batch_size, device, num_workers=workers, sampler=sampler)


def load_backbone(checkpoint: dict[str, Any]) -> nn.Module:
    """The backbone a backbone checkpoint describes, with its weights."""
    model = for_checkpoint(checkpoint).build_backbone(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model


def classifier_from_checkpoint(checkpoint: ClassifierCheckpoint) -> Classifier:
    """The fine-tuned classifier a checkpoint describes, with its weights."""
    from pipeline.core.models import Classifier, head_from_config

    backbone = for_checkpoint(checkpoint).build_backbone(checkpoint)
    model = Classifier(backbone, head_from_config(checkpoint["head"], len(checkpoint["classes"])))
    model.load_state_dict(checkpoint["state_dict"])
    return model


def load_classifier(path: Path | str) -> tuple[Classifier, ClassifierCheckpoint]:
    """The fine-tuned classifier saved at ``path`` and its checkpoint's metadata."""
    from pipeline.core.checkpoints import read_classifier

    checkpoint = read_classifier(path)
    return classifier_from_checkpoint(checkpoint), checkpoint
