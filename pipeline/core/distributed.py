"""Many processes, one stage: a stage relaunches itself under torch.distributed.run.

DVC runs each stage as one command (``python -m pipeline.finetune``). When params'
``distributed`` section asks for more than one process, that command becomes a launcher:
it checks params, starts ``nproc_per_node`` workers running the same module on this node
(and, for the training stages, meets the other nodes' at a static rendezvous on
``rdzv_endpoint``), waits for all of them and succeeds or fails as a whole, so DVC records
either a complete run or none. Workers find torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, ...), join the process group, and only rank 0 writes outputs.

A failed or killed worker stops the others within ``timeout_s`` at most (at once when the
launcher sees it die), and the stage fails with a message that names the rank and the
cause; a worker also dies with its launcher, so none outlives the stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ParamsError, StageError

if TYPE_CHECKING:
    import torch

# Stages whose processes may span several machines: the long training runs. The others
# (extract, baseline, evaluate) use this machine's processes only.
MULTI_NODE_STAGES = ("backbone", "finetune")
# Set by a Slurm job's head node on the launchers it starts on the other nodes (one srun
# step over them): each one's node rank is this plus its SLURM_NODEID within that step.
NODE_RANK_BASE = "PIPELINE_NODE_RANK_BASE"


@dataclass(frozen=True)
class Plan:
    """How one stage runs: how many processes, where they meet, which backend."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str
    backend: str
    timeout_s: int
    starts_other_nodes: bool = False  # the head node of a Slurm job: it srun's the others

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def local_processes(setting: str | int) -> int:
    """``auto`` is one process per visible CUDA GPU, else one."""
    if setting != "auto":
        return int(setting)
    import torch

    return max(1, torch.cuda.device_count())


def node_rank_of(setting: str | int) -> int:
    """``auto`` reads the node's rank where a cluster sets it (SLURM_NODEID, NODE_RANK),
    counted from NODE_RANK_BASE on the nodes a Slurm head node started."""
    if setting != "auto":
        return int(setting)
    base = int(os.environ.get(NODE_RANK_BASE, "0"))
    for variable in ("SLURM_NODEID", "NODE_RANK"):
        if os.environ.get(variable, "").isdigit():
            return base + int(os.environ[variable])
    return base


def slurm_head(nnodes: int) -> bool:
    """Whether this process runs in a Slurm job's batch script (no srun step of its own) on
    an allocation of at least ``nnodes`` (> 1) nodes: the head node, which runs the DVC
    commands and starts the other nodes' launchers itself."""
    return (
        nnodes > 1
        and "SLURM_JOB_ID" in os.environ
        and "SLURM_STEP_ID" not in os.environ
        and NODE_RANK_BASE not in os.environ
        and int(os.environ.get("SLURM_JOB_NUM_NODES", "1")) >= nnodes
    )


def slurm_head_address() -> str:
    """The address Slurm reaches this job's first node (the head) at: its NodeAddr."""
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", name], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return name
    for field in shown.split():
        if field.startswith("NodeAddr="):
            return field.removeprefix("NodeAddr=")
    return name


def uses_cuda(device: str) -> bool:
    """Whether params' ``device`` puts the processes on CUDA GPUs on this machine."""
    import torch

    return device in ("auto", "cuda") and torch.cuda.is_available()


def backend_for(setting: str, device: str) -> str:
    """``auto`` is nccl where the processes use CUDA GPUs, gloo elsewhere; nccl asked for
    where they do not (device cpu or mps, or auto on a machine with no CUDA GPU) is a
    params error, before any process starts."""
    if setting == "auto":
        return "nccl" if uses_cuda(device) else "gloo"
    if setting == "nccl" and not uses_cuda(device):
        where = "this machine has no CUDA GPU" if device in ("auto", "cuda") else f"device is {device}"
        raise ParamsError(f"distributed.backend: nccl needs CUDA GPUs, but {where}; use gloo or auto")
    return setting


def plan_for(stage: str, distributed: dict[str, Any], device: str) -> Plan:
    """The plan ``stage`` runs under, from params' ``distributed`` section and ``device``.

    Only the training stages read the multi-node keys (nnodes, node_rank, rdzv_endpoint):
    inference stages run on this machine alone, on a free local port.
    """
    nproc = local_processes(distributed["nproc_per_node"])
    backend = backend_for(distributed["backend"], device)
    if stage not in MULTI_NODE_STAGES:
        return Plan(nproc, 1, 0, f"localhost:{free_port()}", backend, distributed["timeout_s"])
    if distributed["sync_batchnorm"] and nproc * distributed["nnodes"] > 1 and backend != "nccl":
        raise ParamsError(
            "distributed.sync_batchnorm: torch's SyncBatchNorm runs on CUDA GPUs only; set it to "
            "false for processes on CPUs"
        )
    nnodes, setting = distributed["nnodes"], distributed["node_rank"]
    # One machine is node 0, whatever a Slurm step on another node of the job says it is.
    node_rank = node_rank_of(setting) if nnodes > 1 else 0
    if node_rank >= nnodes:
        raise ParamsError(f"distributed.node_rank: {node_rank} is not below distributed.nnodes ({nnodes})")
    endpoint, head = distributed["rdzv_endpoint"], slurm_head(nnodes) and node_rank == 0
    if nnodes == 1:  # a machine alone meets itself on a free port (two stages may run at once)
        endpoint = f"localhost:{free_port()}"
    elif endpoint == "auto" and head:
        endpoint = f"{slurm_head_address()}:{free_port()}"
    elif endpoint == "auto":
        if "MASTER_ADDR" not in os.environ:
            raise ParamsError(
                "distributed.rdzv_endpoint: auto reads the head node from $MASTER_ADDR (and "
                "$MASTER_PORT, else 29400), which is not set; export it or write host:port"
            )
        endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29400')}"
    return Plan(nproc, nnodes, node_rank, endpoint, backend, distributed["timeout_s"], head)


PORT_TRIES = 5  # a machine alone meets itself on a free port: so many tries where one is taken


def port_taken(error: BaseException) -> bool:
    """Whether a rendezvous failed because its port was taken (between free_port's probe
    and the launcher's bind, another stage on this machine bound it)."""
    return "EADDRINUSE" in str(error) or "address already in use" in str(error).lower()


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def in_worker() -> bool:
    """Whether this process is a worker torch.distributed.run started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def launch(module: str, plan: Plan) -> None:
    """Run ``python -m module`` in ``plan.nproc_per_node`` workers on this node, wait for all
    of them (and the other nodes'), and raise StageError naming the first that failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of fighting over them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.nproc_per_node))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers' parent: see die_with_parent
    config = LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        run_id=module,
        rdzv_endpoint=plan.rdzv_endpoint,
        rdzv_backend="static",
        rdzv_configs={"rank": plan.node_rank, "timeout": plan.timeout_s},
        max_restarts=0,
        monitor_interval=0.5,
        shutdown_timeout=10,
    )
    others = start_other_nodes(module, plan) if plan.starts_other_nodes else None
    try:
        for attempt in range(1, PORT_TRIES + 1):
            try:
                elastic_launch(config, sys.executable)("-m", module)
                break
            except ChildFailedError as error:
                raise StageError(failure_message(error, plan)) from None
            except (RuntimeError, TimeoutError) as error:  # the rendezvous itself: a node never came
                if port_taken(error) and plan.nnodes == 1 and attempt < PORT_TRIES:
                    config.rdzv_endpoint = f"localhost:{free_port()}"  # another stage took it first
                    continue
                raise StageError(
                    f"distributed: node {plan.node_rank} of {plan.nnodes} could not meet the others at "
                    f"{config.rdzv_endpoint} within {plan.timeout_s} s ({type(error).__name__}: {error})"
                ) from None
    except BaseException:
        stop(others)
        raise
    if others is not None and others.wait() != 0:
        raise StageError(
            f"distributed: the launchers of nodes 1 to {plan.nnodes - 1} (srun) exited with status "
            f"{others.returncode}; their errors are above"
        )


def stop(others: subprocess.Popen | None) -> None:
    """End the other nodes' srun step (srun passes the signal on to their launchers)."""
    if others is None or others.poll() is not None:
        return
    others.terminate()
    try:
        others.wait(timeout=30)
    except subprocess.TimeoutExpired:
        others.kill()
        others.wait()


def other_nodes_command(module: str, nnodes: int, python: str = sys.executable) -> list[str]:
    """The srun step a Slurm job's head node starts: ``module``'s launcher once on each of
    the job's other ``nnodes - 1`` nodes, in the head's working directory."""
    others = nnodes - 1
    return [
        "srun",
        f"--nodes={others}",
        f"--ntasks={others}",
        "--ntasks-per-node=1",
        "--relative=1",
        "--kill-on-bad-exit=1",
        python,
        "-m",
        module,
    ]


def start_other_nodes(module: str, plan: Plan) -> subprocess.Popen:
    """On a Slurm job's head node: one srun step that runs this stage's launcher on each of
    the job's other nodes, in this workspace (the job's folder, on storage every node
    reaches), meeting this node's at ``plan.rdzv_endpoint``."""
    host, port = plan.rdzv_endpoint.rsplit(":", 1)
    print(f"distributed: starting nodes 1 to {plan.nnodes - 1} through srun, meeting at {plan.rdzv_endpoint}")
    return subprocess.Popen(
        other_nodes_command(module, plan.nnodes),
        env={**os.environ, NODE_RANK_BASE: "1", "MASTER_ADDR": host, "MASTER_PORT": port},
    )


def failure_message(error: Any, plan: Plan) -> str:
    """One line naming the rank that failed first and why (a signal, or an exit status)."""
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        cause = f"was killed by {failure.signal_name()}"
    else:  # the rank printed its error above (a bad input, a timeout waiting for the others)
        cause = f"exited with status {failure.exitcode}"
    return (
        f"distributed: rank {rank} of {plan.world_size} (pid {failure.pid}) {cause}; "
        "the other ranks were stopped and no output was written"
    )


@dataclass(frozen=True)
class Ranks:
    """This process's place among the stage's processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


LAUNCHER_PID = "PIPELINE_LAUNCHER_PID"


def die_with_parent() -> None:
    """Ask Linux to kill this process when its launcher dies, even by kill -9; and exit at
    once if it already has: the death signal only covers a death after it is set, and a
    worker orphaned before that would wait for the others until ``timeout_s``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    launcher = os.environ.get(LAUNCHER_PID, "")
    if launcher.isdigit() and os.getppid() != int(launcher):
        print(
            f"distributed: the launcher (pid {launcher}) of this worker has died; exiting",
            file=sys.stderr,
        )
        os._exit(1)


def join(plan: Plan) -> Ranks:
    """In a worker: join the process group; a lone process has nothing to join."""
    if not in_worker():
        return Ranks()
    import torch.distributed as dist

    die_with_parent()
    ranks = Ranks(
        int(os.environ["RANK"]),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ["WORLD_SIZE"]),
    )
    if not dist.is_initialized():
        dist.init_process_group(plan.backend, timeout=timedelta(seconds=plan.timeout_s))
    if not ranks.main:  # one copy of the progress lines; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return ranks


def process_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Each process on its own GPU (by local rank); on a CPU they share it."""
    import torch

    if device.type != "cuda":
        return device
    torch.cuda.set_device(ranks.local_rank)
    return torch.device("cuda", ranks.local_rank)


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over every process (itself where there is one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


MESSAGE_BYTES = 64 * 2**20  # the largest piece of a result one process sends another


def row_slices(rows: int, like: torch.Tensor) -> list[slice]:
    """``rows`` rows of tensors shaped like ``like`` cut into messages of MESSAGE_BYTES at most."""
    row_bytes = max(1, like[0].numel() * like.element_size()) if len(like) else 1
    step = max(1, MESSAGE_BYTES // row_bytes)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def gather_rows_on_main(outputs: tuple[torch.Tensor, ...], positions: torch.Tensor) -> None:
    """Rank 0's ``outputs`` (one tensor a result, a row for every item of the dataset, its
    own rows already in place) receive every other process's rows at their dataset
    positions; on the other ranks, ``outputs`` are this process's rows, for dataset
    positions ``positions``, which they send. Point to point, one process after another, in
    messages of MESSAGE_BYTES at most: rank 0 holds the results and one message, the others
    their own share (an all-gather would copy every share to every process)."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    count = torch.zeros(1, dtype=torch.long, device=device)
    if dist.get_rank() != 0:
        count.fill_(len(positions))
        dist.send(count, 0)
        dist.send(positions.to(device), 0)
        for output in outputs:
            for rows in row_slices(len(positions), output):
                dist.send(output[rows].contiguous().to(device), 0)
        return
    for source in range(1, dist.get_world_size()):
        dist.recv(count, source)
        where = torch.empty(int(count), dtype=torch.long, device=device)
        dist.recv(where, source)
        where = where.cpu()
        for output in outputs:
            for rows in row_slices(len(where), output):
                message = torch.empty(
                    (rows.stop - rows.start, *output.shape[1:]), dtype=output.dtype, device=device
                )
                dist.recv(message, source)
                output[where[rows]] = message.cpu()


def start(stage: str, distributed: dict[str, Any], device_name: str) -> tuple[Plan, Ranks, torch.device]:
    """A stage's first step: its plan, this process's ranks (joining the group in a
    worker) and the device this process computes on."""
    from pipeline.core.common import resolve_device

    plan = plan_for(stage, distributed, device_name)
    ranks = join(plan)
    return plan, ranks, process_device(resolve_device(device_name), ranks)


def accumulation_steps(share: int, max_per_process: int) -> int | None:
    """The fewest steps that split ``share`` images evenly, each at most ``max_per_process``
    and at least half of it (fewer images a step would waste the cap); None if none do."""
    if max_per_process == 0 or share <= max_per_process:
        return 1
    for steps in range(-(-share // max_per_process), share + 1):
        if share % steps == 0:
            return steps if 2 * (share // steps) >= max_per_process else None
    return None


def split_batch(global_batch: int, world_size: int, max_per_process: int, key: str) -> tuple[int, int]:
    """The per-process batch and the gradient-accumulation steps that make ``global_batch``
    over ``world_size`` processes, each step at most ``max_per_process`` images (0: no cap)
    and at least half as many. The recipe (global batch, steps per epoch) stays what it is
    at any world size."""
    if global_batch % world_size:
        raise ParamsError(
            f"{key}: {global_batch} images do not split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    share = global_batch // world_size
    steps = accumulation_steps(share, max_per_process)
    if steps is None:
        nearby = [
            size
            for size in range(max(world_size, global_batch - 8 * world_size), global_batch + 9 * world_size)
            if size % world_size == 0 and accumulation_steps(size // world_size, max_per_process)
        ]
        closest = sorted(sorted(nearby, key=lambda size: (abs(size - global_batch), size))[:4])
        instead = f"{' or '.join(map(str, closest))}, or " if closest else ""
        raise ParamsError(
            f"{key}: {global_batch} images over {world_size} processes is {share} each, which does "
            f"not split into equal steps of {max_per_process // 2 + max_per_process % 2} to "
            f"{max_per_process} images (distributed.max_batch_per_process); use {instead}"
            "another max_batch_per_process"
        )
    return share // steps, steps


class GlobalBatchSampler:
    """Each epoch's shuffle of the dataset, the same on every process (seeded by ``seed``
    and the epoch, ``set_epoch``); a process takes its slice of each global batch.

    torch's DistributedSampler deals indices round-robin, so which images share a global
    batch changes with the world size; here a global batch holds the same images at any
    world size, as in the one-process run. A last, short global batch is evened out over
    the processes by repeating its images in order, as often as it takes (DDP needs as many
    steps on each), with fewer than ``world_size`` extra copies; except that where that would
    end a process's epoch with a step (``step``: the batch its DataLoader draws) of a single
    image, which BatchNorm cannot normalise in training, each process takes one image less
    of it: at most ``world_size`` images wait for the next epoch's shuffle. (A split smaller
    than one global batch keeps all its images.)

    Given the items' ``lengths`` (tokens of each text), the shuffle is bucketed by length
    (``length_bucketed``), so a batch pads its texts to about their own length.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        ranks: Ranks,
        seed: int,
        lengths: Sequence[int] | None = None,
        step: int | None = None,
    ) -> None:
        self.size, self.global_batch, self.ranks, self.seed, self.epoch = (
            size,
            global_batch,
            ranks,
            seed,
            0,
        )
        self.lengths = lengths
        self.step = step or -(-global_batch // ranks.world_size)

    def last_share(self) -> int:
        """How many images each process takes of the last, short global batch (0 if none)."""
        share = -(-(self.size % self.global_batch) // self.ranks.world_size)
        if self.step > 1 and share % self.step == 1 and self.size > self.global_batch:
            return share - 1
        return share

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return order
        return length_bucketed(order, self.lengths, self.global_batch, generator)

    def __iter__(self):
        order, world, rank = self._order(), self.ranks.world_size, self.ranks.rank
        full_share = -(-self.global_batch // world)
        for start in range(0, self.size, self.global_batch):
            batch = order[start : start + self.global_batch]
            share = full_share if len(batch) == self.global_batch else self.last_share()
            batch = list(itertools.islice(itertools.cycle(batch), share * world))  # even out
            yield from batch[rank * share : (rank + 1) * share]

    def __len__(self) -> int:
        full = self.size // self.global_batch
        return full * -(-self.global_batch // self.ranks.world_size) + self.last_share()


def length_bucketed(
    order: list[int], lengths: Sequence[int], batch: int, generator: torch.Generator, window: int = 50
) -> list[int]:
    """A shuffled ``order`` regrouped into batches of about one length: each run of
    ``window`` batches is sorted by length and cut into batches, then the full batches are
    shuffled (``generator``); a short last batch stays last. Each batch still holds a random
    draw of the data, as the windows do, but pads far less (the bucketing of
    tensor2tensor and fairseq, here with one window of 50 batches)."""
    import torch

    ordered: list[int] = []
    for start in range(0, len(order), batch * window):
        ordered += sorted(order[start : start + batch * window], key=lambda index: lengths[index])
    batches = [ordered[start : start + batch] for start in range(0, len(ordered), batch)]
    full = len(order) // batch
    shuffled = [batches[b] for b in torch.randperm(full, generator=generator).tolist()] + batches[full:]
    return [index for chosen in shuffled for index in chosen]


class ShardSampler:
    """This process's share of a dataset for inference: every ``world_size``-th item from
    its rank, no padding (each item is computed once); rank 0 gathers them (gather_rows_on_main).
    Given the items' ``lengths`` (tokens of each text), the share goes longest first, so a
    batch holds texts of about one length and pads little (the longest batch, first, shows
    at once whether memory suffices). A split with fewer items than processes is an error
    that names it (``name``): a process given nothing would have nothing to put together."""

    def __init__(
        self, size: int, ranks: Ranks, lengths: Sequence[int] | None = None, name: str = "the split"
    ) -> None:
        if size < ranks.world_size:
            raise StageError(
                f"distributed: {name} holds {size} example(s), fewer than this stage's "
                f"{ranks.world_size} processes, and each needs at least one; lower "
                f"distributed.nproc_per_node to at most {max(size, 1)}"
            )
        self.ranks = ranks
        self.indices = list(range(ranks.rank, size, ranks.world_size))
        if lengths is not None:
            self.indices.sort(key=lambda index: -lengths[index])

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sharded(sampler: Any) -> bool:
    """Whether ``sampler`` gives this process a share of the items, the other processes
    theirs (GlobalBatchSampler, ShardSampler over several processes): only then are a
    loader's sums and rows collected over the processes. A loader that every rank, or rank 0
    alone, runs whole (a head fit on gathered features) takes part in no collective."""
    return isinstance(sampler, GlobalBatchSampler | ShardSampler) and sampler.ranks.world_size > 1


def parallel(
    model: torch.nn.Module, ranks: Ranks, device: torch.device, sync_batchnorm: bool
) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel (with SyncBatchNorm if asked) where
    there are several processes; the model itself where there is one."""
    if ranks.world_size == 1:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
