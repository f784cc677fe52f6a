"""Many processes, one stage: plans, samplers, and training and extraction in 2 processes
(gloo on this machine's CPUs, as DistributedDataParallel runs across GPUs and machines)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.core import distributed
from pipeline.core.distributed import GlobalBatchSampler, Ranks, ShardSampler, plan_for, split_batch
from pipeline.core.errors import ParamsError, StageError
from tests.conftest import (
    default_params,
    ran_stages,
    read_params,
    run,
    start_in,
    subprocess_env,
    write_params,
)


def settings(**overrides) -> dict:
    return {**default_params()["distributed"], **overrides}


def test_one_process_by_default_and_auto_is_one_per_gpu():
    plan = plan_for("finetune", settings(), "cpu")
    assert (plan.world_size, plan.backend) == (1, "gloo")
    assert plan_for("finetune", settings(nproc_per_node="auto"), "cpu").nproc_per_node == max(
        1, torch.cuda.device_count()
    )


def test_only_training_stages_span_machines(monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    auto = plan_for("finetune", settings(nnodes=2), "cpu")
    assert (auto.rdzv_endpoint, auto.node_rank) == ("head:29400", 1)
    training = plan_for("finetune", settings(nproc_per_node=2, nnodes=3, rdzv_endpoint="head:29400"), "cpu")
    assert (training.world_size, training.node_rank, training.rdzv_endpoint) == (6, 1, "head:29400")
    inference = plan_for("extract", settings(nproc_per_node=2, nnodes=3), "cpu")
    assert (inference.world_size, inference.node_rank) == (2, 0)
    assert inference.rdzv_endpoint.startswith("localhost:")


@pytest.mark.parametrize(
    ("overrides", "device", "message"),
    [
        (
            {"nnodes": 2, "node_rank": 2},
            "cpu",
            "distributed.node_rank: 2 is not below distributed.nnodes (2)",
        ),
        ({"backend": "nccl"}, "cpu", "distributed.backend: nccl needs CUDA GPUs"),
        ({"nproc_per_node": 2, "sync_batchnorm": True}, "cpu", "SyncBatchNorm runs on CUDA GPUs only"),
        ({"nnodes": 2, "node_rank": 0}, "cpu", "rdzv_endpoint: auto reads the head node from $MASTER_ADDR"),
    ],
)
def test_impossible_plans_are_params_errors(overrides, device, message, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ParamsError) as error:
        plan_for("finetune", settings(**overrides), device)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("device", "where"), [("auto", "this machine has no CUDA GPU"), ("mps", "device is mps")]
)
def test_nccl_without_a_cuda_gpu_fails_as_params_for_any_device(device, where, monkeypatch):
    """nccl on a machine with no CUDA GPU (device auto), or on Apple's GPU, would die in
    init_process_group with a traceback: it is a params error before any process starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for stage in ("finetune", "extract"):
        with pytest.raises(ParamsError) as error:
            plan_for(stage, settings(backend="nccl", nproc_per_node=2), device)
        assert str(error.value) == f"distributed.backend: nccl needs CUDA GPUs, but {where}; use gloo or auto"


def test_a_worker_whose_launcher_already_died_exits_at_once():
    """The death signal covers a launcher's death after a worker sets it; a worker that
    finds its launcher already gone (its parent is another process) exits there and then,
    instead of waiting for the others until timeout_s."""
    code = "from pipeline.core.distributed import die_with_parent; die_with_parent(); print('carried on')"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    results = {}
    for name, launcher in (("alive", os.getpid()), ("dead", int(gone.stdout))):
        env = {**subprocess_env(), distributed.LAUNCHER_PID: str(launcher)}
        started = time.monotonic()
        results[name] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert time.monotonic() - started < 30
    assert (results["alive"].returncode, results["alive"].stdout) == (0, "carried on\n")
    assert results["dead"].returncode == 1 and "carried on" not in results["dead"].stdout
    assert f"the launcher (pid {int(gone.stdout)}) of this worker has died" in results["dead"].stderr


def test_the_global_batch_splits_into_shares_and_accumulation():
    assert split_batch(64, 1, 0, "k") == (64, 1)
    assert split_batch(64, 2, 0, "k") == (32, 1)
    assert split_batch(64, 2, 8, "k") == (8, 4)  # 2 processes x 8 images x 4 steps
    assert split_batch(60, 2, 7, "k") == (6, 5)  # 30 a process: 5 steps of 6
    assert split_batch(24, 2, 32, "k") == (12, 1)  # under the cap: one step
    with pytest.raises(ParamsError, match=r"finetune\.batch_size: 64 images do not split evenly over 3"):
        split_batch(64, 3, 0, "finetune.batch_size")


def test_a_share_that_only_splits_into_tiny_steps_is_refused_with_sizes_that_work():
    """122 over 2 processes is 61 each, a prime: under a cap of 32 the only even split is 61
    steps of one image. Refused, naming batch sizes that split into 16 to 32 a step."""
    with pytest.raises(ParamsError) as error:
        split_batch(122, 2, 32, "finetune.batch_size")
    message = str(error.value)
    assert message.startswith("finetune.batch_size: 122 images over 2 processes is 61 each")
    assert "equal steps of 16 to 32 images" in message and "120 or 124" in message
    for suggested in (120, 124):
        per_process, steps = split_batch(suggested, 2, 32, "k")
        assert per_process * steps * 2 == suggested and 16 <= per_process <= 32


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("size", "batch"), [(49, 8), (50, 8), (7, 8), (33, 4), (17, 12), (64, 16)])
def test_every_process_yields_as_many_indices_as_it_says_and_every_image_is_seen(size, batch, world):
    """A short last global batch (50 images in batches of 8 leave 2) is evened out over the
    processes by repeating images, so each yields len(sampler) indices; every image is seen,
    with fewer than ``world`` extra copies in all; but where a process's last step would
    hold one image (49 in batches of 8 leave 1), at most ``world`` images sit the epoch out."""
    batch = batch - batch % world or world  # training's global batch splits evenly
    step = batch // world
    seen = []
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, Ranks(rank, rank, world), seed=1)
        indices = list(sampler)
        assert len(indices) == len(sampler), (rank, len(indices), len(sampler))
        steps = [indices[i : i + step] for i in range(0, len(indices), step)]
        assert step == 1 or size <= batch or all(len(s) > 1 for s in steps), steps
        seen += indices
    assert len(set(range(size)) - set(seen)) <= (world if size % batch else 0)
    assert len(seen) - len(set(seen)) < world


def test_a_last_step_of_one_image_is_dropped_so_batchnorm_trains(monkeypatch):
    """9 images in batches of 8 (or 17 in steps of 8 with accumulation) would end the epoch
    with a step of 1, on which BatchNorm raises in training."""
    from torch import nn

    from pipeline.core.loaders import make_loader
    from pipeline.core.training import grad_scaler, train_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    cpu = torch.device("cpu")
    for size, batch, step, trained in ((9, 8, 8, 8), (17, 16, 8, 16), (10, 8, 8, 10), (8, 8, 8, 8)):
        data = TensorDataset(torch.randn(size, 12), torch.arange(size) % 2)
        sampler = GlobalBatchSampler(size, batch, Ranks(), seed=0, step=step)
        loader = make_loader(data, step, cpu, sampler=sampler)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        result = train_epoch(
            model,
            loader,
            nn.CrossEntropyLoss(),
            cpu,
            optimizer,
            grad_scaler(cpu, "off"),
            accumulate=batch // step,
        )
        assert len(sampler) == trained
        assert result["loss"] > 0


def global_batches(size: int, batch: int, world: int, epoch: int = 1) -> list[set[int]]:
    """Each global batch's images, put together from every process's share."""
    shares = []
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, Ranks(rank, rank, world), seed=7)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler)
        per_process = -(-batch // world)
        shares.append([order[i : i + per_process] for i in range(0, len(order), per_process)])
    return [set().union(*parts) for parts in zip(*shares, strict=True)]


def test_a_global_batch_holds_the_same_images_at_any_world_size():
    one = global_batches(54, 8, 1)  # the last batch of 6 leaves no process a step of one image
    assert global_batches(54, 8, 2) == one
    assert global_batches(54, 8, 4) == one
    assert set().union(*one) == set(range(54)) and len(one) == 7  # every image, once
    assert global_batches(54, 8, 2, epoch=2) != one  # set_epoch reshuffles


def test_inference_shards_are_disjoint_and_cover_the_split():
    shards = [list(ShardSampler(11, Ranks(rank, rank, 3))) for rank in range(3)]
    assert sorted(index for shard in shards for index in shard) == list(range(11))
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1 :])


def test_a_failed_rank_is_named_with_its_cause():
    plan = distributed.Plan(2, 1, 0, "localhost:1", "gloo", 30)
    killed = SimpleNamespace(exitcode=-9, pid=123, signal_name=lambda: "SIGKILL")
    error = SimpleNamespace(get_first_failure=lambda: (1, killed))
    assert distributed.failure_message(error, plan).startswith(
        "distributed: rank 1 of 2 (pid 123) was killed by SIGKILL; the other ranks were stopped"
    )
    exited = SimpleNamespace(exitcode=2, pid=124)
    error = SimpleNamespace(get_first_failure=lambda: (0, exited))
    assert "rank 0 of 2 (pid 124) exited with status 2" in distributed.failure_message(error, plan)


def test_a_port_taken_between_the_probe_and_the_bind_is_retried_on_another(monkeypatch, tmp_path):
    """Two stages on one machine (queue workers) may probe the same free port: the one that
    binds second gets EADDRINUSE, and launches again on another port instead of failing."""
    import socket

    taken = socket.socket()
    taken.bind(("localhost", 0))
    taken.listen(1)
    ports = iter([taken.getsockname()[1]])
    real = distributed.free_port
    monkeypatch.setattr(distributed, "free_port", lambda: next(ports, None) or real())
    plan = plan_for("extract", settings(nproc_per_node=1), "cpu")
    assert plan.rdzv_endpoint == f"localhost:{taken.getsockname()[1]}"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "ran.py").write_text("import pathlib; pathlib.Path('ran').write_text('yes')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    distributed.launch("ran", plan)
    assert (tmp_path / "ran").read_text() == "yes"
    taken.close()


def data(n: int = 40, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return TensorDataset(torch.eye(3, 8)[labels] * 3 + torch.randn(n, 8, generator=generator), labels)


def train_linear(ranks: Ranks) -> tuple[dict, list[dict]]:
    """fit() of a linear model on ``data()``, global batch 8, as ``ranks`` runs it."""
    from pipeline.core.loaders import make_loader
    from pipeline.core.selection import best_val_accuracy
    from pipeline.core.training import fit

    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    device = torch.device("cpu")
    train, val = data(40, 0), data(21, 1)
    per_process, _ = split_batch(8, ranks.world_size, 0, "batch")
    train_loader = make_loader(train, per_process, device, sampler=GlobalBatchSampler(40, 8, ranks, seed=3))
    val_loader = make_loader(val, 8, device, sampler=ShardSampler(21, ranks))
    parallel = distributed.parallel(model, ranks, device, sync_batchnorm=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fitted = fit(
        parallel, train_loader, val_loader, nn.CrossEntropyLoss(), optimizer, 3, device, best_val_accuracy
    )
    return fitted.weights, fitted.history


def extract_shared(ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.core.loaders import make_loader
    from pipeline.core.training import extract_features

    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    loader = make_loader(data(23, 2), 4, torch.device("cpu"), sampler=ShardSampler(23, ranks))
    return extract_features(backbone, loader, torch.device("cpu"), "off")


def record_writes(rank: int, log: Path) -> None:
    """Note every output this process writes (atomically, or through dvclive) in ``log``."""
    import contextlib

    from pipeline import evaluate, extract, finetune
    from pipeline.core import common

    atomic_path = common.atomic_path

    @contextlib.contextmanager
    def noted(target):
        with log.open("a") as file:
            file.write(f"{rank} {target}\n")
        with atomic_path(target) as tmp:
            yield tmp

    class NotedLog(finetune.EpochLog):
        def __init__(self, directory, stage):
            with log.open("a") as file:
                file.write(f"{rank} {directory}\n")
            super().__init__(directory, stage)

    for module in (common, extract):
        module.atomic_path = noted
    finetune.EpochLog = NotedLog
    del evaluate  # writes through common's helpers


def two_process_worker(rank: int, init_file: str, out: str, workspace: str) -> None:
    """One of two gloo processes: what each computes, saved for the test to compare; then
    finetune and evaluate, run as torchrun would run them, with every write noted."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ranks = Ranks(rank, rank, 2)
    summed = distributed.sum_over_ranks(1.0, float(rank))
    kept, history = train_linear(ranks)
    features, labels = extract_shared(ranks)
    torch.save(
        {"summed": summed, "kept": kept, "history": history, "features": features, "labels": labels},
        Path(out) / f"rank{rank}.pt",
    )
    from pipeline import evaluate, finetune

    os.environ.update(TORCHELASTIC_RUN_ID="test", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.chdir(workspace)
    record_writes(rank, Path(out) / "writes.txt")
    finetune.main()
    dist.barrier()  # as the launcher does: evaluate starts once finetune has ended everywhere
    evaluate.main()
    dist.destroy_process_group()


def prepare_workspace(path: Path) -> Path:
    """A tiny workspace up to the linear probe, made in this process, params asking for 2."""
    from pipeline import backbone, extract, prepare, train_head
    from tests.conftest import tiny_params

    params = tiny_params()
    params["data"]["max_train_per_class"] = 4
    params["backbone"].update(weights="none")
    params["head"].update(max_epochs=2)
    params["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=1, batch_size=8)
    params["distributed"]["nproc_per_node"] = 2
    path.mkdir()
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    here = Path.cwd()
    os.chdir(path)
    try:
        for stage in (prepare, backbone, extract, train_head):
            stage.main()
    finally:
        os.chdir(here)
    return path


@pytest.mark.slow
def test_two_processes_train_and_extract_as_one_does_and_only_rank_0_writes(tmp_path, monkeypatch):
    """DDP over 2 processes with the same global batch trains a linear model to the same
    weights as 1 process (to float tolerance), both ranks keep the same epoch, and sharded
    extraction gathers back the 1-process features in order. The stages' outputs are
    written by rank 0 alone."""
    import torch.multiprocessing as mp

    workspace = prepare_workspace(tmp_path / "workspace")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not left behind for the tests after this one
    mp.spawn(
        two_process_worker, args=(str(tmp_path / "init"), str(tmp_path), str(workspace)), nprocs=2, join=True
    )
    writes = (tmp_path / "writes.txt").read_text().split("\n")
    assert not [line for line in writes if line.startswith("1 ")], "rank 1 wrote"
    written = {line.split(" ", 1)[1] for line in writes if line}
    assert {
        "models/finetuned.pt",
        "reports/live/finetune",
        "metrics/test.json",
        "metrics/per_class.json",
    } <= written
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    alone_kept, alone_history = train_linear(Ranks())
    alone_features, alone_labels = extract_shared(Ranks())
    for result in results:
        assert result["summed"] == [2.0, 1.0]
        assert result["history"] == results[0]["history"]  # every rank saw the same metrics
        for name, value in alone_kept.items():
            assert torch.allclose(result["kept"][name], value, atol=1e-5), name
        assert [r["epoch"] for r in result["history"]] == [r["epoch"] for r in alone_history]
        for mine, alone in zip(result["history"], alone_history, strict=True):
            assert mine["val_accuracy"] == alone["val_accuracy"]
            assert mine["train_loss"] == pytest.approx(alone["train_loss"], abs=1e-5)
    # rank 0 gathers the whole split in order; rank 1 keeps its own share (every 2nd item from 1)
    assert torch.allclose(results[0]["features"], alone_features, atol=1e-6)
    assert torch.equal(results[0]["labels"], alone_labels)
    assert torch.allclose(results[1]["features"], alone_features[1::2], atol=1e-6)
    assert torch.equal(results[1]["labels"], alone_labels[1::2])


def gather_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from pipeline.core import distributed

    distributed.MESSAGE_BYTES = 40  # several messages a share: 3-float rows, 3 rows each
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=3)
    positions = torch.arange(rank, 11, 3)  # shares of 4, 4 and 3 rows
    rows = torch.stack([torch.full((3,), float(p)) for p in positions])
    if rank == 0:
        features, labels = torch.full((11, 3), -1.0), torch.full((11,), -1, dtype=torch.long)
        features[positions], labels[positions] = rows, positions
        outputs = (features, labels)
    else:
        outputs = (rows, positions.clone())
    distributed.gather_rows_on_main(outputs, positions)
    torch.save(outputs, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_rank_0_gathers_every_share_in_dataset_order_in_bounded_messages(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from pipeline.core import distributed

    mp.spawn(gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    features, labels = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(labels, torch.arange(11))
    assert torch.equal(features, torch.arange(11.0)[:, None].expand(11, 3))
    rows, positions = torch.load(tmp_path / "rank2.pt")
    assert torch.equal(positions, torch.tensor([2, 5, 8]))  # the others keep their share
    monkeypatch.setattr(distributed, "MESSAGE_BYTES", 40)
    assert distributed.row_slices(11, rows) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 11)]


@pytest.mark.parametrize("size", [40, 44, 42])
def test_gradient_accumulation_trains_as_the_whole_batch_does(size):
    """max_batch_per_process: 4 images at a time, 2 steps accumulated, give the weights a
    batch of 8 gives (a model without BatchNorm, to float tolerance), also where the epoch
    ends in a short global batch (44 and 42 images: a last group of 4 or 2 images in one
    step, whose mean loss counts whole, not halved)."""
    from pipeline.core.loaders import make_loader
    from pipeline.core.selection import last_epoch
    from pipeline.core.training import fit

    results = []
    for cap in (0, 4):
        torch.manual_seed(0)
        model = nn.Linear(8, 3)
        per_process, accumulate = split_batch(8, 1, cap, "batch")
        sampler = GlobalBatchSampler(size, 8, Ranks(), seed=3)
        train = make_loader(data(size, 0), per_process, torch.device("cpu"), sampler=sampler)
        val = make_loader(data(21, 1), 8, torch.device("cpu"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        fitted = fit(
            model,
            train,
            val,
            nn.CrossEntropyLoss(),
            optimizer,
            2,
            torch.device("cpu"),
            last_epoch,
            accumulate=accumulate,
        )
        results.append(fitted.weights)
    assert split_batch(8, 1, 4, "batch") == (4, 2)
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-6), name


def worker_processes(repo: Path) -> dict[int, psutil.Process]:
    """The torchrun workers running in ``repo``, by global rank."""
    workers = {}
    for process in psutil.process_iter(["cwd", "cmdline"]):
        try:
            if process.info["cwd"] == str(repo) and "TORCHELASTIC_RUN_ID" in process.environ():
                workers[int(process.environ()["RANK"])] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return workers


def logged_an_epoch(log: Path, committed: int) -> bool:
    """Whether this run's finetune has written its first epoch (not the committed log)."""
    try:
        return log.stat().st_mtime_ns != committed and len(log.read_text().splitlines()) >= 2
    except FileNotFoundError:  # DVC removed the committed log before running the stage
        return False


def start_repro(repo: Path) -> subprocess.Popen:
    return start_in(repo, "dvc", "repro", "-s", "finetune", "evaluate")


def everything_under(process: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]


@pytest.mark.slow
def test_a_killed_rank_or_stage_leaves_nothing_recorded_and_repro_then_matches_one_process(
    tiny_run, tiny_repo
):
    """dvc repro with 2 processes. kill -9 rank 1 mid-finetune: the stage fails, naming the
    rank, with no process left and nothing written. kill -9 the whole `dvc repro` mid-
    finetune: the same. Then dvc repro completes, and its test accuracy is within a point
    of the 1-process run's."""
    params = read_params(tiny_repo)
    params["distributed"]["nproc_per_node"] = 2
    write_params(tiny_repo, params)
    lock = (tiny_repo / "dvc.lock").read_text()

    repro = start_repro(tiny_repo)
    deadline = time.monotonic() + 300
    log = tiny_repo / "reports/live/finetune/plots/metrics/finetune/val_loss.tsv"
    committed_log = log.stat().st_mtime_ns if log.exists() else 0
    while len(workers := worker_processes(tiny_repo)) < 2 or not logged_an_epoch(log, committed_log):
        assert repro.poll() is None and time.monotonic() < deadline, repro.stdout.read()
        time.sleep(0.1)
    processes = everything_under(repro)  # into training: the first epoch is logged
    killed_at = time.monotonic()
    workers[1].kill()
    output, _ = repro.communicate(timeout=120)
    assert time.monotonic() - killed_at < 60, "the stage took too long to fail"
    assert repro.returncode != 0
    assert f"distributed: rank 1 of 2 (pid {workers[1].pid}) was killed by SIGKILL" in output
    assert "Traceback (most recent call last)" not in output.split("distributed: rank 1")[1]
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"orphan processes: {alive}"
    assert not (tiny_repo / "models/finetuned.pt").exists()
    assert (tiny_repo / "dvc.lock").read_text() == lock

    committed_log = log.stat().st_mtime_ns if log.exists() else 0
    repro = start_repro(tiny_repo)
    while not logged_an_epoch(log, committed_log):
        assert repro.poll() is None and time.monotonic() < deadline, repro.stdout.read()
        time.sleep(0.2)
    processes = everything_under(repro)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.communicate(timeout=30)  # reaps it and closes its pipe
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"orphan processes: {alive}"
    assert not (tiny_repo / "models/finetuned.pt").exists()
    assert (tiny_repo / "dvc.lock").read_text() == lock
    assert "finetune" in json.loads(run(tiny_repo, "dvc", "status", "--json").stdout)

    result = run(tiny_repo, "dvc", "repro", "-s", "finetune", "evaluate")
    assert ran_stages(result.stdout) == ["finetune", "evaluate"]
    assert "finetune: 2 processes (2 here, gloo)" in result.stdout
    assert not list(tiny_repo.rglob(".*.tmp-*"))  # no temporary left anywhere
    two = json.loads((tiny_repo / "metrics/test.json").read_text())
    one = json.loads((tiny_run.repo / "metrics/test.json").read_text())
    print(
        f"test accuracy, 1 process {one['finetuned']['accuracy']}, 2 processes {two['finetuned']['accuracy']}"
    )
    assert abs(two["finetuned"]["accuracy"] - one["finetuned"]["accuracy"]) <= 0.01
    summary = json.loads((tiny_repo / "reports/live/finetune/metrics.json").read_text())["finetune"]
    assert (summary["world_size"], summary["backend"]) == (2, "gloo")
    log = (tiny_repo / "reports/live/finetune/plots/metrics/finetune/val_loss.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in log[1:]] == ["1", "2"]  # one writer: one row an epoch


@pytest.mark.slow
def test_two_launchers_of_one_process_each_meet_through_the_rendezvous(tiny_repo):
    """The multi-node path on one machine: two launchers (nodes 0 and 1, as SLURM would
    start them) join through a localhost rdzv_endpoint and fine-tune together."""
    params = read_params(tiny_repo)
    params["distributed"].update(
        nnodes=2, node_rank="auto", rdzv_endpoint=f"localhost:{distributed.free_port()}"
    )
    write_params(tiny_repo, params)
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.finetune"],
            cwd=tiny_repo,
            env={**subprocess_env(), "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "finetune: 2 processes (1 here on node 0 of 2, gloo)" in outputs[0]
    assert "finetune: 2 processes (1 here on node 1 of 2, gloo)" in outputs[1]
    assert "the starting model on val" in outputs[0] and "the starting model on val" not in outputs[1]
    summary = json.loads((tiny_repo / "reports/live/finetune/metrics.json").read_text())["finetune"]
    assert summary["world_size"] == 2


@pytest.mark.slow
def test_baseline_and_train_head_run_with_two_processes_as_with_one(tmp_path):
    """With 2 processes, baseline extracts a share on each rank, then rank 0 alone fits the
    probe on the gathered features, in no collective (rank 1 has left by then); train_head,
    a moment's work on cached features, runs in one process whatever params ask. The
    random-init probe scores what it scores with one process, and no process is left."""
    workspace = prepare_workspace(tmp_path / "workspace")  # params ask for 2 processes
    outputs = {}
    for stage in ("train_head", "baseline"):
        result = subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}"],
            cwd=workspace,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        outputs[stage] = result.stdout + result.stderr
        assert result.returncode == 0, outputs[stage]
    two = json.loads((workspace / "metrics/baseline.json").read_text())["random_init_probe"]
    from pipeline import baseline

    here = Path.cwd()
    os.chdir(workspace)
    try:
        baseline.main()  # in this process, no worker environment: one process
    finally:
        os.chdir(here)
    one = json.loads((workspace / "metrics/baseline.json").read_text())["random_init_probe"]
    assert "baseline: 2 processes (2 here, gloo)" in outputs["baseline"]
    assert "processes" not in outputs["train_head"]
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=0.02)
    assert not worker_processes(workspace)


def test_a_split_smaller_than_the_world_is_named_before_any_process_gets_nothing():
    with pytest.raises(StageError, match=r"the val split holds 2 example\(s\), fewer than this stage's 3"):
        ShardSampler(2, Ranks(0, 0, 3), name="the val split")
    assert list(ShardSampler(3, Ranks(2, 2, 3), name="the val split")) == [2]


def test_one_machine_is_node_0_on_any_slurm_node(monkeypatch):
    """A Slurm step on node 3 of an allocation sets SLURM_NODEID=3; with nnodes 1 that is
    not this run's rank, and the default params must still run there."""
    monkeypatch.setenv("SLURM_NODEID", "3")
    plan = plan_for("finetune", settings(), "cpu")
    assert (plan.nnodes, plan.node_rank) == (1, 0)
    assert plan_for("finetune", settings(nnodes=4, rdzv_endpoint="head:29400"), "cpu").node_rank == 3
