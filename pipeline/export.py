"""Stage 7, export: the fine-tuned model as ONNX, checked against PyTorch on the test split.

Reads params ``data.num_workers``, ``extract.batch_size`` and ``export.tolerance``; reads
data/prepared/ (and image files under data/raw/) and models/finetuned.pt; writes
models/model.onnx (a dynamic batch axis: input ``images``, N x 3 x H x W float32,
normalised; output ``logits``), models/model.json (what a caller needs to feed it: class
names, input size, resize, mean and std, and the sha256 of the checkpoint it came from) and
metrics/export.json (the parity check's figures).

The stage verifies itself: onnxruntime and PyTorch must agree on every test image, within
``export.tolerance`` on each logit and on the top-1 class, or the stage fails and writes
nothing. Needs the ``export`` extra (onnx, onnxscript, onnxruntime).
Run: ``python -m pipeline.export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoints import ONNX_INPUT, ONNX_OUTPUT, onnx_sidecar, sidecar_path
from pipeline.common import (
    FINETUNED_FILE,
    METRICS_DIR,
    ONNX_FILE,
    atomic_path,
    file_sha256,
    progress,
    write_json,
)
from pipeline.data import checkpoint_transform
from pipeline.entry import run_stage
from pipeline.errors import StageError
from pipeline.models import load_classifier
from pipeline.onnx_model import onnx_logits, onnx_session, require_onnxruntime
from pipeline.params import load_params
from pipeline.training import inference_loader


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    """Write ``model`` (in eval mode, on the CPU, float32) to ``path`` through torch.export,
    with the batch axis left dynamic."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        require_onnxruntime()
        raise StageError("ONNX export needs onnxscript: pip install -e '.[export]'") from None
    model = model.eval().cpu().float()
    example = torch.zeros(2, 3, image_size, image_size)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))
    drop_debug_metadata(path)


def drop_debug_metadata(path: Path) -> None:
    """Remove what the exporter notes on each node for debugging (Python stack traces with
    this machine's file paths, FX node names): the file then holds only the graph and the
    weights, comes out byte for byte the same wherever it is exported, and ships no paths."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def onnx_opset(path: Path) -> int | None:
    """The version of the default ONNX operator set a model file uses."""
    import onnx

    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next((entry.version for entry in imports if entry.domain in ("", "ai.onnx")), None)


@torch.inference_mode()
def parity(model: torch.nn.Module, session: Any, loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    """Both runtimes on every image of ``loader``: the largest logit difference and how
    many images get a different top-1 class."""
    model.eval()
    largest, differ, count = 0.0, 0, 0
    for images, _ in progress(loader, "parity"):
        expected = model(images).float().numpy()
        got = onnx_logits(session, images)
        largest = max(largest, float(np.abs(expected - got).max()))
        differ += int((expected.argmax(1) != got.argmax(1)).sum())
        count += len(images)
    return {"images": count, "max_abs_logit_difference": largest, "top1_disagreements": differ}


def check_parity(result: dict[str, Any], tolerance: float) -> None:
    """Fail unless the runtimes agree within ``tolerance`` and on every top-1 class."""
    problems = []
    largest, differ = result["max_abs_logit_difference"], result["top1_disagreements"]
    if largest > tolerance:
        problems.append(f"max |logit difference| {largest:.3g} > export.tolerance {tolerance:g}")
    if differ:
        problems.append(f"{differ} of {result['images']} images get another top-1 class")
    if problems:
        raise StageError(
            "export: onnxruntime and PyTorch disagree on the test split: "
            + "; ".join(problems)
            + ". Nothing was written; the ONNX graph does not reproduce models/finetuned.pt"
        )


def main() -> None:
    params = load_params()
    tolerance = params["export"]["tolerance"]
    require_onnxruntime()
    model, checkpoint = load_classifier(FINETUNED_FILE)
    loader = inference_loader(
        "test",
        checkpoint_transform(checkpoint),
        params["extract"]["batch_size"],
        params["data"]["num_workers"],
        torch.device("cpu"),
    )
    with atomic_path(ONNX_FILE) as staged:  # the model first, then the sidecar that pins its hash
        export_onnx(model, checkpoint["image_size"], staged)
        opset = onnx_opset(staged)
        result = parity(model, onnx_session(staged), loader)
        check_parity(result, tolerance)
        onnx_hash = file_sha256(staged)
    write_json(
        sidecar_path(ONNX_FILE), onnx_sidecar(checkpoint, file_sha256(FINETUNED_FILE), onnx_hash, opset)
    )
    largest = float(f"{result['max_abs_logit_difference']:.3g}")  # 3 digits: diffs show real changes
    write_json(METRICS_DIR / "export.json", {**result, "max_abs_logit_difference": largest})
    print(
        f"export: {ONNX_FILE} (opset {opset}) agrees with PyTorch on {result['images']} test images: "
        f"max |logit difference| {result['max_abs_logit_difference']:.3g} (tolerance {tolerance:g}), "
        f"{result['top1_disagreements']} top-1 disagreements"
    )


if __name__ == "__main__":
    run_stage(main)
