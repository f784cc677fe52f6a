"""Benchmark: the pipeline's training step in 1 vs N processes (DistributedDataParallel).

Each run spawns the processes (gloo on CPUs, nccl on GPUs), trains ``--arch`` at ``--size``
px on synthetic images with the pipeline's own loop (training.train_epoch, the global batch
split by distributed.GlobalBatchSampler) and reports images per second after a warm-up, and
the scaling efficiency throughput(N) / (N x throughput(1)). On CPUs the cores are shared
out (each of N processes gets cores / N threads), so the figure is what more processes buy
on the same machine. With ``--gpu-precision`` on a CUDA machine it also compares, on every
GPU, bfloat16 autocast with channels-last against plain float32 (resnet50 at 224 px).
Run from the repository root: ``python -m benchmarks.distributed [--processes 2]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks import results
from pipeline.core.distributed import GlobalBatchSampler, Ranks, parallel, split_batch
from pipeline.core.loaders import make_loader
from pipeline.core.models import Classifier
from pipeline.core.training import grad_scaler, train_epoch
from pipeline.modalities.images.models import build_backbone


def worker(rank: int, world: int, args: dict, init_file: str, out: str) -> None:
    """One process: train for ``steps`` global batches after a warm-up; rank 0 notes the time."""
    cuda = args["device"] == "cuda"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if not cuda else 1)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ranks = Ranks(rank, rank, world)
    torch.manual_seed(0)
    backbone, features = build_backbone(args["arch"], image_size=args["size"])
    model = Classifier(backbone, nn.Linear(features, 10)).to(device)
    if args["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = parallel(model, ranks, device, sync_batchnorm=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = grad_scaler(device, args["amp"])
    per_process, _ = split_batch(args["batch"], world, 0, "--batch")
    images = args["batch"] * (args["steps"] + args["warmup"])
    data = TensorDataset(torch.rand(images, 3, args["size"], args["size"]), torch.randint(0, 10, (images,)))
    warmup = make_loader(
        torch.utils.data.Subset(data, range(args["batch"] * args["warmup"])), per_process, device
    )
    timed = torch.utils.data.Subset(data, range(args["batch"] * args["warmup"], images))
    sampler = GlobalBatchSampler(len(timed), args["batch"], ranks, seed=0)
    loader = make_loader(timed, per_process, device, sampler=sampler)
    loss = nn.CrossEntropyLoss()
    train_epoch(model, warmup, loss, device, optimizer, scaler, amp=args["amp"])
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    train_epoch(model, loader, loss, device, optimizer, scaler, amp=args["amp"])
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        Path(out).write_text(str(time.perf_counter() - start))
    dist.destroy_process_group()


def images_per_second(world: int, **args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds"
        mp.spawn(worker, args=(world, args, str(Path(tmp) / "init"), str(out)), nprocs=world, join=True)
        return args["batch"] * args["steps"] / float(out.read_text())


NAME = "distributed"


def table(record: dict) -> str:
    """Images a second in 1 and N processes, and the scaling efficiency, from the results file."""
    r = record["results"]
    lines = [
        f"| processes ({r['where']}, {r['backend']}) | images/s |",
        "|---:|---:|",
        f"| 1 | {r['one']:.1f} |",
        f"| {r['processes']} | {r['many']:.1f} |",
        f"| scaling efficiency | {r['many'] / (r['processes'] * r['one']):.2f} |",
    ]
    if "gpu_bf16" in r:
        lines.append(
            f"| resnet50, 224 px, bf16 channels-last vs fp32 | {r['gpu_bf16']:.0f} vs {r['gpu_fp32']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--processes", type=int, default=2, help="N, compared with 1")
    parser.add_argument(
        "--gpu-precision", action="store_true", help="also bf16 channels-last vs fp32 on GPUs"
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps, "warmup": 3}
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{os.cpu_count()}-core CPU"
    measured = {
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "where": where,
        "backend": "nccl" if device == "cuda" else "gloo",
        "processes": args.processes,
        "one": round(images_per_second(1, device=device, amp="auto", channels_last=True, **common), 1),
        "many": round(
            images_per_second(args.processes, device=device, amp="auto", channels_last=True, **common), 1
        ),
    }
    if args.gpu_precision and device == "cuda":
        gpus = torch.cuda.device_count()
        big = {"arch": "resnet50", "size": 224, "batch": 64 * gpus, "steps": args.steps, "warmup": 3}
        measured["gpu_bf16"] = images_per_second(
            gpus, device=device, amp="bfloat16", channels_last=True, **big
        )
        measured["gpu_fp32"] = images_per_second(gpus, device=device, amp="off", channels_last=False, **big)
    flags = " --gpu-precision" if args.gpu_precision else ""
    command = f"python -m benchmarks.distributed --processes {args.processes}{flags}"
    print(table(results.save(NAME, command, measured)))


if __name__ == "__main__":
    main()
