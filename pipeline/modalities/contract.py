"""The contract every modality implements: what the stages and tools call on the module the
registry (pipeline.modalities) hands them. A modality is a module (PEP 544: a module can
implement a protocol); tests/test_modalities.py holds each registered one to every member
here, signatures included.

Inputs travel as one tensor a batch (the backbone's forward takes it), so the training and
inference loops never look inside them; what a modality adds is how its data is split,
read and shown, and how its backbone is built, adapted and exported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from pipeline.core import distributed
    from pipeline.core.checkpoints import BackboneCheckpoint, Preprocessing
    from pipeline.core.data import PredictInputs, PredictRequest, Splits
    from pipeline.core.recipe import ScheduleRule


class Modality(Protocol):
    NAME: str  # what data.modality and checkpoints call it; its package is pipeline/modalities/<NAME>
    DATASETS: tuple[str, ...]  # the data.dataset values it reads
    ITEMS: str  # what messages and the report count ("images", "texts")
    SKIPPED: str  # the report's note on inputs prepare skipped
    AUTO_SCHEDULE: ScheduleRule  # what finetune.epochs and finetune.batch_size auto pick

    # params
    def check_params(self, params: dict[str, Any], check_models: bool = True) -> None:
        """Refuse (ParamsError) keys whose meaning is the modality's: the data's path, the
        recipe, and with ``check_models`` the backbone."""

    def auto_augment(self, dataset: str) -> str:
        """The augmentation policy ``finetune.augment: auto`` picks for ``dataset``."""

    # prepare
    def prepare_splits(self, data: dict[str, Any], seed: int) -> tuple[Splits, list[str], list[str]]:
        """The train/val/test splits, the class names and the inputs skipped."""

    # backbone and model
    def materialize(
        self,
        config: dict[str, Any],
        seed: int,
        device: torch.device,
        amp: str,
        ranks: distributed.Ranks,
        settings: dict[str, Any],
    ) -> tuple[BackboneCheckpoint, dict[str, Any]]:
        """The backbone checkpoint params' ``backbone`` section names, and its metrics."""

    def random_init_backbone(self, config: dict[str, Any]) -> tuple[nn.Module, Preprocessing]:
        """The same architecture untrained (seeded), and how it is fed: the baseline's."""

    def build_backbone(self, preprocessing: dict[str, Any]) -> nn.Module:
        """The untrained backbone a checkpoint's preprocessing describes."""

    def blocks(self, backbone: nn.Module) -> list[nn.Module]:
        """The backbone's blocks, input to output: what ``finetune.unfreeze: N`` counts."""

    def add_adapters(self, backbone: nn.Module, checkpoint: dict[str, Any], config: dict[str, Any]) -> None:
        """Freeze the backbone and add trainable adapters (``finetune.strategy: adapters``)."""

    def fold_adapters(self, model: nn.Module) -> nn.Module:
        """The model with its adapters folded into the backbone's weights."""

    # data
    def dataset(
        self, prepared_dir: Path, split: str, preprocessing: dict[str, Any], augment: str = "none"
    ) -> Dataset:
        """A prepared split's (input, label) items, with ``collate`` and ``lengths`` where
        batching needs them."""

    def batch_mixing(self, mix: str, alpha: float, num_classes: int) -> Callable | None:
        """What mixes a training batch (``finetune.mix``), None for none."""

    # export and predict
    def onnx_signature(
        self, model: nn.Module, checkpoint: dict[str, Any]
    ) -> tuple[nn.Module, tuple, list, tuple]:
        """The module to export, an example input, the inputs' descriptions and dynamic axes."""

    def onnx_feed(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        """A batch as the ONNX model's named inputs."""

    def predict_inputs(self, request: PredictRequest, meta: dict[str, Any]) -> PredictInputs:
        """What the user gave predict, read as this modality reads it."""

    def write_samples(
        self, prepared_dir: Path, split: str, keep: list[int], classes: list[str], out: Path
    ) -> None:
        """The ``keep`` items of a prepared split as files in ``out`` that predict reads."""

    # report
    def describe(self, backbone: dict[str, Any]) -> str:
        """How inputs reach the backbone (params' ``backbone`` section), for the report."""

    def mistakes_view(self, rows: list[dict[str, str]], prepared_dir: Path, save_figure: Callable) -> str:
        """The report's view of the test examples with the highest loss (markdown)."""
