"""The whole pipeline on labelled texts: generated sentences and a tiny BERT, in a temporary
git+dvc repository (conftest's tiny_text_run), then predict and the ONNX export on them."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from pipeline.core.checkpoints import read_sidecar
from pipeline.core.common import STAGES
from tests.conftest import (
    Run,
    copy_repo,
    csv_rows,
    declared_outputs,
    experiments,
    ran_stages,
    read_params,
    run,
    write_params,
)
from tests.test_pipeline import read_back

pytestmark = pytest.mark.slow


def test_every_stage_runs_on_texts_and_writes_every_declared_output(tiny_text_run: Run):
    repo = tiny_text_run.repo
    assert sorted(ran_stages(tiny_text_run.output)) == sorted(STAGES)
    for path in map(repo.joinpath, declared_outputs()):
        read_back(path)
    test = json.loads((repo / "metrics/test.json").read_text())
    assert {"linear_probe", "finetuned"} <= set(test)
    summary = json.loads((repo / "data/features/summary.json").read_text())
    assert sum(split["truncated"] for split in summary.values()) > 0  # the long tails, cut at 16 tokens
    report = (repo / "reports/report.md").read_text()
    truncated = sum(split["truncated"] for split in summary.values())
    assert f"{truncated} of them longer than 16 tokens, truncated" in report
    assert "| text | true | predicted | probability | loss |" in report  # the highest-loss texts
    print(f"tiny text pipeline, every stage: {tiny_text_run.seconds:.0f} s")


def test_a_new_fine_tuning_rate_changes_only_finetune_s_params(tiny_text_run: Run, tmp_path):
    """`dvc exp run -S lr=...` reruns finetune and what depends on its outputs: dvc status
    finds the changed param in finetune alone (and report, which lists every param)."""
    repo = copy_repo(tiny_text_run.repo, tmp_path / "repo")
    params = read_params(repo)
    params["lr"] = 1e-4
    write_params(repo, params)
    status = json.loads(run(repo, "dvc", "status", "--json").stdout)
    assert status == {
        stage: [{"changed deps": {"params.yaml": {"lr": "modified"}}}] for stage in ("finetune", "report")
    }
    shown = experiments(repo)[0]  # dvc exp show: the probe's and the fine-tuned model's metrics
    for column in ("linear_probe.accuracy", "finetuned.accuracy", "random_init_probe.accuracy"):
        assert 0.0 <= float(shown[column]) <= 1.0, column


def predict(repo, *args: str) -> tuple[list[dict[str, str]], str]:
    result = run(repo, sys.executable, "-m", "pipeline.tools.predict", *args)
    return list(csv.DictReader(io.StringIO(result.stdout))), result.stderr


def test_predict_reads_a_csv_with_a_bad_row_and_the_onnx_export_agrees(tiny_text_run: Run, tmp_path):
    repo = tiny_text_run.repo
    news = tmp_path / "news.csv"
    news.write_text(
        "id,body\n"
        '1,"the team won the match today, and everyone talked about it"\n'
        "2,   \n"
        "3,the soup needed more salt\n"
        "4,too,many,fields\n"
    )
    by_model = {}
    for name, model in (
        ("torch", ["--model", "models/finetuned.pt"]),
        ("onnx", ["--onnx", "models/model.onnx"]),
    ):
        rows, stderr = predict(repo, str(news), "--text-column", "body", "--text", "bright sun today", *model)
        by_model[name] = rows
        assert "predict: 3 of 5 text(s) predicted" in stderr
    rows = by_model["torch"]
    assert [row["source"] for row in rows] == ["--text 1", f"{news}:2", f"{news}:3", f"{news}:4", f"{news}:5"]
    assert rows[2]["error"] == "an empty text" and rows[2]["class_1"] == ""
    assert rows[4]["error"] == "4 fields, the header has 2"
    classes = set(json.loads((repo / "metrics/per_class.json").read_text())["classes"])
    for torch_row, onnx_row in zip(by_model["torch"], by_model["onnx"], strict=True):
        if not torch_row["error"]:
            assert torch_row["class_1"] in classes and torch_row["class_1"] == onnx_row["class_1"]
            assert float(torch_row["probability_1"]) == pytest.approx(
                float(onnx_row["probability_1"]), abs=1e-5
            )


def test_the_export_checked_every_test_text_and_ships_the_tokenizer(tiny_text_run: Run):
    repo = tiny_text_run.repo
    result = json.loads((repo / "metrics/export.json").read_text())
    test_texts = len(csv_rows(repo / "metrics/test_predictions.csv"))
    assert result["examples"] == test_texts and result["top1_disagreements"] == 0
    assert result["max_abs_logit_difference"] <= 1e-4
    meta = read_sidecar(repo / "models/model.onnx")
    assert [spec["name"] for spec in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["modality"] == "text" and meta["max_length"] == 16
    assert json.loads(meta["tokenizer"])["model"]["type"] == "WordPiece"


def test_predict_on_the_test_split_agrees_with_evaluate(tiny_text_run: Run, tmp_path):
    """The test texts written out by pipeline.tools.samples, predicted through the command line,
    get the class and probability evaluate gave them."""
    repo = tiny_text_run.repo
    samples = tmp_path / "samples"
    run(repo, sys.executable, "-m", "pipeline.tools.samples", str(samples), "--per-class", "0")
    rows, _ = predict(repo, str(samples / "test.csv"), "--top-k", "1")
    evaluated = csv_rows(repo / "metrics/test_predictions.csv")
    assert len(rows) == len(evaluated)
    for row, expected in zip(rows, evaluated, strict=True):
        assert row["class_1"] == expected["predicted"]
        assert float(row["probability_1"]) == pytest.approx(float(expected["probability"]), abs=1e-5)
