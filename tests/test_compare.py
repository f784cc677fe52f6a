"""The pull-request model diff: pipeline.compare, and the workflow that posts it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run

WORKFLOW = ROOT / ".github" / "workflows" / "model-diff.yml"


def compare(repo: Path, base: str = "main") -> str:
    run(repo, sys.executable, "-m", "pipeline.compare", "--base", base)
    return (repo / "reports" / "compare.md").read_text()


@pytest.mark.slow
def test_branch_with_another_lr_shows_the_param_and_signed_metric_deltas(tiny_repo):
    run(tiny_repo, "git", "checkout", "-q", "-b", "lower-lr")
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    old_lr = params["lr"]
    params["lr"] = 0.01
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(tiny_repo, "dvc", "repro")
    run(tiny_repo, "git", "commit", "-q", "-am", "try lr 0.01")

    markdown = compare(tiny_repo)
    assert f"| `lr` | `{old_lr}` | `0.01` |" in markdown
    assert "No change" not in markdown
    metrics = [line for line in markdown.splitlines() if line.startswith("| fine-tuned accuracy")]
    assert len(metrics) == 1 and (" pp |" in metrics[0])
    sign = metrics[0].split("|")[4].strip()[0]
    assert sign in "+-"
    for side in ("base", "head"):
        assert (tiny_repo / "reports" / "compare" / f"{side}_confusion_matrices.png").is_file()
        assert f"compare/{side}_training_curves.png" in markdown


@pytest.mark.slow
def test_branch_with_no_change_says_so(tiny_repo):
    run(tiny_repo, "git", "checkout", "-q", "-b", "docs-only")
    markdown = compare(tiny_repo)
    assert "**No change**" in markdown
    assert "No params changed against `main`." in markdown
    assert "+0.00 pp" in markdown


@pytest.mark.slow
def test_unknown_base_is_a_clear_error(tiny_repo):
    result = run(tiny_repo, sys.executable, "-m", "pipeline.compare", "--base", "nope", check=False)
    assert result.returncode == 2
    assert "--base: 'nope' is not a commit here" in result.stderr


def test_workflow_passes_actionlint():
    result = run(ROOT, shutil.which("actionlint") or "actionlint", str(WORKFLOW), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs-onn: ubuntu-latest"))
    result = run(tmp_path, shutil.which("actionlint") or "actionlint", str(broken), check=False)
    assert result.returncode != 0


def test_workflow_has_least_privilege_and_full_history():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # PyYAML reads the key `on` as the boolean True
    assert set(triggers) == {"pull_request"}
    assert workflow["permissions"] == {"contents": "read", "pull-requests": "write"}
    steps = workflow["jobs"]["model-diff"]["steps"]
    checkout = next(step for step in steps if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "dvc repro" in commands and "python -m pipeline.compare" in commands
    assert "cml comment update" in commands
