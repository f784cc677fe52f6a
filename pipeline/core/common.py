"""What every stage shares: paths, atomic writes, seeding and device choice.

torch is imported inside the functions that use it, so a stage that needs none (report)
starts in a second rather than the several that importing torch takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import ParamsError, StageError

if TYPE_CHECKING:
    import torch

# Every path the stages read or write, named once; dvc.yaml declares the same paths.
PREPARED_DIR = Path("data/prepared")
FEATURES_DIR = Path("data/features")
FEATURES_SUMMARY = FEATURES_DIR / "summary.json"  # each split's examples (and truncated texts)
BACKBONE_FILE = Path("models/backbone.pt")
HEAD_FILE = Path("models/head.pt")
FINETUNED_FILE = Path("models/finetuned.pt")
ONNX_FILE = Path("models/model.onnx")  # with models/model.json beside it
METRICS_DIR = Path("metrics")
STAGE_TIMES_DIR = METRICS_DIR / "time"  # <stage>.json: each stage's wall time (core/entry.py)
# dvc.yaml's stages in the order a run goes through them
STAGES = (
    "prepare",
    "backbone",
    "extract",
    "train_head",
    "finetune",
    "baseline",
    "evaluate",
    "export",
    "report",
)
PREDICTIONS_FILE = METRICS_DIR / "test_predictions.csv"  # the fine-tuned model on each test image
PLOTS_DIR = Path("reports/plots")
LIVE_DIR = Path("reports/live")  # dvclive's per-epoch logs, one folder per training stage
FIGURES_DIR = Path("reports/figures")
REPORT_FILE = Path("reports/report.md")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> None:
    """Delete what a killed run (kill -9, out of memory) left beside ``target``: temporaries
    of processes that no longer exist. A live process's temporaries are left alone. A run
    killed between the two renames of a folder swap (``atomic_path``) left the previous
    folder aside in its temporary and none in place: that one is put back first."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        pid = leftover.name.removeprefix(f".{target.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            aside = leftover / f"{target.name}.old"
            if aside.is_dir() and not target.exists():
                aside.rename(target)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds.

    Works for files and directories: a reader never sees a half-written output, and a failed
    run leaves the previous output as it was. The temporary's name carries this process's id,
    so the next write removes what a killed run left.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if staged.is_dir() and target.is_dir():  # two renames: the old one aside, the new in
            old = tmp / f"{target.name}.old"
            target.rename(old)
            try:
                staged.rename(target)
            except BaseException:
                old.rename(target)
                raise
        else:
            os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(path: Path | str, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: Path | str) -> Any:
    """Load a file this pipeline wrote (tensors, plain containers) without unpickling code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run the stage that writes it first (dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_json(path: Path | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels; with
    ``deterministic`` false (params ``deterministic``), let cuDNN time and pick its fastest
    kernels instead, which on a GPU trains faster and may give a rerun slightly different floats."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ParamsError(f"device: unknown device {name!r}; choose one of: auto, cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device: 'cuda' asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ParamsError("device: 'mps' asked for, but torch sees no Apple GPU; use 'auto' or 'cpu'")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What the metrics and the report say a stage computed on: cpu, mps, or cuda with the
    GPU's name (a run's floats depend on it; only a CPU run is bit-exact from run to run)."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def progress(iterable, desc: str):
    """A progress bar on a terminal; silent in logs (``dvc repro`` output, CI)."""
    return tqdm(iterable, desc=desc, unit="batch", leave=False, disable=None)
