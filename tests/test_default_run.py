"""The default params.yaml's run that main carries: what the README promises.

tests/test_lock.py checks that dvc.lock is that of the current code and params, so the
metrics and report checked here are the results of a full default run of this code, made
on the machine that committed it. Rerunning it here would take five minutes of the suite's
ten and compare a fresh run with a lock made elsewhere; `python -m benchmarks.run_cache`
measures a fresh one, and the README quotes it.
"""

from __future__ import annotations

import json

from tests.conftest import ROOT


def committed(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def test_default_run_shows_transfer_and_the_readme_and_report_quote_it():
    test = committed("metrics/test.json")
    random_init = committed("metrics/baseline.json")["random_init_probe"]
    assert test["finetuned"]["accuracy"] >= 0.97
    assert test["linear_probe"]["accuracy"] > random_init["accuracy"]
    readme, report = (ROOT / "README.md").read_text(), (ROOT / "reports/report.md").read_text()
    for label, scores in (
        ("random-init features, linear probe", random_init),
        ("glyph-pretrained features, linear probe", test["linear_probe"]),
        ("fine-tuned", test["finetuned"]),
    ):
        assert f"| {label} | {scores['accuracy']:.2%} | {scores['macro_f1']:.4f} |" in readme, label
        assert f"{scores['accuracy']:.2%}" in report, label
