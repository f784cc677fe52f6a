"""Stage 7, export: the fine-tuned model as ONNX, checked against PyTorch on the test split.

Reads params ``data.num_workers``, ``extract.batch_size`` and ``export.tolerance``; reads
data/prepared/ (and image files under data/raw/) and models/finetuned.pt; writes
models/model.onnx (dynamic axes: for images, input ``images``, N x 3 x H x W float32,
normalised; for texts, ``input_ids`` and ``attention_mask``, N x L int64; output
``logits``), models/model.json (what a caller needs to feed it: the inputs, class names,
the preprocessing (input size, resize, mean and std; or the tokenizer and its length), and
the sha256 of the checkpoint it came from) and metrics/export.json (the parity check's
figures).

The stage verifies itself: onnxruntime and PyTorch must agree on every test example, within
``export.tolerance`` on each logit and on the top-1 class, or the stage fails and writes
nothing. Needs the ``export`` extra (onnx, onnxscript, onnxruntime).
Run: ``python -m pipeline.export``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import modalities
from pipeline.core.checkpoints import ONNX_OUTPUT, onnx_sidecar, sidecar_path
from pipeline.core.common import (
    FINETUNED_FILE,
    METRICS_DIR,
    ONNX_FILE,
    atomic_path,
    file_sha256,
    progress,
    write_json,
)
from pipeline.core.entry import run_stage
from pipeline.core.errors import StageError
from pipeline.core.onnx_model import onnx_logits, onnx_session, require_onnxruntime
from pipeline.modalities import inference_loader, load_classifier, load_params


def export_onnx(model: torch.nn.Module, checkpoint: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """Write ``model`` (in eval mode, on the CPU, float32) to ``path`` through torch.export,
    with the axes its modality names dynamic (the batch; a text's length); returns the
    inputs' description for model.json."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        require_onnxruntime()
        raise StageError("ONNX export needs onnxscript: pip install -e '.[export]'") from None
    model = model.eval().cpu().float()
    traced, example, inputs, dynamic_shapes = modalities.for_checkpoint(checkpoint).onnx_signature(
        model, checkpoint
    )
    program = torch.onnx.export(
        traced.eval(),
        example,
        input_names=[spec["name"] for spec in inputs],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        verbose=False,
    )
    program.save(str(path))
    drop_debug_metadata(path)
    return inputs


ONNX_MAX_BYTES = 2**31 - 1  # protobuf's limit on one message, so on a single-file ONNX model


def check_fits_one_onnx_file(model: torch.nn.Module, source: Path | str) -> None:
    """A model whose weights pass protobuf's 2 GB limit cannot be one ONNX file (onnx.save
    fails after the export): refused before any export work, with its size."""
    size = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    if size > ONNX_MAX_BYTES:
        raise StageError(
            f"export: {source} holds {size:,} bytes of weights, over the {ONNX_MAX_BYTES:,} a single "
            "ONNX file can hold (protobuf's limit, 2 GiB); this stage writes one file, so ship "
            "the PyTorch checkpoint (python -m pipeline predict reads it), or choose a smaller "
            "backbone.arch, and run the stages before export: dvc repro evaluate"
        )


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
def parity(
    model: torch.nn.Module, session: Any, loader: torch.utils.data.DataLoader, feed: Callable
) -> dict[str, Any]:
    """Both runtimes on every example of ``loader`` (``feed`` turns a batch into
    onnxruntime's inputs): the largest logit difference and how many examples get a
    different top-1 class."""
    model.eval()
    largest, differ, count = 0.0, 0, 0
    for inputs, _ in progress(loader, "parity"):
        expected = model(inputs).float().numpy()
        got = onnx_logits(session, feed(inputs))
        largest = max(largest, float(np.abs(expected - got).max()))
        differ += int((expected.argmax(1) != got.argmax(1)).sum())
        count += len(inputs)
    return {"examples": count, "max_abs_logit_difference": largest, "top1_disagreements": differ}


def check_parity(result: dict[str, Any], tolerance: float) -> None:
    """Fail unless the runtimes agree within ``tolerance`` and on every top-1 class."""
    problems = []
    largest, differ = result["max_abs_logit_difference"], result["top1_disagreements"]
    if largest > tolerance:
        problems.append(f"max |logit difference| {largest:.3g} > export.tolerance {tolerance:g}")
    if differ:
        problems.append(f"{differ} of {result['examples']} test examples get another top-1 class")
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
    check_fits_one_onnx_file(model, FINETUNED_FILE)
    loader = inference_loader(
        "test",
        checkpoint,
        params["extract"]["batch_size"],
        params["data"]["num_workers"],
        torch.device("cpu"),
    )
    feed = modalities.for_checkpoint(checkpoint).onnx_feed
    with atomic_path(ONNX_FILE) as staged:  # the model first, then the sidecar that pins its hash
        inputs = export_onnx(model, checkpoint, staged)
        opset = onnx_opset(staged)
        result = parity(model, onnx_session(staged), loader, feed)
        check_parity(result, tolerance)
        onnx_hash = file_sha256(staged)
    sidecar = onnx_sidecar(checkpoint, inputs, file_sha256(FINETUNED_FILE), onnx_hash, opset)
    write_json(sidecar_path(ONNX_FILE), sidecar)
    largest = float(f"{result['max_abs_logit_difference']:.3g}")  # 3 digits: diffs show real changes
    write_json(METRICS_DIR / "export.json", {**result, "max_abs_logit_difference": largest})
    print(
        f"export: {ONNX_FILE} (opset {opset}) agrees with PyTorch on {result['examples']} test examples: "
        f"max |logit difference| {result['max_abs_logit_difference']:.3g} (tolerance {tolerance:g}), "
        f"{result['top1_disagreements']} top-1 disagreements"
    )


if __name__ == "__main__":
    run_stage(main, "export")
