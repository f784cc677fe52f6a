"""A training stage's per-epoch log: written through dvclive, read back for the report.

One format, one module: ``EpochLog`` writes it while a stage trains, ``read_epoch_log``
reads it (the report stage, which needs neither torch nor dvclive to do so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import StageError


class EpochLog:
    """A stage's per-epoch log through dvclive, DVC's own logger.

    Writes ``<directory>/metrics.json`` after every epoch (the latest epoch, and at the end
    the best one: what ``dvc exp show`` and DVC Studio show while a stage runs) and one TSV
    per metric under ``<directory>/plots/metrics/<stage>/`` (``dvc plots``). Metric names
    start with the stage, so columns read ``finetune.val_accuracy``. dvc.yaml declares these
    files itself (``dvcyaml=False``), and a ``dvc repro`` run is no experiment of its own
    (``save_dvc_exp=False``).
    """

    def __init__(self, directory: Path, stage: str) -> None:
        from dvclive import Live

        self.stage = stage
        self.live = Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False, report=None)

    def __call__(self, record: dict[str, float]) -> None:
        self.live.step = int(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                self.live.log_metric(f"{self.stage}/{name}", value)
        self.live.next_step()

    def close(self, best: dict[str, float]) -> None:
        """Add the best epoch to the summary and write it."""
        summary = self.live.summary.setdefault(self.stage, {})
        summary["best_epoch"] = int(best["epoch"])
        for name in ("val_loss", "val_accuracy"):
            summary[f"best_{name}"] = best[name]
        self.live.end()


def read_epoch_log(directory: Path, stage: str) -> dict[str, np.ndarray]:
    """A stage's EpochLog, read back as arrays by metric name, plus ``epoch``."""
    folder = Path(directory) / "plots" / "metrics" / stage
    files = sorted(folder.glob("*.tsv"))
    tables = {path.stem: np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2) for path in files}
    if not tables:
        raise StageError(f"{folder}: no per-epoch log; run the {stage} stage first (dvc repro)")
    history = {name: table[:, -1] for name, table in tables.items()}
    history["epoch"] = next(iter(tables.values()))[:, 0]
    return history
