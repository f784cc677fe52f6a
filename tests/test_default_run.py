"""The default params.yaml's run that main carries, and what any `dvc repro` of it promises.

Two different things, checked apart:

- the committed run: the metrics and report in git at HEAD, made on the machine that
  committed them, which the README quotes figure for figure;
- the run in this work tree: the committed one, or one that `dvc repro` recomputed here. On
  another CPU its floats differ a little (one image more or less right), so it is checked for
  what the pipeline promises, transfer shown, never for equality with another machine's
  numbers; tests/test_lock.py checks that dvc.lock describes it.

Rerunning the default pipeline here would take minutes of the suite's ten;
`python -m benchmarks.run_cache` measures a fresh one, and the README quotes it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.core.metrics import probe_comparison_note
from tests.conftest import ROOT, run, stale_stages

Reader = Callable[[str], str]


def committed_reader(repo: Path) -> Reader:
    """A file's text as committed at HEAD (what the README quotes), whatever the work tree holds."""
    return lambda path: run(repo, "git", "show", f"HEAD:{path}").stdout


def workspace_reader(repo: Path) -> Reader:
    return lambda path: (repo / path).read_text()


def check_transfer(read: Reader) -> None:
    """What a default run promises on any machine: the fine-tuned model at 97% or better, and
    pretrained features that beat random-init ones under the same probe."""
    test = json.loads(read("metrics/test.json"))
    random_init = json.loads(read("metrics/baseline.json"))["random_init_probe"]
    assert test["finetuned"]["accuracy"] >= 0.97, test["finetuned"]
    assert test["linear_probe"]["accuracy"] > random_init["accuracy"], (test, random_init)


def check_quoted(read: Reader, readme: str) -> None:
    """The README's results table and the report give the run's figures to the digit."""
    test = json.loads(read("metrics/test.json"))
    random_init = json.loads(read("metrics/baseline.json"))["random_init_probe"]
    report = read("reports/report.md")
    for label, scores in (
        ("random-init features, linear probe", random_init),
        ("glyph-pretrained features, linear probe", test["linear_probe"]),
        ("fine-tuned", test["finetuned"]),
    ):
        assert f"| {label} | {scores['accuracy']:.2%} | {scores['macro_f1']:.4f} |" in readme, label
        assert f"{scores['accuracy']:.2%}" in report, label
    paired = test["finetuned_vs_probe"]
    tuned, probe = paired["only_finetuned_right"], paired["only_probe_right"]
    disagree = (
        f"disagree on {tuned + probe} of the {paired['examples']} test images: the fine-tuned model "
        f"gets {tuned} of them right, the probe {probe} (exact McNemar p = {paired['p_value']:.2g})"
    )
    if not tuned + probe:
        disagree = f"get the same {paired['examples']} test images right and wrong"
    assert disagree in " ".join(readme.split())  # wherever the README's lines wrap
    assert probe_comparison_note(paired, "images") in " ".join(report.split())


def test_the_committed_run_shows_transfer_and_the_readme_and_report_quote_it():
    check_transfer(committed_reader(ROOT))
    check_quoted(committed_reader(ROOT), (ROOT / "README.md").read_text())


def test_the_run_in_this_work_tree_shows_transfer():
    """The committed run, or the one `dvc repro` (the README's set-up command) recomputed."""
    check_transfer(workspace_reader(ROOT))


def recompute_elsewhere(repo: Path) -> None:
    """What `dvc repro` on another CPU leaves in a clone: one more test image right (the
    fine-tuned accuracy and report change), and dvc.lock pinning the new file."""
    metrics = repo / "metrics/test.json"
    test = json.loads(metrics.read_text())
    test["finetuned"]["accuracy"] = round(test["finetuned"]["accuracy"] + 1 / 450, 6)
    metrics.write_text(json.dumps(test, indent=2) + "\n")
    report = repo / "reports/report.md"
    report.write_text(report.read_text().replace("fine-tuned", "fine-tuned (recomputed)", 1))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in lock["stages"].values():  # as an out of one stage and a dep of others
        for entry in stage.get("deps", []) + stage.get("outs", []):
            if entry["path"] in ("metrics/test.json", "reports/report.md"):
                content = (repo / entry["path"]).read_bytes()
                entry.update(md5=hashlib.md5(content).hexdigest(), size=len(content))
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def test_a_run_recomputed_on_another_cpu_keeps_these_checks_green(tmp_path):
    """A clone whose `dvc repro` came out a little different, as on another CPU: the
    committed run still matches the README (it is read from git), the recomputed one still
    shows transfer, and dvc.lock still describes the work tree. Then `git checkout .`, as
    the README says, brings the committed run back."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    readme = (clone / "README.md").read_text()
    recompute_elsewhere(clone)
    assert workspace_reader(clone)("metrics/test.json") != committed_reader(clone)("metrics/test.json")
    check_quoted(committed_reader(clone), readme)
    check_transfer(workspace_reader(clone))
    assert not stale_stages(clone)

    run(clone, "git", "checkout", ".")
    assert workspace_reader(clone)("metrics/test.json") == committed_reader(clone)("metrics/test.json")
    check_quoted(workspace_reader(clone), readme)
