"""Benchmark: the pipeline on a CUDA GPU, in one run.

1. ``steps``: the fine-tuning step at photo size (224 px, batch 64, random images already on
   the GPU), images a second after a warm-up, for resnet50 and efficientnet_lite0: the plain
   PyTorch loop tutorials write (float32, ``loss.item()`` every step) against the pipeline's
   loop (training.train_epoch: ``amp: auto``, i.e. bfloat16 autocast, channels-last, the loss
   summed on the GPU), run as the stages run it (``seed_everything``: deterministic kernels)
   and without deterministic kernels (what they cost).
2. ``loop``: benchmarks/loop_speed.py on the GPU: the fine-tuning loop fed from 640
   generated 500x375 JPEGs (``data.num_workers: auto``) against the same step on images
   already on the GPU, at 224 px, for both backbones.
3. ``loaders``: does the photo augmentation keep the GPU fed? cifar10-dev's photos decoded and
   augmented by finetune's photo policy at 96 px (the own-photos recipe) in N DataLoader
   workers: images a second of the loader alone, and of the whole loop (that loader feeding
   the pipeline's training step of EfficientNet-Lite0 on the GPU), for N = 2 (the committed
   ``data.num_workers``) and more, after a warm-up pass of the loop at that size.
4. ``cached``: benchmarks/cached_features.py on the GPU: the head trained on cached features
   against the plain loop that runs the frozen backbone every epoch.
5. ``runs``: ``dvc repro`` in a temporary DVC repository of the committed params.yaml (the
   digits demo) and of the README's own-photos flags on cifar10-dev (Lite0, IMAGENET1K_V1,
   96 px), with ``device: auto``, which picks the GPU: the wall time and each stage's, the fine-tuning stage's
   images a second, the test accuracies, and whether ``dvc repro -f -s finetune`` then gives
   the same weights (deterministic kernels on the GPU).

Writes benchmarks/results/gpu.json (after each part, so a part cut short keeps the others).
Needs a CUDA GPU, the lite extra and cifar10-dev. Run from the repository root:
``python -m benchmarks.gpu [--photos ../shared/data/cifar10-dev] [--parts steps loop loaders cached runs]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks import augment_speed, cached_features, loop_speed, results
from benchmarks.finetune_recipes import CIFAR10_DEV, SETS, base_params, sync_code
from benchmarks.loop_speed import fresh_classifier, wait_for
from benchmarks.run_cache import dvc_env
from pipeline.core.common import file_sha256, seed_everything
from pipeline.core.entry import recorded_stage_times
from pipeline.core.loaders import make_loader
from pipeline.core.training import grad_scaler, train_epoch
from pipeline.modalities.images.models import build_backbone

NAME = "gpu"
ROOT = results.ROOT
PARTS = ("steps", "loop", "loaders", "cached", "runs")
RUNS = ("digits", "photos")
PHOTO_SET = "cifar10-dev"  # benchmarks.finetune_recipes' set: its folder and own-photos flags


def plain_loop_speed(model: nn.Module, batches: list, device: torch.device) -> float:
    """Images a second of the textbook loop over ``batches`` (the first three warm up)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    running = 0.0
    for index, (images, labels) in enumerate(batches):
        if index == 3:
            wait_for(device)
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()
    wait_for(device)
    return sum(len(labels) for _, labels in batches[3:]) / (time.perf_counter() - start)


def pipeline_loop_speed(model: nn.Module, data: TensorDataset, batch: int, device: torch.device) -> float:
    """Images a second of training.train_epoch over ``data`` (after a three-batch warm-up)."""
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler, loss = grad_scaler(device, "auto"), nn.CrossEntropyLoss()
    # Built with the CPU's settings: the images are already on the GPU (nothing to pin).
    warmup = make_loader(torch.utils.data.Subset(data, range(3 * batch)), batch, torch.device("cpu"))
    timed = torch.utils.data.Subset(data, range(3 * batch, len(data)))
    loader = make_loader(timed, batch, torch.device("cpu"))
    train_epoch(model, warmup, loss, device, optimizer, scaler, amp="auto")
    wait_for(device)
    start = time.perf_counter()
    train_epoch(model, loader, loss, device, optimizer, scaler, amp="auto")
    wait_for(device)
    return len(timed) / (time.perf_counter() - start)


def step_speeds(
    device: torch.device,
    steps: int,
    batch: int = 64,
    size: int = 224,
    archs: tuple[str, ...] = ("resnet50", "efficientnet_lite0"),
) -> list[dict[str, Any]]:
    """Each architecture's images a second in the plain loop and the pipeline's, with and
    without deterministic kernels."""
    images = torch.rand(batch * (steps + 3), 3, size, size, device=device)
    labels = torch.randint(0, 10, (len(images),), device=device)
    batches = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(images), batch)]
    rows = []
    for arch in archs:
        torch.use_deterministic_algorithms(False)  # torch's defaults
        torch.backends.cudnn.benchmark = False
        plain = plain_loop_speed(fresh_classifier(arch, size), batches, device)
        seed_everything(0)  # what backbone and finetune do first: deterministic kernels
        ours = pipeline_loop_speed(fresh_classifier(arch, size), TensorDataset(images, labels), batch, device)
        seed_everything(0, deterministic=False)  # params deterministic: false
        free = pipeline_loop_speed(fresh_classifier(arch, size), TensorDataset(images, labels), batch, device)
        torch.backends.cudnn.benchmark = False
        rows.append(
            {
                "arch": arch,
                "size": size,
                "batch": batch,
                "plain_fp32": round(plain, 1),
                "pipeline": round(ours, 1),
                "pipeline_nondeterministic": round(free, 1),
            }
        )
        print(f"gpu: steps: {rows[-1]}", flush=True)
    return rows


def warm_up(
    model: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: int,
    size: int,
    batches: int = 3,
) -> None:
    """Train ``model`` on a few batches of random images of the timed loop's shape first, so
    the one-time start-up at that size (kernel loading, cuDNN's first calls, the allocator
    growing) falls outside every timed row instead of inside the first."""
    images = torch.rand(batch * batches, 3, size, size, device=device)
    labels = torch.randint(0, 10, (len(images),), device=device)
    # Built with the CPU's settings: the images are already on the device (nothing to pin).
    data = make_loader(TensorDataset(images, labels), batch, torch.device("cpu"))
    train_epoch(model, data, nn.CrossEntropyLoss(), device, optimizer, scaler, amp="auto")
    wait_for(device)


def loader_speeds(
    device: torch.device, photos: Path, workers: list[int], epochs: int, batch: int = 64
) -> list[dict[str, Any]]:
    """For each worker count: the photo policy's loader alone, and the loop it feeds on the GPU
    (after a warm-up at its size)."""
    seed_everything(0)
    model = fresh_classifier("efficientnet_lite0", augment_speed.SIZE)
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler, loss = grad_scaler(device, "auto"), nn.CrossEntropyLoss()
    warm_up(model, device, optimizer, scaler, batch, augment_speed.SIZE)
    rows = []
    for count in workers:
        data = augment_speed.loader("photo", count, batch, photos=photos, device=device.type)
        alone = augment_speed.images_per_second(data, epochs)
        start, seen = time.perf_counter(), 0
        for epoch in range(epochs):
            data.dataset.set_epoch(epoch)
            seen += len(data.dataset)
            train_epoch(model, data, loss, device, optimizer, scaler, amp="auto")
        wait_for(device)
        rows.append(
            {
                "workers": count,
                "loader_images_per_second": alone,
                "training_images_per_second": round(seen / (time.perf_counter() - start), 1),
                "warmed_up": True,
            }
        )
        print(f"gpu: loaders: {rows[-1]}", flush=True)
    return rows


def cached_speeds(device: torch.device, epochs: int = 30) -> dict[str, float]:
    """benchmarks/cached_features.py's two methods, on ``device``."""
    seed_everything(0)
    backbone, _ = build_backbone("resnet18")
    data = cached_features.datasets(32)
    ours, extraction = cached_features.cached(backbone, data, epochs, device)
    plain = cached_features.plain_loop(backbone, data, epochs, device)
    row = {"epochs": epochs, "plain_seconds": round(plain, 2), "pipeline_seconds": round(ours, 2)}
    row["extraction_seconds"] = round(extraction, 2)
    print(f"gpu: cached: {row}", flush=True)
    return row


def dvc(repo: Path, *args: str) -> str:
    """``dvc <args>`` in ``repo`` with this interpreter (its ``python`` first on the PATH)."""
    command = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(command, cwd=repo, env=dvc_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed in {repo}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def run_repo(work: Path, params: dict[str, Any], photos: Path | None) -> Path:
    """A DVC repository (no git: none is needed to reproduce) with this checkout's pipeline."""
    repo = work / ("photos" if photos else "digits")
    for folder in ("raw", "weights"):
        shutil.copytree(ROOT / "data" / folder, repo / "data" / folder)
    if photos is not None:
        target = repo / "data" / "raw" / SETS[PHOTO_SET]["folder"]
        shutil.copytree(photos, target, ignore=shutil.ignore_patterns("README*"))
    sync_code(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "init", "--no-scm", "-q")
    return repo


def pipeline_run(work: Path, params: dict[str, Any], photos: Path | None) -> dict[str, Any]:
    """One whole ``dvc repro``, then finetune again: seconds, speed, accuracy, same weights?"""
    repo = run_repo(work, params, photos)
    start = time.perf_counter()
    dvc(repo, "repro")
    seconds = time.perf_counter() - start
    stage_seconds = {stage: timing["seconds"] for stage, timing in recorded_stage_times(repo).items()}
    first = file_sha256(repo / "models" / "finetuned.pt")
    dvc(repo, "repro", "-f", "-s", "finetune")
    test = json.loads((repo / "metrics" / "test.json").read_text())
    speed = json.loads((repo / "metrics" / "finetune_time.json").read_text())["finetune"]
    summary = json.loads((repo / "reports" / "live" / "finetune" / "metrics.json").read_text())["finetune"]
    row = {
        "run": "photos" if photos else "digits",
        "device": summary["device"],
        "seconds": round(seconds, 1),
        "finetune_seconds": speed["seconds"],
        "stage_seconds": stage_seconds,  # each stage's wall time, start-up included
        "finetune_images_per_second": speed["examples_per_second"],
        "probe": test["linear_probe"]["accuracy"],
        "finetuned": test["finetuned"]["accuracy"],
        "same_weights_again": file_sha256(repo / "models" / "finetuned.pt") == first,
    }
    print(f"gpu: runs: {row}", flush=True)
    return row


def run_params(name: str, photos: Path) -> tuple[dict[str, Any], Path | None]:
    """The params and photos of run ``name``: digits (committed params) or photos."""
    if name == "digits":
        return yaml.safe_load((ROOT / "params.yaml").read_text()), None
    return base_params(PHOTO_SET), photos  # the committed params with the own-photos flags


def where(record: dict) -> str:
    r = record["results"]
    return f"{r['gpu']}, torch {r['torch']}"


def table(record: dict, part: str = "steps") -> str:
    """One part's table (steps, loop, loaders, cached, runs), from the results file."""
    r = record["results"]
    if part == "loop":
        return loop_speed.table(record)
    if part == "steps":
        lines = [
            f"| fine-tuning step, {where(record)} | plain loop, float32 | pipeline | "
            "pipeline, no deterministic kernels |",
            "|---|---:|---:|---:|",
        ]
        for row in r["steps"]:
            lines.append(
                f"| {row['arch']}, {row['size']} px, batch {row['batch']} (images/s) "
                f"| {row['plain_fp32']:.0f} | {row['pipeline']:.0f} "
                f"({row['pipeline'] / row['plain_fp32']:.2f}x) "
                f"| {row['pipeline_nondeterministic']:.0f} "
                f"({row['pipeline_nondeterministic'] / row['plain_fp32']:.2f}x) |"
            )
    elif part == "loaders":
        lines = [
            f"| DataLoader workers ({where(record)}) | loader alone (images/s) | training loop (images/s) |",
            "|---:|---:|---:|",
        ]
        for index, row in enumerate(r["loaders"]):
            # Rows measured before warm_up existed: the first one carries the start-up.
            first = " (the run's first pass at 96 px)" if index == 0 and not row.get("warmed_up") else ""
            lines.append(
                f"| {row['workers']} | {row['loader_images_per_second']:.0f} "
                f"| {row['training_images_per_second']:.0f}{first} |"
            )
    elif part == "cached":
        c = r["cached"]
        lines = [
            f"| method ({where(record)}) | seconds |",
            "|---|---:|",
            f"| plain PyTorch loop (backbone forward every epoch) | {c['plain_seconds']:.1f} |",
            f"| pipeline: extract once ({c['extraction_seconds']:.1f} s) + head on cached features "
            f"| {c['pipeline_seconds']:.1f} |",
            f"| speed-up | {c['plain_seconds'] / c['pipeline_seconds']:.1f}x |",
        ]
    else:
        lines = [
            f"| `dvc repro` ({where(record)}) | seconds | of which fine-tuning | fine-tuning (images/s) "
            "| probe | fine-tuned | finetune again: same weights |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        names = {"digits": "committed params.yaml (digits)", "photos": "own-photos flags, cifar10-dev"}
        for row in r["runs"]:
            lines.append(
                f"| {names[row['run']]} | {row['seconds']:.0f} | {row['finetune_seconds']:.0f} "
                f"| {row['finetune_images_per_second']:.0f} "
                f"| {row['probe']:.2%} | {row['finetuned']:.2%} "
                f"| {'yes' if row['same_weights_again'] else 'no'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=CIFAR10_DEV, help="cifar10-dev's train/ and test/")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop (after 3 warm-up steps)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--epochs", type=int, default=3, help="passes over the photos per worker count")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: torch sees no CUDA GPU; run it on a machine with one")
    if not (args.photos / "train").is_dir():
        raise SystemExit(f"--photos {args.photos}: no train/ folder; give cifar10-dev's folder")
    device = torch.device("cuda")
    measured = results.load(NAME)["results"] if results.path_of(NAME).is_file() else {}
    measured.update(gpu=torch.cuda.get_device_name(device), torch=torch.__version__.split("+")[0])
    command = "python -m benchmarks.gpu"
    for part in args.parts:
        if part == "steps":
            measured["steps"] = step_speeds(device, args.steps)
        elif part == "loop":
            measured["loop"] = loop_speed.loop_rows(device, photos=640, epochs=2)
        elif part == "loaders":
            measured["loaders"] = loader_speeds(device, args.photos, args.workers, args.epochs)
        elif part == "cached":
            measured["cached"] = cached_speeds(device)
        else:
            for name in args.runs:  # each saved as it ends: a run cut short keeps the other
                with tempfile.TemporaryDirectory() as work:
                    row = pipeline_run(Path(work), *run_params(name, args.photos))
                kept = [old for old in measured.get("runs", []) if old["run"] != name]
                measured["runs"] = sorted([*kept, row], key=lambda r: RUNS.index(r["run"]))
                results.save(NAME, command, measured)
        results.save(NAME, command, measured)
    record = results.load(NAME)
    for part in PARTS:
        if part in record["results"]:
            print(table(record, part), end="\n\n")


if __name__ == "__main__":
    main()
