"""Which model finetune keeps, and the one text that says so: finetune's last line and the
report both read it from the same metrics (selection_summary, kept_note)."""

from __future__ import annotations

from pipeline.core.selection import kept_note, selection_summary

START = {"start_val_loss": 0.39, "start_val_accuracy": 0.88}
BEST = {"best_val_loss": 0.35, "best_val_accuracy": 0.9, "best_epoch": 3}


def test_the_summary_says_which_model_was_kept_and_on_which_val_score():
    history = [
        {"epoch": 0, "val_loss": 0.39, "val_accuracy": 0.88},
        {"epoch": 1, "val_loss": 0.35, "val_accuracy": 0.9},
    ]
    assert selection_summary(history, history[1], "loss") == {
        "selected": "fine-tuned",
        "decided_by": "loss",
        "start_val_loss": 0.39,
        "start_val_accuracy": 0.88,
    }
    assert selection_summary(history, history[0], "accuracy")["selected"] == "start"


def test_an_epoch_kept_at_equal_val_accuracy_is_said_to_win_on_val_loss():
    history = [
        {"epoch": 0, "val_loss": 0.39, "val_accuracy": 0.9},
        {"epoch": 1, "val_loss": 0.35, "val_accuracy": 0.9},
    ]
    assert selection_summary(history, history[1], "accuracy")["decided_by"] == "loss, at equal accuracy"
    assert selection_summary(history, history[0], "accuracy")["decided_by"] == "accuracy"
    tie = kept_note({**START, **BEST, "selected": "fine-tuned", "decided_by": "loss, at equal accuracy"})
    assert "better than the starting model on val loss, at equal accuracy (val loss 0.3900" in tie


def test_the_note_says_whether_the_starting_model_or_an_epoch_was_kept_with_both_scores():
    kept_start = kept_note({**START, **BEST, "selected": "start", "decided_by": "loss"})
    assert "no epoch beat the starting model on val loss" in kept_start
    assert "val loss 0.3900, accuracy 88.00%" in kept_start
    kept_epoch = kept_note({**START, **BEST, "selected": "fine-tuned", "decided_by": "accuracy"})
    assert kept_epoch.startswith(
        "it kept epoch 3 (val loss 0.3500, accuracy 90.00%), better than the starting model on val accuracy"
    )


def test_a_start_kept_because_the_blend_lost_is_said_so_not_that_no_epoch_won():
    history = [
        {"epoch": 0, "val_loss": 0.39, "val_accuracy": 0.7},
        {"epoch": 1, "val_loss": 0.35, "val_accuracy": 0.7},
    ]
    summary = selection_summary(history, history[0], "accuracy", interpolate=0.8)
    assert summary["selected"] == "start" and summary["blend_lost_on_val"] is True
    assert "blend_lost_on_val" not in selection_summary(history, history[0], "accuracy")
    assert kept_note({**summary, **BEST, "interpolate": 0.8}).startswith(
        "an epoch beat the starting model on val, but its blend with it (finetune.interpolate 0.8) did not, "
        "so the fine-tuned model is the starting one, unchanged (val loss 0.3900"
    )
    lost = [history[0], {**history[1], "val_loss": 0.5}]  # no epoch won: the usual note
    summary = selection_summary(lost, lost[0], "accuracy", interpolate=0.8)
    assert summary["blend_lost_on_val"] is False
    assert kept_note({**summary, **BEST, "interpolate": 0.8}).startswith("no epoch beat the starting model")
