"""main carries a dvc.lock from a full default run of the current code and params."""

from __future__ import annotations

import json

from tests.conftest import ROOT, run


def test_dvc_lock_matches_the_code_and_params():
    """Every stage's code and params deps match dvc.lock; only data outputs may be absent
    (a fresh clone has no DVC cache), so pull requests always have a base to diff against."""
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
    assert not stale, f"dvc.lock is out of date; run `dvc repro` and commit it: {stale}"
