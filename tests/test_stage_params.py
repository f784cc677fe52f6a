"""dvc.yaml declares exactly the params each stage reads.

This is what makes `dvc exp run -S key=value` rerun exactly the stages that depend on a key:
DVC reruns a stage when a declared param changes, so a stage that read an undeclared key
would keep stale results, and a declared key it never reads would rerun it for nothing.
Each stage runs here in process on the tiny config, with params that record every key read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import (
    backbone,
    baseline,
    evaluate,
    export,
    extract,
    finetune,
    prepare,
    report,
    train_head,
)
from pipeline.core import params
from tests.conftest import ROOT, make_text_data, make_tree, tiny_params, tiny_text_params

pytestmark = pytest.mark.slow

MODULES = {
    "prepare": prepare,
    "backbone": backbone,
    "extract": extract,
    "train_head": train_head,
    "finetune": finetune,
    "baseline": baseline,
    "evaluate": evaluate,
    "export": export,
    "report": report,
}


class RecordingParams(dict):
    """Validated params that note the dotted name of every value read from them, including
    values read by copying a section whole (``{**section}``, ``yaml.safe_dump``)."""

    def __init__(self, data: dict[str, Any], reads: set[str], prefix: str = "") -> None:
        super().__init__(
            {
                key: RecordingParams(value, reads, f"{prefix}{key}.") if isinstance(value, dict) else value
                for key, value in data.items()
            }
        )
        self.reads, self.prefix = reads, prefix

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if not isinstance(value, RecordingParams):
            self.reads.add(self.prefix + key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __iter__(self):  # not dict's own, so {**section} goes through keys() and __getitem__
        return iter(list(super().keys()))

    def items(self):
        return [(key, self[key]) for key in self]

    def values(self):
        return [self[key] for key in self]


yaml.SafeDumper.add_representer(RecordingParams, lambda dumper, data: dumper.represent_dict(data.items()))


def declared() -> dict[str, set[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: set(stage.get("params", [])) for name, stage in stages.items()}


def leaves(data: dict[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for key, value in data.items():
        names |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return names


def covered(key: str, declarations: set[str]) -> bool:
    """A read key is covered by a declaration of itself or of a section holding it."""
    return any(key == name or key.startswith(name + ".") for name in declarations)


def run_recording(stages: list[str], config: dict[str, Any], monkeypatch) -> dict[str, set[str]]:
    """Run ``stages`` in the current directory on ``config``; the keys each one read."""
    Path("params.yaml").write_text(yaml.safe_dump(config))
    validated = params.load_params()
    reads: dict[str, set[str]] = {}
    for name in stages:
        reads[name] = set()
        recorded = RecordingParams(validated, reads[name])
        monkeypatch.setattr(MODULES[name], "load_params", lambda *args, recorded=recorded, **kwargs: recorded)
        MODULES[name].main()
    return reads


def test_every_stage_reads_only_declared_params_and_every_declared_param_somewhere(tmp_path, monkeypatch):
    config = tiny_params()
    config["data"]["max_train_per_class"] = 5
    config["backbone"].update(pretrain_images=200)
    config["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=1)
    monkeypatch.chdir(tmp_path)
    reads = run_recording(list(MODULES), config, monkeypatch)
    assert json.loads(Path("metrics/test.json").read_text())  # the stages did run

    folder = tmp_path / "images"
    folder.mkdir()
    monkeypatch.chdir(folder)
    images = make_tree(folder / "data" / "raw" / "images", classes=("cat", "dog"), per_class=3)
    (images / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")  # read skip_bad_images
    config["data"].update(dataset="imagefolder", path="data/raw/images", skip_bad_images=True)
    config["backbone"].update(weights="none")
    for name, keys in run_recording(["prepare", "backbone"], config, monkeypatch).items():
        reads[name] |= keys

    texts = tmp_path / "texts"  # the text modality's keys: every stage on the tiny text config
    texts.mkdir()
    monkeypatch.chdir(texts)
    make_text_data(texts)
    config = tiny_text_params()
    config["finetune"].update(epochs=1, warmup_epochs=0, ema_epochs=1, strategy="adapters")
    config["data"]["skip_bad_texts"] = True
    for name, keys in run_recording(list(MODULES), config, monkeypatch).items():
        reads[name] |= keys

    declarations = declared()
    every_key = leaves(tiny_params())
    for name, keys in reads.items():
        undeclared = sorted(key for key in keys if not covered(key, declarations[name]))
        assert not undeclared, f"{name} reads params dvc.yaml does not declare for it: {undeclared}"
        unread = sorted(key for key in every_key if covered(key, declarations[name]) and key not in keys)
        assert not unread, f"dvc.yaml declares params that {name} never reads: {unread}"
