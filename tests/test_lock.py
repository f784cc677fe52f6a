"""main carries a dvc.lock from a full default run of the current code and params."""

from __future__ import annotations

from tests.conftest import ROOT, stale_stages


def test_dvc_lock_matches_the_code_and_params():
    """Every stage's code and params deps, and the metrics and reports kept in git, match
    dvc.lock; only DVC-cached outputs may be absent (a fresh clone has no DVC cache). So
    every pull request has a base to diff against."""
    stale = stale_stages(ROOT)
    assert not stale, f"dvc.lock is out of date; run `dvc repro` and commit it: {stale}"
