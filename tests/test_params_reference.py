"""docs/reference/params.md is what pipeline.tools.params_reference writes from the schema,
params.yaml's comments and dvc.yaml: a key undocumented, gone or changed fails here."""

from __future__ import annotations

import pytest

from pipeline.core.errors import StageError
from pipeline.tools import params_reference
from tests.conftest import ROOT


def page(params_text: str | None = None) -> str:
    params_text = params_text or (ROOT / "params.yaml").read_text()
    return params_reference.reference(params_text, (ROOT / "dvc.yaml").read_text())


def test_the_committed_params_reference_is_the_one_the_code_writes():
    committed = (ROOT / params_reference.REFERENCE_FILE).read_text()
    assert committed == page(), "docs/reference/params.md is stale: run python -m pipeline params-reference"


def test_every_key_is_documented_with_its_rule_and_its_stages():
    text = page()
    assert "| `finetune.bn` | `auto` | one of: `auto`, `train`, `frozen` | finetune, report |" in text
    assert (
        "| `data.max_image_pixels` | `64000000` | a whole number of pixels, 1 to 1,000,000,000 "
        "| prepare, report |" in text
    )
    assert "| `backbone.revision` | `main` | a non-empty string | backbone, baseline, report |" in text


def test_a_key_without_a_comment_is_an_error_naming_it():
    params_text = (ROOT / "params.yaml").read_text()
    line = next(line for line in params_text.splitlines() if line.startswith("  patience:"))
    with pytest.raises(StageError, match=r"params.yaml: head.patience has no comment"):
        page(params_text.replace(line, "  patience: 15"))


def test_a_changed_default_changes_the_page():
    params_text = (ROOT / "params.yaml").read_text().replace("\nlr: 0.001 ", "\nlr: 0.003 ", 1)
    assert page(params_text) != (ROOT / params_reference.REFERENCE_FILE).read_text()
