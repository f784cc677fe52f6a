"""Resume a training stage from its last finished epoch after a kill, a requeue or a preemption.

DVC deletes a stage's outputs before running it, and an output kept between runs
(``persist: true``) would switch the run-cache off, so the state a stage resumes from lives
outside the outputs: one file a stage under ``$PIPELINE_RESUME_DIR`` (default
``.dvc/tmp/resume``, which git and DVC ignore; the Slurm launcher points it at shared
storage). The file is named by the stage and a key of what makes the stage's run unique to
DVC: its command, the values of the params it declares and the hashes of its deps (code
included), so state made by other params, data or code is never read. The stage deletes it
once its outputs are written.

The key is computed once by the stage's command (pipeline.core.entry) and handed to its
worker processes, and to the other nodes' launchers, in ``$PIPELINE_RESUME_KEY``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.errors import StageError

if TYPE_CHECKING:
    import torch

DIR_VARIABLE = "PIPELINE_RESUME_DIR"
KEY_VARIABLE = "PIPELINE_RESUME_KEY"
DEFAULT_DIR = Path(".dvc/tmp/resume")
# The stages whose training loop saves a state at each epoch's end.
RESUMABLE_STAGES = ("backbone", "finetune")


def stage_key(stage: str) -> str | None:
    """A sha256 of ``stage`` as DVC would run it now: its command, the values of its declared
    params and the hashes of its deps (DVC's state database makes unchanged files' hashes
    cheap); None outside a DVC repository or where DVC cannot read the stage."""
    try:
        from dvc.dependency.param import ParamsDependency
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError:
        return None
    try:
        with Repo() as repo:
            (definition,) = repo.stage.collect(stage)
            deps: dict[str, Any] = {}
            for dep in definition.deps:
                if isinstance(dep, ParamsDependency):
                    deps[dep.def_path] = dep.read_params()
                else:
                    deps[dep.def_path] = dep.get_hash().value if dep.exists else None
    except (DvcException, ValueError, OSError):
        return None
    described = {"stage": stage, "cmd": definition.cmd, "deps": deps}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def key_for(stage: str) -> str | None:
    """This process's resume key for ``stage``: the one handed down in the environment
    (``stage:key``) where it names this stage, else None."""
    handed = os.environ.get(KEY_VARIABLE, "")
    named, _, key = handed.partition(":")
    return key if named == stage and key else None


def resume_dir() -> Path:
    return Path(os.environ.get(DIR_VARIABLE) or DEFAULT_DIR)


@dataclass(frozen=True)
class Resume:
    """Where one stage run keeps the state it resumes from; ``main``: whether this process
    writes it (rank 0) or only reads it."""

    stage: str
    key: str
    main: bool = True

    @property
    def path(self) -> Path:
        return resume_dir() / f"{self.stage}-{self.key[:32]}.pt"

    def load(self) -> dict[str, Any] | None:
        """The state saved at the last finished epoch, or None to start from the beginning."""
        import torch

        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a file cut short by a crash of the file system
            raise StageError(
                f"{self.path}: unreadable resume state ({type(error).__name__}: {error}); "
                "delete it to start the stage from its first epoch"
            ) from None
        if state.get("key") != self.key:
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        from pipeline.core.common import save_torch

        if self.main:
            save_torch(self.path, {**state, "key": self.key})

    def clear(self) -> None:
        """Delete the state: the stage has written its outputs."""
        if self.main:
            self.path.unlink(missing_ok=True)


def for_stage(stage: str, main: bool = True) -> Resume | None:
    """The Resume of ``stage`` in this process, or None where no key was handed down (a
    stage's main() called from Python, not its command)."""
    key = key_for(stage)
    return Resume(stage, key, main) if key else None


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's (CPU and CUDA) random states, as tensors and plain
    values that torch.load reads with ``weights_only``."""
    import torch

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_states(*generators: torch.Generator | None) -> list[torch.Tensor | None]:
    return [None if generator is None else generator.get_state() for generator in generators]


def set_generator_states(states: list[torch.Tensor | None], *generators: torch.Generator | None) -> None:
    for state, generator in zip(states, generators, strict=True):
        if state is not None and generator is not None:
            generator.set_state(state)
