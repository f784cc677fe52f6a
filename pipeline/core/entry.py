"""How a stage or a tool starts: the git check, the relaunch in many processes, one-line errors.

Every stage ends with ``run_stage(main, stage)`` and every command-line tool with
``run_tool(main)``. Where params ask for more than one process, ``run_stage`` turns this
process into the launcher of the stage's workers (pipeline.core.distributed); the workers run
``main`` themselves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import ParamsError, StageError

IMPORTED_AT = time.monotonic()  # where the OS does not say when a process started


def check_git_has_a_commit() -> None:
    """dvclive, which logs the epochs, fails in a git repository that has no commit yet:
    say so before any stage works, not after the backbone has trained for minutes. Outside
    git (or without git installed) there is nothing to check."""
    try:
        inside = subprocess.run(
            ["git", "rev-parse", "--is-inside-work-tree"], capture_output=True, check=False
        )
        head = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "HEAD"], capture_output=True, check=False
        )
    except FileNotFoundError:
        return
    if inside.returncode == 0 and head.returncode != 0:
        raise StageError(
            "this git repository has no commit yet, which dvclive (the epoch logger) needs; "
            "commit first: git add -A && git commit -m 'Start', then dvc repro"
        )


def hand_down_resume_key(stage: str) -> None:
    """Compute ``stage``'s resume key (pipeline.core.resume) once, in the stage's command,
    for its worker processes to read. A worker, or a node's launcher that the head node
    started (distributed.NODE_RANK_BASE), keeps the key it was handed."""
    from pipeline.core import resume
    from pipeline.core.distributed import NODE_RANK_BASE, in_worker

    if stage not in resume.RESUMABLE_STAGES or in_worker() or NODE_RANK_BASE in os.environ:
        return
    key = resume.stage_key(stage)
    if key is None:
        os.environ.pop(resume.KEY_VARIABLE, None)
    else:
        os.environ[resume.KEY_VARIABLE] = f"{stage}:{key}"


def launched(stage: str) -> bool:
    """Start ``stage``'s processes under torch.distributed.run if params ask for several
    (pipeline.core.distributed), and wait for them; False where one process runs it here."""
    from pipeline.core.distributed import in_worker, launch, plan_for
    from pipeline.core.params import load_params

    if in_worker():
        return False
    params = load_params()
    plan = plan_for(stage, params["distributed"], params["device"])
    if plan.world_size == 1:
        return False
    here = f"{plan.nproc_per_node} here" + (
        f" on node {plan.node_rank} of {plan.nnodes}" if plan.nnodes > 1 else ""
    )
    print(f"{stage}: {plan.world_size} processes ({here}, {plan.backend})")
    launch(f"pipeline.{stage}", plan)
    return True


def run_tool(main: Callable[[], int | None]) -> None:
    """Run a command-line tool's ``main`` (not a stage); exit with what it returns, or print
    a bad-input error as one line and exit 2."""
    try:
        sys.exit(main() or 0)
    except (ParamsError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def seconds_since_start() -> float:
    """How long this process has run: from its start where the OS says (Linux's
    /proc/self/stat), else from the import of this module, which every stage imports."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, AttributeError, ValueError, IndexError):
        return time.monotonic() - IMPORTED_AT


def recorded_stage_times(root: Path | str = ".") -> dict[str, dict[str, float]]:
    """The wall times the stages of the run in ``root`` recorded (``record_stage_time``), in
    run order: ``{stage: {"seconds": ..., "startup_seconds": ...}}``. The report, untimed, and
    stages that have not run are absent."""
    from pipeline.core.common import STAGE_TIMES_DIR, STAGES, read_json

    return {
        stage: read_json(path)["time"][stage]
        for stage in STAGES
        if stage != "report" and (path := Path(root) / STAGE_TIMES_DIR / f"{stage}.json").exists()
    }


def record_stage_time(stage: str, startup_seconds: float, work_seconds: float) -> None:
    """Write metrics/time/<stage>.json, ``{"time": {stage: ...}}`` (``dvc exp show`` names its
    columns time.<stage>.seconds): the stage's wall time in seconds, from its process's
    start to the end of its work, and of it the start-up (Python, imports, the git check).
    Several processes' work is the launcher's wall time; the processes it starts, and the
    other nodes' launchers, write nothing."""
    from pipeline.core.common import STAGE_TIMES_DIR, write_json
    from pipeline.core.distributed import NODE_RANK_BASE, in_worker

    if in_worker() or NODE_RANK_BASE in os.environ:
        return
    timing = {
        "seconds": round(startup_seconds + work_seconds, 3),
        "startup_seconds": round(startup_seconds, 3),
    }
    write_json(STAGE_TIMES_DIR / f"{stage}.json", {"time": {stage: timing}})


def run_stage(main: Callable[[], None], stage: str, distributed: bool = False, timed: bool = True) -> None:
    """Run ``stage``'s ``main`` and, if ``timed``, record its wall time
    (``record_stage_time``); print a bad-params or missing-input error as one line, exit 2.

    ``distributed``: the stage can run in several processes. Where params ask for more than
    one, this process checks params, then launches them instead (so a bad params.yaml fails
    once, before any process starts).
    """
    try:
        check_git_has_a_commit()
        if distributed:
            hand_down_resume_key(stage)
        startup, work_started = seconds_since_start(), time.monotonic()
        if not (distributed and launched(stage)):
            main()
        if timed:
            record_stage_time(stage, startup, time.monotonic() - work_started)
    except (ParamsError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
