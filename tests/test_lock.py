"""main carries a dvc.lock from a full default run of the current code and params."""

from __future__ import annotations

import json

from tests.conftest import ROOT, run


def test_dvc_lock_matches_the_code_and_params():
    """Every stage's code and params deps, and the metrics and reports kept in git, match
    dvc.lock; only DVC-cached outputs may be absent (a fresh clone has no DVC cache). So
    every pull request has a base to diff against."""
    status = json.loads(run(ROOT, "dvc", "status", "--json").stdout or "{}")
    stale = {}
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
    assert not stale, f"dvc.lock is out of date; run `dvc repro` and commit it: {stale}"
