"""Shared fixtures: tiny params, and temporary git+dvc repositories that run the pipeline.

The whole-pipeline tests share three runs, each made once per session: ``tiny_run`` (the
tiny image pipeline, committed and pushed to a local DVC remote), ``lr_sweep`` (two queued
fine-tuning rates on top of it, run by a DVC queue worker) and ``tiny_text_run`` (the
pipeline on generated sentences with a tiny BERT, made here: no download). Tests that
change a repository work on a copy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]

# Small enough that a whole `dvc repro` takes about a minute on 2 CPU cores. The backbone
# barely learns its 400 glyphs; fine-tuning it with BatchNorm statistics following 32-image
# batches for 14 steps leaves val accuracy near chance, so the tiny run keeps them frozen.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "data": {"max_train_per_class": 20},
    "backbone": {"image_size": 16, "pretrain_images": 400, "pretrain_epochs": 1, "pretrain_batch_size": 64},
    "head": {"max_epochs": 15, "patience": 5},
    "finetune": {"epochs": 2, "batch_size": 32, "bn": "frozen"},
}
# The README's sweep syntax, with two of its three rates (each rate that runs costs the suite
# half a minute): 1e-3 is the committed rate, restored whole; 1e-5 reruns finetune onward.
SWEEP = "lr=1e-3,1e-5"
# The test files that take longest, longest first; the others follow in collection order.
# pytest-xdist hands each worker whole files in this order (pyproject.toml: --dist loadfile,
# --no-loadscope-reorder), so the two workers start by making the two shared runs side by
# side (tiny_text_run for the first file, tiny_run for the second) instead of one waiting on
# the other's lock, and the quick files even out the end.
LONGEST_FIRST = (
    "test_launch.py",
    "test_text_pipeline.py",
    "test_pipeline.py",
    "test_docs.py",
    "test_distributed.py",
    "test_compare.py",
    "test_finetune.py",
    "test_architectures.py",
    "test_stage_params.py",
    "test_image_data.py",
    "test_text.py",
    "test_benchmarks.py",
    "test_image_models.py",
    "test_predict.py",
    "test_export.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names no such test file: {missing}")
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


def default_params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def tiny_params() -> dict[str, Any]:
    params = default_params()
    for section, values in TINY_OVERRIDES.items():
        params[section].update(values)
    return params


def threads_per_worker() -> int:
    """The cores each pytest-xdist worker may use: torch takes every core by default, and
    two workers (each with a stage process) taking both of 2 cores slow each other down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(threads_per_worker())


def subprocess_env() -> dict[str, str]:
    """The environment for dvc and the stages: this interpreter's python first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(threads_per_worker()))
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    return env


def run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=repo, env=subprocess_env(), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def start_in(repo: Path, *args: str) -> subprocess.Popen:
    """``args`` started in ``repo``, in a session of its own (os.killpg ends it whole), its
    output piped as text; ``communicate()`` reaps it."""
    return subprocess.Popen(
        args,
        cwd=repo,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stale_stages(repo: Path) -> dict[str, list[str]]:
    """What in ``repo``'s dvc.lock does not describe its work tree: a stage's code or params
    changed since, or a metric or report kept in git that is not the locked one. Outputs
    kept in the DVC cache may be absent (a fresh clone has no cache)."""
    status = json.loads(run(repo, "dvc", "status", "--json").stdout or "{}")
    stale: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):
                stale.setdefault(stage, []).append(change)
                continue
            for dep, state in change.get("changed deps", {}).items():
                if dep.startswith(("pipeline/", "params.yaml")) or state != "deleted":
                    stale.setdefault(stage, []).append(f"{dep}: {state}")
            for out, state in change.get("changed outs", {}).items():
                if state == "modified":  # a committed metric or report that is not the locked one
                    stale.setdefault(stage, []).append(f"{out}: {state}")
    return stale


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows (read whole, so no file stays open), e.g. test_predictions.csv's."""
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def write_params(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_params(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "params.yaml").read_text())


def make_pipeline_repo(path: Path, params: dict[str, Any]) -> Path:
    """A git+dvc repository holding the pipeline, its CI scripts and ``params``, committed."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".ci", path / ".ci")
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    for folder in ("raw", "weights"):
        shutil.copytree(ROOT / "data" / folder, path / "data" / folder, dirs_exist_ok=True)
    write_params(path, params)
    run(path, "git", "init", "-q", "-b", "main")
    run(path, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvcignore", path / ".dvcignore")  # no bytecode in the modality deps' hashes
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-q", "-m", "pipeline")
    return path


def copy_repo(source: Path, target: Path) -> Path:
    """A private copy of a repository: git history, DVC cache and config included."""
    return Path(shutil.copytree(source, target, symlinks=True))


def ran_stages(output: str) -> list[str]:
    """Stage names that `dvc repro` or `dvc exp run` ran, in order, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def restored_stages(output: str) -> list[str]:
    """Stage names that DVC restored from the run-cache instead of running."""
    return [line.split("'")[1] for line in output.splitlines() if "is cached - skipping run" in line]


@dataclass(frozen=True)
class Run:
    """A repository and what one DVC command printed there, and how long it took."""

    repo: Path
    output: str
    seconds: float


def timed(repo: Path, *args: str) -> Run:
    start = time.perf_counter()
    result = run(repo, *args)
    return Run(repo, result.stdout + result.stderr, time.perf_counter() - start)


def make_tiny_run(root: Path) -> Run:
    """The tiny pipeline run, committed, and pushed with its run-cache to a local DVC remote
    (a directory; the same commands work for S3, GCS, Azure or SSH)."""
    repo = make_pipeline_repo(root / "repo", tiny_params())
    run(repo, "dvc", "remote", "add", "-d", "storage", str(root / "remote"))
    run(repo, "git", "commit", "-q", "-am", "Add a DVC remote")
    full = timed(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "run")
    run(repo, "dvc", "push", "--run-cache")
    return full


def shared_run(
    name: str, make: Callable[[Path], Run], factory: pytest.TempPathFactory, worker_id: str
) -> Run:
    """A run made once for the whole session. Under pytest-xdist (the suite's two workers,
    pyproject.toml) the first worker to need it makes it in the session's shared temporary
    folder while the other waits on a file lock, then both read it; tests that change it
    work on a copy."""
    if worker_id == "master":  # no xdist: this process alone
        return make(factory.mktemp(name))
    from filelock import FileLock

    shared = factory.getbasetemp().parent / name
    record = shared / "run.json"
    with FileLock(str(shared) + ".lock"):
        if not record.is_file():
            shared.mkdir()
            made = make(shared)
            record.write_text(json.dumps({"output": made.output, "seconds": made.seconds}))
    made = json.loads(record.read_text())
    return Run(shared / "repo", made["output"], made["seconds"])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Run:
    """The tiny image pipeline, run once for the whole session (``tiny_repo``: a copy)."""
    return shared_run("tiny", make_tiny_run, tmp_path_factory, worker_id)


@pytest.fixture
def tiny_repo(tiny_run: Run, tmp_path: Path) -> Path:
    """A private copy of the tiny run (git history, DVC cache and remote config included)."""
    return copy_repo(tiny_run.repo, tmp_path / "repo")


def queue_status(repo: Path) -> dict[str, str]:
    """``dvc queue status`` as experiment name -> Queued, Running, Success or Failed."""
    table = run(repo, "dvc", "queue", "status").stdout.split("\n\n")[0].splitlines()[1:]
    return {row.split()[1]: row.split()[-1] for row in table if row.strip()}


def experiments(repo: Path) -> list[dict[str, str]]:
    """The rows of ``dvc exp show --csv``: the baseline and each experiment."""
    return list(csv.DictReader(io.StringIO(run(repo, "dvc", "exp", "show", "--csv").stdout)))


@dataclass(frozen=True)
class Sweep:
    """A queued sweep over fine-tuning rates: each experiment's ``dvc queue logs`` and fine-
    tuning rate by name, and the rows of ``dvc exp show`` once it finished."""

    repo: Path
    logs: dict[str, str]
    rates: dict[str, float]
    rows: list[dict[str, str]]
    seconds: float


@pytest.fixture(scope="session")
def lr_sweep(tiny_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    """``dvc exp run --queue -S lr=1e-3,1e-5`` then ``dvc queue start`` on a copy of
    the tiny run, waited for until every experiment has finished."""
    repo = copy_repo(tiny_run.repo, tmp_path_factory.mktemp("sweep") / "repo")
    start = time.perf_counter()
    run(repo, "dvc", "exp", "run", "--queue", "-S", SWEEP)
    run(repo, "dvc", "queue", "start")
    deadline = time.monotonic() + 600
    while set(queue_status(repo).values()) & {"Queued", "Running"}:
        assert time.monotonic() < deadline, run(repo, "dvc", "queue", "status").stdout
        time.sleep(2)
    seconds = time.perf_counter() - start
    logs = {name: run(repo, "dvc", "queue", "logs", name).stdout for name in queue_status(repo)}
    rows = experiments(repo)
    rates = {row["Experiment"]: float(row["lr"]) for row in rows if row["typ"] != "baseline"}
    yield Sweep(repo, logs, rates, rows, seconds)
    run(repo, "dvc", "queue", "stop", check=False)  # the idle worker exits now, not in 10 s


def declared_outputs() -> Iterator[str]:
    """Every path dvc.yaml declares as a stage's out, metric or plot."""
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                yield entry if isinstance(entry, str) else next(iter(entry))


def odd_images(rng: np.random.Generator, size: tuple[int, int]) -> dict[str, Image.Image]:
    """One image per troublesome mode, with content that depends on the class."""
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    paletted = rgb.convert("P")
    paletted.info["transparency"] = 0
    return {
        "rgb.jpg": rgb,
        "grey.png": rgb.convert("L"),
        "grey_alpha.png": rgb.convert("LA"),
        "paletted.png": paletted,
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "sixteen_bit.png": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257),
    }


def make_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(9, 90)), int(rng.integers(9, 90)))
            for filename, image in odd_images(rng, size).items():
                image.save(folder / f"{i}_{filename}")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".DS_Store").write_bytes(b"\x00\x01")
    return root


def random_image_loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(24, 3, 8, 8, generator=generator) * 3 + 1, torch.arange(24) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def fine_tune_briefly(model: torch.nn.Module, **settings) -> Any:
    """Fine-tune ``model`` (a Classifier) on a few random images: a small plain recipe,
    with ``settings`` (any of FinetuneRecipe's fields, or finetune's keyword arguments) in
    place of its values; returns finetune's Fitted."""
    from pipeline.finetune import FinetuneRecipe, finetune

    plain = dict(
        lr=0.01,
        epochs=2,
        backbone_lr_ratio=1.0,
        warmup_epochs=0,
        weight_decay=0.0,
        label_smoothing=0.0,
        amp="off",
        select="accuracy",
    )
    fields = FinetuneRecipe.__dataclass_fields__
    recipe = FinetuneRecipe(**{**plain, **{key: value for key, value in settings.items() if key in fields}})
    loop = {key: value for key, value in settings.items() if key not in fields}
    images, val_images = random_image_loader(0), random_image_loader(1)
    return finetune(model, images, val_images, torch.device("cpu"), recipe, **loop)


# Three topics of generated sentences, each made of a subject, an event and a time; a few
# carry a long tail, so that they exceed the tiny run's max_length and are truncated.
TEXT_TOPICS = {
    "sports": (
        ["the team", "our keeper", "the striker", "a young runner"],
        ["won the match", "scored a late goal", "lost the final", "broke the record"],
    ),
    "weather": (
        ["the rain", "a cold wind", "the storm", "bright sun"],
        ["hit the coast", "kept falling", "warmed the valley", "closed the roads"],
    ),
    "food": (
        ["the soup", "fresh bread", "a spicy curry", "the cake"],
        ["tasted of garlic", "came out of the oven", "needed more salt", "fed the family"],
    ),
}
TEXT_TIMES = ["today", "on sunday", "last night", "this morning"]
TEXT_TAIL = ", and everyone in town talked about it for days and days after"
TINY_TEXT_OVERRIDES: dict[str, dict[str, Any]] = {
    "data": {"modality": "text", "dataset": "text", "path": "data/raw/texts", "val_fraction": 0.2},
    "backbone": {"arch": "data/weights/tiny-bert", "weights": "pretrain", "max_length": 16},
    "head": {"max_epochs": 15, "patience": 5},
    "finetune": {"epochs": 2, "batch_size": 16},
}


def generated_texts(per_class: int, seed: int) -> list[tuple[str, str]]:
    """``per_class`` (text, topic) pairs of each topic, in a seeded order."""
    rng = np.random.default_rng(seed)
    rows = []
    for topic, (subjects, events) in TEXT_TOPICS.items():
        for i in range(per_class):
            text = f"{rng.choice(subjects)} {rng.choice(events)} {rng.choice(TEXT_TIMES)}"
            rows.append((text + (TEXT_TAIL if i % 5 == 0 else ""), topic))
    return [rows[i] for i in rng.permutation(len(rows))]


def text_words() -> list[str]:
    """Every word the generated sentences use."""
    phrases = [*TEXT_TIMES, TEXT_TAIL] + [p for parts in TEXT_TOPICS.values() for ps in parts for p in ps]
    return sorted({word for phrase in phrases for word in phrase.replace(",", " ,").split()})


def write_texts_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A BERT of 2 layers, width 32, its weights random (seeded), its vocabulary the
    generated sentences' words: a model folder as the hub has them (config.json,
    model.safetensors, tokenizer files), made with transformers' own classes."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *text_words()]) + "\n")
    config = BertConfig(
        vocab_size=len(vocab.read_text().split()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    return folder


def tiny_text_params() -> dict[str, Any]:
    params = default_params()
    for section, values in TINY_TEXT_OVERRIDES.items():
        params[section].update(values)
    return params


def make_text_data(repo: Path) -> None:
    """The tiny text run's data in ``repo``: train.csv (a val split is held out of it) and
    test.csv of generated sentences, and the tiny BERT under data/weights/."""
    rows = generated_texts(per_class=16, seed=0)
    write_texts_csv(repo / "data/raw/texts/train.csv", rows[:36])
    write_texts_csv(repo / "data/raw/texts/test.csv", rows[36:])
    make_tiny_bert(repo / "data/weights/tiny-bert")


def make_tiny_text_run(root: Path) -> Run:
    """The pipeline on the tiny text data and BERT, committed."""
    repo = root / "repo"
    make_text_data(repo)
    make_pipeline_repo(repo, tiny_text_params())
    full = timed(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "run")
    return full


@pytest.fixture(scope="session")
def tiny_text_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Run:
    """The tiny text pipeline, run once for the whole session."""
    return shared_run("tiny-text", make_tiny_text_run, tmp_path_factory, worker_id)


# The states of a Slurm job that has not ended yet (a requeued one among them).
ACTIVE_JOB_STATES = (
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
)


def job_state(job: str) -> str:
    """A Slurm job's state as scontrol shows it (COMPLETED, FAILED, ...), GONE once Slurm
    has forgotten it."""
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+)", shown)
    return found.group(1) if found else "GONE"


def slurm_nodes_idle() -> bool:
    """Whether the Slurm that $SLURM_CONF names answers, with two nodes idle."""
    try:
        shown = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--states=idle", "--format=%N"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return shown.returncode == 0 and len(set(shown.stdout.split())) >= 2


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real two-node Slurm on this host (.ci/slurm): the one .ci/run started ($SLURM_CONF),
    else one started here and stopped at the end. Where none can start the Slurm tests skip,
    saying why; under CI=true that is a failure."""
    if os.environ.get("SLURM_CONF") and slurm_nodes_idle():
        yield Path(os.environ["SLURM_CONF"])
        return
    state = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / ".ci/slurm")
    started = subprocess.run(["bash", script, "start", str(state)], capture_output=True, text=True)
    if started.returncode != 0:
        reason = f"Slurm could not start here (.ci/slurm start): {started.stderr.strip()[-500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state / "slurm.conf"
    finally:
        subprocess.run(["bash", script, "stop", str(state)], check=False)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
