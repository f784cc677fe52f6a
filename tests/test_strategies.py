import json
from pathlib import Path

import pytest

from pipeline.core.errors import StageError
from pipeline.tools import strategies
from tests.conftest import declared_outputs

BASE = {"seed": 1, "lr": 0.001, "finetune": {"strategy": "full", "l2sp": 0.0, "optimizer": "adamw"}}


def state(rev, params, metrics=None, experiments=None, name=None):
    files = (
        {}
        if metrics is None
        else {
            "metrics/test.json": {
                "data": {
                    "finetuned": {"accuracy": metrics[0], "macro_f1": metrics[0] - 0.01},
                    "linear_probe": {"accuracy": metrics[1], "macro_f1": metrics[1] - 0.01},
                }
            },
            "reports/live/finetune/metrics.json": {"data": {"finetune": {"trainable_params": metrics[2]}}},
            **(
                {"metrics/finetune_time.json": {"data": {"finetune": {"seconds": metrics[3]}}}}
                if len(metrics) > 3
                else {}
            ),
        }
    )
    return {
        "rev": rev,
        "name": name,
        "data": {"rev": rev, "params": {"params.yaml": {"data": params}}, "metrics": files},
        "error": None,
        "experiments": experiments,
    }


def with_changes(seed, **finetune):
    return {**BASE, "seed": seed, "finetune": {**BASE["finetune"], **finetune}}


def exp_show():
    experiments = [
        state("a1", with_changes(1), (0.80, 0.70, 1000, 10.0)),
        state("a2", with_changes(2), (0.82, 0.72, 1000, 12.0)),
        state("b1", with_changes(1, strategy="adapters"), (0.90, 0.70, 100, 5.0)),
        state("b2", with_changes(2, strategy="adapters"), (0.86, 0.72, 100, 7.0)),
        state("q1", with_changes(3, l2sp=0.01)),  # queued or failed: no metrics
        state("c1", {**with_changes(1), "data": {"max_train_per_class": 10}}, (0.60, 0.50, 1000)),  # no time
    ]
    ranges = [
        {"revs": [experiment], "executor": None, "name": experiment["rev"]} for experiment in experiments
    ]
    return [state("workspace", BASE), state("main-sha", BASE, (0.5, 0.5, 1, 1.0), ranges, name="main")]


def test_experiments_group_by_what_they_change_with_mean_and_std_over_seeds(tmp_path):
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps(exp_show()))
    out, figure = tmp_path / "strategies.md", tmp_path / "figures" / "strategies.png"
    strategies.main(["--json", str(saved), "--out", str(out), "--figure", str(figure)])
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in out.read_text().splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["linear probe"][1:3] == ["2", "71.00 ± 1.41"]
    assert list(rows)[1:] == [  # each probe, then the strategies that share its upstream stages
        "linear probe",
        "as committed",
        "strategy=adapters",
        "linear probe, max_train_per_class=10",
        "max_train_per_class=10",
    ]
    assert rows["linear probe"][4:] == ["–", "–"]
    assert rows["as committed"][1:] == ["2", "81.00 ± 1.41", "0.8000 ± 0.0141", "1,000", "11.0 ± 1.4"]
    assert rows["strategy=adapters"][1:] == ["2", "88.00 ± 2.83", "0.8700 ± 0.0283", "100", "6.0 ± 1.4"]
    assert "l2sp=0.01" not in out.read_text()
    assert rows["linear probe, max_train_per_class=10"][1:3] == ["1", "50.00"]
    assert rows["max_train_per_class=10"][1:] == ["1", "60.00", "0.5900", "1,000", "–"]
    assert figure.stat().st_size > 0


def test_no_finished_experiment_says_what_to_run(tmp_path):
    saved = tmp_path / "show.json"
    saved.write_text(json.dumps([state("workspace", BASE), state("main-sha", BASE)]))
    with pytest.raises(StageError, match="no finished experiment"):
        strategies.main(
            ["--json", str(saved), "--out", str(tmp_path / "s.md"), "--figure", str(tmp_path / "s.png")]
        )


def test_the_tools_write_outside_every_output_that_dvc_repro_replaces():
    """strategies' table and figure and compare's diff are written where no stage's out lies:
    the next `dvc repro` deletes a stage's outs before it runs (the report stage's
    reports/figures/ among them), and would take a figure written there with it."""
    from pipeline.tools import compare

    outs = [Path(out) for out in declared_outputs()]
    for path in (
        strategies.STRATEGIES_FILE,
        strategies.STRATEGIES_FIGURE,
        compare.COMPARE_FILE,
        compare.COMPARE_DIR,
    ):
        clashes = [out for out in outs if out == path or out in path.parents]
        assert not clashes, (path, clashes)
