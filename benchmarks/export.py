"""Measurement: CPU inference, PyTorch eager vs onnxruntime on the exported graph, in one run.

For each model, builds the classifier the pipeline fine-tunes (backbone + linear head; the
weights do not change the timings), exports it with the export stage's own function, then
times batch 1 (latency, median of ``--repeats`` calls) and batch 64 (throughput, images per
second over ``--repeats // 10`` calls) in both runtimes, on the same thread count. Needs the
export and lite extras. Run from the repository root:
``python -m benchmarks.export [--repeats 50]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import results
from pipeline.core.models import Classifier, build_head
from pipeline.core.onnx_model import onnx_logits, require_onnxruntime
from pipeline.export import export_onnx
from pipeline.modalities.images import onnx_feed
from pipeline.modalities.images.models import build_backbone

MODELS = (("resnet18", 32), ("resnet18", 224), ("efficientnet_lite0", 224))
THROUGHPUT_BATCH = 64


def seconds_per_call(call, images: torch.Tensor, repeats: int) -> list[float]:
    for _ in range(3):
        call(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(images)
        times.append(time.perf_counter() - start)
    return times


def measure(arch: str, size: int, repeats: int) -> dict[str, float]:
    """Latency (ms, batch 1) and throughput (images/s, batch 64) of both runtimes."""
    onnxruntime = require_onnxruntime()
    torch.manual_seed(0)
    backbone, features = build_backbone(arch, image_size=size)
    model = Classifier(backbone, build_head("linear", features, 10, 8, 0.0)).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        preprocessing = {"modality": "images", "image_size": size}  # all the export reads of it
        export_onnx(model, preprocessing, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores as PyTorch
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        @torch.inference_mode()
        def eager(images: torch.Tensor) -> torch.Tensor:
            return model(images)

        def ort(images: torch.Tensor):
            return onnx_logits(session, onnx_feed(images))

        result = {}
        for name, call in (("pytorch", eager), ("onnxruntime", ort)):
            one = torch.randn(1, 3, size, size)
            batch = torch.randn(THROUGHPUT_BATCH, 3, size, size)
            result[f"{name}_latency_ms"] = 1000 * statistics.median(seconds_per_call(call, one, repeats))
            batches = seconds_per_call(call, batch, max(1, repeats // 10))
            result[f"{name}_images_per_s"] = THROUGHPUT_BATCH * len(batches) / sum(batches)
    return result


NAME = "export"


def table(record: dict) -> str:
    """Each model's latency and throughput in both runtimes, from the results file."""
    lines = [
        "| model | input | PyTorch latency (ms) | onnxruntime latency (ms) | speed-up "
        "| PyTorch img/s (batch 64) | onnxruntime img/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['arch']} | {r['size']} px | {r['pytorch_latency_ms']:.2f} "
            f"| {r['onnxruntime_latency_ms']:.2f} "
            f"| {r['pytorch_latency_ms'] / r['onnxruntime_latency_ms']:.2f}x "
            f"| {r['pytorch_images_per_s']:.0f} | {r['onnxruntime_images_per_s']:.0f} "
            f"| {r['onnxruntime_images_per_s'] / r['pytorch_images_per_s']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="batch-1 calls timed per runtime")
    args = parser.parse_args()
    print(f"CPU threads: {torch.get_num_threads()}")
    measured = []
    for arch, size in MODELS:
        speeds = measure(arch, size, args.repeats)
        measured.append(
            {"arch": arch, "size": size, **{key: round(value, 3) for key, value in speeds.items()}}
        )
        print(measured[-1], flush=True)
    print(table(results.save(NAME, f"python -m benchmarks.export --repeats {args.repeats}", measured)))


if __name__ == "__main__":
    main()
