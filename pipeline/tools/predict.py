"""Predict the classes of new images or texts with the fine-tuned model, or its ONNX export.

    python -m pipeline predict photos/ more/cat.jpg --out predictions.csv
    python -m pipeline predict photos/ --onnx models/model.onnx --top-k 5
    python -m pipeline predict news.csv --text-column body        # a text model
    python -m pipeline predict --text "Stocks fell sharply" notes.txt -

For an image model: image files and folders (searched recursively for files with an image
extension). For a text model: ``--text`` arguments, and files: CSV, TSV or JSON Lines (their
``--text-column``), ``-`` for standard input, or any other file, one text a line. Writes a
CSV, to stdout or ``--out``: each input (an image's path; a text's source, file:line, and
the text), its ``--top-k`` classes with their probabilities, and an error where the input
could not be read (a row, not a crash). The preprocessing (image size and normalisation;
the tokenizer and its length) is the one evaluate used, read from the model file, so no
params are needed. Exits 0 if any input was predicted, 1 if none could be, 2 on bad
arguments or model files.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.core.checkpoints import read_classifier, read_sidecar
from pipeline.core.common import FINETUNED_FILE, progress, resolve_device, write_text
from pipeline.core.data import PredictInputs, PredictRequest
from pipeline.core.entry import run_tool
from pipeline.core.errors import ParamsError
from pipeline.core.params import DEVICES
from pipeline.modalities import classifier_from_checkpoint, for_checkpoint


def collate(
    stack: Callable, items: list[tuple[int, torch.Tensor | None, str]]
) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """The readable inputs as one batch (``stack``), with their positions, and the others'
    errors by position."""
    readable = [(index, value) for index, value, _ in items if value is not None]
    errors = {index: error for index, value, error in items if value is None}
    batch = stack([value for _, value in readable]) if readable else None
    return [index for index, _ in readable], batch, errors


def torch_predictor(checkpoint: dict[str, Any], device_name: str) -> Callable[[torch.Tensor], np.ndarray]:
    """A function from a batch to probabilities, through the fine-tuned PyTorch model."""
    model = classifier_from_checkpoint(checkpoint)
    device = resolve_device(device_name)
    model.eval().to(device)

    @torch.inference_mode()
    def probabilities(batch: torch.Tensor) -> np.ndarray:
        return torch.softmax(model(batch.to(device)).float(), dim=1).cpu().numpy()

    return probabilities


def onnx_predictor(onnx_file: Path, meta: dict[str, Any]) -> Callable[[torch.Tensor], np.ndarray]:
    """A function from a batch to probabilities, through onnxruntime."""
    from pipeline.core.onnx_model import onnx_logits, onnx_session

    session = onnx_session(onnx_file)
    feed = for_checkpoint(meta).onnx_feed

    def probabilities(batch: torch.Tensor) -> np.ndarray:
        return torch.softmax(torch.from_numpy(onnx_logits(session, feed(batch))), dim=1).numpy()

    return probabilities


def top_k_rows(probabilities: np.ndarray, classes: list[str], k: int) -> list[list[str]]:
    """Per image: the ``k`` likeliest classes and their probabilities, likeliest first."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [cell for j in row for cell in (classes[j], f"{probabilities[i, j]:.6f}")]
        for i, row in enumerate(order)
    ]


def predictions_csv(
    columns: dict[str, list[str]], rows: dict[int, list[str]], errors: dict[int, str], k: int
) -> str:
    """One row per input: its own ``columns``, the top-k classes and probabilities, the error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ranks = [f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability")]
    writer.writerow([*columns, *ranks, "error"])
    for index, own in enumerate(zip(*columns.values(), strict=True)):
        writer.writerow([*own, *rows.get(index, [""] * 2 * k), errors.get(index, "")])
    return buffer.getvalue()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline predict", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="image files or folders (searched recursively); for a text model, files of texts or - (stdin)",
    )
    parser.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    parser.add_argument(
        "--text-column", default="text", help="the column (JSON key) of a CSV, TSV or JSONL file's texts"
    )
    parser.add_argument(
        "--model", type=Path, default=FINETUNED_FILE, help=f"fine-tuned checkpoint (default {FINETUNED_FILE})"
    )
    parser.add_argument("--onnx", type=Path, help="predict with this ONNX export (models/model.onnx) instead")
    parser.add_argument("--out", type=Path, help="write the CSV here instead of stdout")
    parser.add_argument("--top-k", type=int, default=3, help="classes per input, likeliest first (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto | cpu | cuda | mps (PyTorch model only)"
    )
    return parser


def check_args(args: argparse.Namespace, classes: list[str]) -> None:
    if not 1 <= args.top_k <= len(classes):
        raise ParamsError(f"--top-k: must be 1 to {len(classes)} (the model's classes), got {args.top_k}")
    if args.batch_size < 1:
        raise ParamsError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ParamsError(f"--num-workers: must be 0 or more, got {args.num_workers}")


def read_all(
    inputs: PredictInputs, probabilities: Callable, args: argparse.Namespace, classes: list[str]
) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Each readable input's top-k cells, and each other input's error, by position."""
    workers = min(args.num_workers, len(inputs.dataset) // args.batch_size + 1) if inputs.reads_files else 0
    loader = DataLoader(
        inputs.dataset,
        batch_size=args.batch_size,
        sampler=inputs.order,
        num_workers=workers,
        collate_fn=functools.partial(collate, inputs.stack),
    )
    rows: dict[int, list[str]] = {}
    errors: dict[int, str] = {}
    for indices, batch, failed in progress(loader, "predict"):
        errors.update(failed)
        if batch is not None:
            rows.update(zip(indices, top_k_rows(probabilities(batch), classes, args.top_k), strict=True))
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    meta = read_sidecar(args.onnx) if args.onnx else read_classifier(args.model)
    check_args(args, meta["classes"])
    request = PredictRequest(args.paths, args.text, args.text_column)
    inputs = for_checkpoint(meta).predict_inputs(request, meta)
    probabilities = onnx_predictor(args.onnx, meta) if args.onnx else torch_predictor(meta, args.device)
    rows, errors = read_all(inputs, probabilities, args, meta["classes"])
    table = predictions_csv(inputs.columns, rows, errors, args.top_k)
    if args.out:
        write_text(args.out, table)
    else:
        sys.stdout.write(table)
    total = len(inputs.dataset)
    notes = "".join(f"; {note}" for note in inputs.notes)
    print(f"predict: {len(rows)} of {total} {inputs.items} predicted{notes}", file=sys.stderr)
    if not rows:
        index, error = min(errors.items())
        source = next(iter(inputs.columns.values()))[index]
        print(
            f"error: none of the {total} {inputs.unreadable} (first: {source}: {error})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    run_tool(main)
