"""Stage 2, backbone: materialize the pretrained backbone's weights into one pinned file.

Reads params ``seed``, ``device``, ``amp``, ``deterministic``, ``data.modality``, ``backbone.*`` and
``distributed.*`` (pretraining runs in that many processes under DistributedDataParallel).
What ``backbone.weights`` can name depends on the modality (pipeline.modalities): for images
``pretrain`` (the offline glyph task), ``none``, a torchvision weights name or a local
checkpoint; for texts the encoder's own pretrained weights (``pretrain``) or ``none``.
Writes models/backbone.pt (the preprocessing, the feature size and the weights, so
dvc.lock pins their hash) and metrics/backbone.json. Run: ``python -m pipeline.backbone``.
"""

from __future__ import annotations

from pipeline import modalities
from pipeline.core import distributed, resume
from pipeline.core.common import (
    BACKBONE_FILE,
    METRICS_DIR,
    device_name,
    save_torch,
    seed_everything,
    write_json,
)
from pipeline.core.entry import run_stage
from pipeline.modalities import load_params


def main() -> None:
    params = load_params()
    config, seed, settings = params["backbone"], params["seed"], params["distributed"]
    plan, ranks, device = distributed.start("backbone", settings, params["device"])
    seed_everything(seed, params["deterministic"])
    modality = modalities.get(params["data"]["modality"])
    checkpoint, metrics = modality.materialize(config, seed, device, params["amp"], ranks, settings)
    if not ranks.main:
        return
    if "pretrain_accuracy" in metrics:  # trained here: in how many processes
        metrics.update(world_size=ranks.world_size, backend=plan.backend, device=device_name(device))
    save_torch(BACKBONE_FILE, checkpoint)
    write_json(METRICS_DIR / "backbone.json", metrics)
    print(f"backbone: {checkpoint['arch']} ({checkpoint['weights']}) -> {BACKBONE_FILE}")
    saved = resume.for_stage("backbone")
    if saved is not None:  # pretraining's state, resumed from after a kill: no longer needed
        saved.clear()


if __name__ == "__main__":
    run_stage(main, "backbone", distributed=True)
