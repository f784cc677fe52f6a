"""python -m pipeline predict: a CSV of top-k classes for image files and folders.

The fast tests use a small untrained classifier saved the way finetune saves one; the slow
ones use the tiny run's fine-tuned model and ONNX export.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.checkpoints import classifier_checkpoint, read_classifier
from pipeline.core.errors import ParamsError, StageError
from pipeline.core.models import Classifier, build_head
from pipeline.modalities.images.models import build_backbone
from pipeline.tools import predict
from tests.conftest import Run, csv_rows, run, subprocess_env

CLASSES = ["cat", "dog", "fox"]


def save_classifier(path: Path, image_size: int = 16) -> Path:
    """An untrained resnet18 classifier, written as finetune writes models/finetuned.pt."""
    torch.manual_seed(0)
    backbone, features = build_backbone("resnet18", image_size=image_size)
    model = Classifier(backbone, build_head("linear", features, len(CLASSES), 8, 0.0))
    meta = {"modality": "images", "arch": "resnet18", "weights": "none", "image_size": image_size}
    backbone_checkpoint = {**meta, "resize_size": image_size, "mean": [0.5] * 3, "std": [0.5] * 3}
    head = {"type": "linear", "in_features": features, "hidden_units": 8, "dropout": 0.0, "classes": CLASSES}
    torch.save(classifier_checkpoint(model.state_dict(), backbone_checkpoint, head), path)
    return path


def write_image(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("model") / "finetuned.pt")


def predict_csv(*args: str, cwd: Path | None = None) -> tuple[int, list[dict[str, str]], str]:
    """Run the command line; its exit code, CSV rows (stdout) and stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.predict", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**subprocess_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        check=False,
    )
    return result.returncode, list(csv.DictReader(io.StringIO(result.stdout))), result.stderr


def predict_in_process(capsys, *args: str, workers: int = 0) -> tuple[int, list[dict[str, str]], str]:
    """predict.main in this process (no torch import to wait for): exit code, rows, stderr."""
    code = predict.main([*args, "--num-workers", str(workers)])
    captured = capsys.readouterr()
    return code, list(csv.DictReader(io.StringIO(captured.out))), captured.err


def test_a_folder_with_a_stray_text_file_and_a_truncated_jpeg(tmp_path, model_file, capsys):
    folder = tmp_path / "photos"
    good = [write_image(folder / "a.png", 1), write_image(folder / "nested" / "b.png", 2)]
    (folder / "notes.txt").write_text("not an image")
    jpeg = write_image(tmp_path / "whole.jpg", 3, size=64).read_bytes()
    (folder / "nested" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    args = (str(folder), "--model", str(model_file), "--top-k", "2", "--batch-size", "2")
    code, rows, stderr = predict_in_process(capsys, *args, workers=2)  # errors cross worker processes

    assert code == 0, stderr
    assert [row["path"] for row in rows] == [str(path) for path in [*good, folder / "nested" / "cut.jpg"]]
    assert list(rows[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    for row in rows[:2]:
        assert row["error"] == ""
        assert row["class_1"] in CLASSES and row["class_2"] in CLASSES and row["class_1"] != row["class_2"]
        assert 1.0 >= float(row["probability_1"]) >= float(row["probability_2"]) > 0.0
    assert rows[2]["class_1"] == "" and "truncated" in rows[2]["error"]
    assert "2 of 3 image(s) predicted; 1 non-image file(s) in the folders skipped" in stderr


def test_probabilities_are_the_models_softmax_over_every_class(tmp_path, model_file, capsys):
    image = write_image(tmp_path / "one.png", 4)
    code, rows, _ = predict_in_process(capsys, str(image), "--model", str(model_file), "--top-k", "3")
    assert code == 0
    probabilities = [float(rows[0][f"probability_{rank}"]) for rank in (1, 2, 3)]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_csv_goes_to_out_and_a_rerun_replaces_it_whole(tmp_path, model_file, capsys):
    images = [write_image(tmp_path / "in" / f"{i}.png", i) for i in range(5)]
    out = tmp_path / "predictions.csv"
    for _ in range(2):
        args = (str(tmp_path / "in"), "--model", str(model_file), "--out", str(out), "--batch-size", "2")
        code, printed, _ = predict_in_process(capsys, *args)
        assert code == 0 and printed == []
    rows = csv_rows(out)
    assert [row["path"] for row in rows] == [str(path) for path in images]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".predictions.csv.tmp")]


def test_no_readable_image_exits_non_zero_with_the_reason(tmp_path, model_file, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really")
    code, rows, stderr = predict_in_process(capsys, str(broken), "--model", str(model_file))
    assert code == 1
    assert rows[0]["path"] == str(broken) and rows[0]["error"]
    assert "none of the 1 file(s) could be read as an image" in stderr and str(broken) in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.png"], "missing.png: no such file or folder"),
        (["x.png", "--top-k", "4"], "--top-k: must be 1 to 3 (the model's classes), got 4"),
        (["x.png", "--top-k", "0"], "--top-k: must be 1 to 3"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, model_file, monkeypatch, args, message):
    write_image(tmp_path / "x.png", 5)
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ParamsError, StageError), match=re.escape(message)):
        predict.main([*args, "--model", str(model_file)])


def test_an_unknown_device_and_an_unreadable_onnx_file_are_one_line_errors(tmp_path, model_file, capsys):
    """``--device bogus`` is refused by the argument parser, naming the choices; an ONNX file
    that onnxruntime cannot load (beside a sidecar that matches its bytes) is a one-line
    error with exit 2: neither ends in a traceback."""
    from pipeline.core.checkpoints import onnx_sidecar, preprocessing_of
    from pipeline.core.common import file_sha256
    from pipeline.core.entry import run_tool

    image = str(write_image(tmp_path / "x.png", 5))
    with pytest.raises(SystemExit) as exit_info:
        run_tool(lambda: predict.main([image, "--model", str(model_file), "--device", "bogus"]))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --device: invalid choice: 'bogus'" in stderr
    assert "(choose from 'auto', 'cpu', 'cuda', 'mps')" in stderr
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not a protobuf at all")
    checkpoint = torch.load(model_file, weights_only=True)
    meta = onnx_sidecar(
        {**preprocessing_of(checkpoint), "classes": CLASSES}, [], "0", file_sha256(onnx_file), 18
    )
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        run_tool(lambda: predict.main([image, "--onnx", str(onnx_file)]))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith(f"error: {onnx_file}: not an ONNX model that onnxruntime can load (")
    assert len(stderr.strip().splitlines()) == 1


def test_model_files_that_are_not_ours_or_are_older_say_so(tmp_path, model_file):
    checkpoint = torch.load(model_file, weights_only=True)
    older = {key: value for key, value in checkpoint.items() if key not in ("format", "format_version")}
    cases = {
        "older.pt": (older, "written by an older version of this pipeline"),
        "newer.pt": ({**checkpoint, "format_version": 99}, "format version 99"),
        "weights.pt": (
            {"conv.weight": torch.zeros(1)},
            "not a model written by this pipeline's finetune stage",
        ),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(StageError, match=re.escape(message)):
            read_classifier(tmp_path / name)
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(StageError, match="not a model written by this pipeline"):
        read_classifier(tmp_path / "notes.pt")


@pytest.mark.slow
def test_predict_agrees_with_evaluate_and_onnx_on_the_test_split(tiny_run: Run, tmp_path):
    """The test split written out as PNGs (lossless: the pixels evaluate saw), predicted
    through the command line with the fine-tuned model and with its ONNX export."""
    repo = tiny_run.repo
    samples = tmp_path / "samples"
    run(repo, sys.executable, "-m", "pipeline.tools.samples", str(samples), "--per-class", "0")
    evaluated = {int(row["index"]): row for row in csv_rows(repo / "metrics" / "test_predictions.csv")}
    by_model = {}
    for model in (["--model", "models/finetuned.pt"], ["--onnx", "models/model.onnx"]):
        code, rows, stderr = predict_csv(str(samples), *model, "--top-k", "1", cwd=repo)
        assert code == 0, stderr
        by_model[model[0]] = {int(Path(row["path"]).stem.split("-")[1]): row for row in rows}
    assert len(by_model["--model"]) == len(evaluated)
    for index, expected in evaluated.items():
        for rows in by_model.values():
            assert rows[index]["class_1"] == expected["predicted"], index
            assert float(rows[index]["probability_1"]) == pytest.approx(
                float(expected["probability"]), abs=2e-5
            )


def test_a_file_name_that_is_not_utf8_is_written_escaped(tmp_path, model_file, capsys):
    import os

    folder = tmp_path / "photos"
    write_image(folder / "a.png", 1)
    latin1 = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.png")
    write_image(Path(latin1), 2)
    out = tmp_path / "predictions.csv"
    code, _, stderr = predict_in_process(capsys, str(folder), "--model", str(model_file), "--out", str(out))
    assert code == 0, stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [row["path"] for row in rows] == [str(folder / "a.png"), str(folder) + "/caf\\xe9.png"]
    assert all(row["error"] == "" for row in rows)


def test_the_samples_folder_the_readme_writes_is_ignored_by_git(tmp_path):
    """`git add -A` after `python -m pipeline samples data/samples` must not commit them."""
    from tests.conftest import ROOT

    (tmp_path / ".gitignore").write_bytes((ROOT / ".gitignore").read_bytes())
    run(tmp_path, "git", "init", "-q")
    assert (
        run(tmp_path, "git", "check-ignore", "-q", "data/samples/0/test-00003.png", check=False).returncode
        == 0
    )
    assert run(tmp_path, "git", "check-ignore", "-q", "data/raw/photo.png", check=False).returncode == 1
