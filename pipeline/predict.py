"""Predict the classes of new images with the fine-tuned model, or with its ONNX export.

    python -m pipeline.predict photos/ more/cat.jpg --out predictions.csv
    python -m pipeline.predict photos/ --onnx models/model.onnx --top-k 5

Takes image files and folders (searched recursively for files with an image extension) and
writes a CSV, to stdout or ``--out``: each file's path, its ``--top-k`` classes with their
probabilities, and an error where the file could not be read (a row, not a crash). The
preprocessing is the one evaluate used, read from the model file, so no params are needed.
Exits 0 if any image was predicted, 1 if none could be, 2 on bad arguments or model files.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.core.common import FINETUNED_FILE, progress, resolve_device, write_text
from pipeline.core.entry import run_tool
from pipeline.core.errors import ParamsError, StageError
from pipeline.core.params import DEVICES
from pipeline.modalities import load_classifier
from pipeline.modalities.image_data import checkpoint_transform, is_image_file, read_rgb


def image_files(paths: list[str]) -> tuple[list[Path], int]:
    """The files to predict, in the order given (folders sorted, recursively), and how many
    non-image files the folders held. A missing path fails before any work."""
    files, others = [], 0
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            images = [p for p in found if is_image_file(p)]
            files += images
            others += len(found) - len(images)
        elif path.is_file():
            files.append(path)  # named explicitly: tried whatever its extension
        else:
            raise StageError(f"{name}: no such file or folder")
    return files, others


class ImagesToPredict(Dataset):
    """Each file as (its position, the preprocessed image or None, the error reading it)."""

    def __init__(self, files: list[Path], transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(read_rgb(self.files[index])), ""
        except Exception as error:  # any unreadable file becomes a row with its reason
            return index, None, f"{type(error).__name__}: {error}".replace("\n", " ")


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, dict]:
    """The readable images stacked, with their positions, and the others' errors by position."""
    readable = [(index, image) for index, image, _ in items if image is not None]
    errors = {index: error for index, image, error in items if image is None}
    images = torch.stack([image for _, image in readable]) if readable else None
    return [index for index, _ in readable], images, errors


def torch_predictor(model_file: Path, device_name: str) -> tuple[dict[str, Any], Callable]:
    """The fine-tuned checkpoint's metadata, and a function from an image batch to probabilities."""
    model, checkpoint = load_classifier(model_file)
    device = resolve_device(device_name)
    model.eval().to(device)

    @torch.inference_mode()
    def probabilities(images: torch.Tensor) -> np.ndarray:
        return torch.softmax(model(images.to(device)).float(), dim=1).cpu().numpy()

    return checkpoint, probabilities


def onnx_predictor(onnx_file: Path) -> tuple[dict[str, Any], Callable]:
    """The export's sidecar (classes, preprocessing), and a function from an image batch to
    probabilities through onnxruntime."""
    from pipeline.core.checkpoints import read_sidecar
    from pipeline.core.onnx_model import onnx_logits, onnx_session
    from pipeline.modalities import for_checkpoint

    meta = read_sidecar(onnx_file)
    session = onnx_session(onnx_file)

    def probabilities(images: torch.Tensor) -> np.ndarray:
        logits = onnx_logits(session, for_checkpoint(meta).onnx_feed(images))
        return torch.softmax(torch.from_numpy(logits), dim=1).numpy()

    return meta, probabilities


def top_k_rows(probabilities: np.ndarray, classes: list[str], k: int) -> list[list[str]]:
    """Per image: the ``k`` likeliest classes and their probabilities, likeliest first."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [cell for j in row for cell in (classes[j], f"{probabilities[i, j]:.6f}")]
        for i, row in enumerate(order)
    ]


def predictions_csv(files: list[Path], rows: dict[int, list[str]], errors: dict[int, str], k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["path"] + [f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability")]
    writer.writerow([*header, "error"])
    for index, path in enumerate(files):
        writer.writerow([str(path), *rows.get(index, [""] * 2 * k), errors.get(index, "")])
    return buffer.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)"
    )
    parser.add_argument(
        "--model", type=Path, default=FINETUNED_FILE, help=f"fine-tuned checkpoint (default {FINETUNED_FILE})"
    )
    parser.add_argument("--onnx", type=Path, help="predict with this ONNX export (models/model.onnx) instead")
    parser.add_argument("--out", type=Path, help="write the CSV here instead of stdout")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image, likeliest first (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto | cpu | cuda | mps (PyTorch model only)"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace, classes: list[str]) -> None:
    if not 1 <= args.top_k <= len(classes):
        raise ParamsError(f"--top-k: must be 1 to {len(classes)} (the model's classes), got {args.top_k}")
    if args.batch_size < 1:
        raise ParamsError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise ParamsError(f"--num-workers: must be 0 or more, got {args.num_workers}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files, others = image_files(args.paths)
    if not files:
        raise StageError(f"no image files in {', '.join(args.paths)}")
    meta, probabilities = onnx_predictor(args.onnx) if args.onnx else torch_predictor(args.model, args.device)
    check_args(args, meta["classes"])
    dataset = ImagesToPredict(files, checkpoint_transform(meta))
    workers = min(args.num_workers, len(files) // args.batch_size + 1)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=collate)
    rows: dict[int, list[str]] = {}
    errors: dict[int, str] = {}
    for indices, images, failed in progress(loader, "predict"):
        errors.update(failed)
        if images is not None:
            rows.update(
                zip(indices, top_k_rows(probabilities(images), meta["classes"], args.top_k), strict=True)
            )
    table = predictions_csv(files, rows, errors, args.top_k)
    if args.out:
        write_text(args.out, table)
    else:
        sys.stdout.write(table)
    skipped = f"; {others} non-image file(s) in the folders skipped" if others else ""
    print(f"predict: {len(rows)} of {len(files)} image(s) predicted{skipped}", file=sys.stderr)
    if not rows:
        first = next(iter(errors.items()))
        print(
            f"error: none of the {len(files)} file(s) could be read as an image "
            f"(first: {files[first[0]]}: {first[1]})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    run_tool(main)
