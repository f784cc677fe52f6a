"""The default params.yaml, run whole from scratch and offline: what the README promises."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import default_params, make_pipeline_repo, run

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_default_run_is_offline_fast_and_shows_transfer(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo", default_params())
    start = time.perf_counter()
    run(repo, "dvc", "repro")
    seconds = time.perf_counter() - start
    test = json.loads((repo / "metrics/test.json").read_text())
    baseline = json.loads((repo / "metrics/baseline.json").read_text())["random_init_probe"]
    print(f"default run: {seconds:.0f} s; test accuracy {test}; random-init probe {baseline}")
    assert seconds < 600, f"the default run took {seconds:.0f} s, over the 10 minutes promised"
    assert test["finetuned"]["accuracy"] >= 0.97
    assert test["linear_probe"]["accuracy"] > baseline["accuracy"]
    report = (repo / "reports/report.md").read_text()
    assert f"{test['finetuned']['accuracy']:.2%}" in report
