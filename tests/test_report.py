"""The report's pieces that choose what to show: the gallery of mistakes and the confused pairs."""

from __future__ import annotations

import csv
import io

from pipeline.report import confused_pairs_table, highest_loss_rows

PREDICTIONS = """index,source,actual,predicted,probability,loss
0,,cat,cat,0.900000,0.105361
1,,cat,dog,0.700000,2.302585
2,,dog,dog,0.600000,0.510826
3,,fox,cat,0.950000,4.605170
4,,dog,fox,0.500000,2.302585
"""


def test_the_gallery_shows_the_highest_loss_images_largest_first():
    rows = list(csv.DictReader(io.StringIO(PREDICTIONS)))
    chosen = highest_loss_rows(rows, 3)
    assert [row["index"] for row in chosen] == ["3", "1", "4"]  # equal losses: the earlier image first
    assert [row["index"] for row in highest_loss_rows(rows, 16)] == ["3", "1", "4", "2", "0"]


def test_confused_pairs_are_named_with_both_directions():
    details = {
        "classes": ["cat", "dog", "fox"],
        "finetuned": {"confusion_matrix": [[5, 1, 0], [0, 6, 1], [1, 0, 4]]},
    }
    table = confused_pairs_table(details)
    assert "| cat and dog | 1 | cat as dog: 1; dog as cat: 0 |" in table
    assert "| cat and fox | 1 | cat as fox: 0; fox as cat: 1 |" in table
    perfect = {"classes": ["cat", "dog"], "finetuned": {"confusion_matrix": [[3, 0], [0, 2]]}}
    assert confused_pairs_table(perfect) == "The fine-tuned model confused no two classes on the test split."


def test_the_report_says_whether_a_gpu_rerun_gives_the_same_bits():
    from pipeline.report import determinism_note

    assert "torch's deterministic kernels" in determinism_note({"deterministic": True})
    assert "torch's deterministic kernels" in determinism_note({})  # a run from before the key
    assert determinism_note({"deterministic": False}).startswith("deterministic: false, so on a GPU cuDNN")


def test_the_recipe_note_says_what_finetune_used_and_the_blend_only_when_on():
    from pipeline.report import recipe_note

    used = {"augment": "photo", "bn": "frozen", "mix": "none", "ema_epochs": 2.0, "interpolate": 1.0}
    note = ", augmentation photo, BatchNorm frozen, mixing none, weights averaged over 2 epochs (EMA)"
    assert recipe_note(used) == note
    assert (
        recipe_note({**used, "interpolate": 0.7})
        == f"{note}, then 0.7 of the way from the starting model (WiSE-FT)"
    )
    assert recipe_note({**used, "ema_epochs": 0.0}).endswith("mixing none, no weight average")
    assert recipe_note({"strategy": "full"}) == ""  # a run from before the recipe was recorded
    schedule = {
        "epochs": 20,
        "batch_size": 16,
        "steps": 500,
        "schedule": "batch 16 (auto): ...; 20 epochs (auto)",
    }
    assert recipe_note({**used, **schedule}) == (
        ", augmentation photo, BatchNorm frozen, mixing none, 500 optimizer steps "
        "(batch 16 (auto): ...; 20 epochs (auto)), weights averaged over 2 epochs (EMA)"
    )


def test_the_time_table_lists_the_stages_in_run_order_with_their_share(tmp_path, monkeypatch):
    import json

    from pipeline.report import stage_times_table

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/time").mkdir(parents=True)
    for stage, seconds in (("finetune", 30.0), ("prepare", 10.0), ("report", 99.0)):
        timing = {"time": {stage: {"seconds": seconds, "startup_seconds": 2.0}}}
        (tmp_path / f"metrics/time/{stage}.json").write_text(json.dumps(timing))
    rows = stage_times_table().splitlines()
    assert rows[2:] == [
        "| prepare | 10.0 | 2.0 | 25% |",
        "| finetune | 30.0 | 2.0 | 75% |",
        "| the run, all but the report | 40.0 | 4.0 | 100% |",
    ]


def test_the_run_order_of_the_stages_is_dvc_yamls():
    import yaml

    from pipeline.core.common import STAGES
    from tests.conftest import ROOT

    assert tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) == STAGES
