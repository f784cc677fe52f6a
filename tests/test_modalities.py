"""The seam: modalities are found by name in the registry, imported when a run names one,
and each implements pipeline.modalities.contract.Modality, signatures included; params name
the modality and one of its datasets, or get an error that says what to set."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import yaml

from pipeline import modalities
from pipeline.core.errors import ParamsError, StageError
from pipeline.modalities.contract import Modality
from tests.conftest import ROOT, default_params

MEMBERS = [name for name in vars(Modality) if not name.startswith("_")]
CONSTANTS = list(Modality.__annotations__)


def test_the_contract_holds_what_the_stages_and_tools_call_and_nothing_else():
    """Every member and constant of the contract is used outside the modalities' own
    packages (as ``.member``): a member nothing calls any more is dead weight every modality
    must still implement."""
    outside = [
        path
        for path in (ROOT / "pipeline").rglob("*.py")
        if not any(part in ("images", "text") for part in path.relative_to(ROOT / "pipeline").parts[:-1])
        and path.name != "contract.py"
    ]
    source = "\n".join(path.read_text() for path in outside)
    used = [*MEMBERS, *CONSTANTS]
    used.remove("NAME")  # the package's own name, which the next test holds it to
    unused = [name for name in used if f".{name}" not in source]
    assert not unused, f"the contract's {unused} are called by no stage or tool"


@pytest.mark.parametrize("name", modalities.names())
def test_every_modality_implements_the_contract_with_its_signatures(name):
    modality = modalities.get(name)
    assert name == modality.NAME
    assert all(isinstance(dataset, str) for dataset in modality.DATASETS) and modality.DATASETS
    for constant in CONSTANTS:
        assert hasattr(modality, constant), f"{name} has no {constant}"
    for member in MEMBERS:
        expected = inspect.signature(getattr(Modality, member))
        parameters = [p for p in expected.parameters.values() if p.name != "self"]
        got = inspect.signature(getattr(modality, member))
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in parameters
        ], f"{name}.{member}{got} differs from the contract's {expected}"


def test_the_datasets_belong_to_one_modality_each():
    owners = [dataset for name in modalities.names() for dataset in modalities.get(name).DATASETS]
    assert len(owners) == len(set(owners))


def test_a_run_imports_only_its_own_modality():
    """Loading an image run's params imports no text code (and so no transformers)."""
    code = (
        "import sys; from pipeline import modalities; params = modalities.load_params(); "
        "modalities.get(params['data']['modality']); "
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.modalities.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = eval(out.stdout)
    assert "pipeline.modalities.images" in loaded
    assert not [name for name in loaded if name.startswith("pipeline.modalities.text")]


def test_an_unknown_modality_names_the_known_ones():
    with pytest.raises(
        ParamsError, match=r"data.modality: 'audio' is not a modality; choose one of: images, text"
    ):
        modalities.get("audio")
    with pytest.raises(StageError, match=r"modality 'audio', which this pipeline does not know"):
        modalities.for_checkpoint({"modality": "audio"})


def test_a_registered_modality_is_found_by_name(monkeypatch):
    monkeypatch.setattr(modalities, "_registry", dict(modalities.BUILTIN))
    modalities.register("glyph-images", "pipeline.modalities.images")
    assert "glyph-images" in modalities.names()
    assert modalities.get("glyph-images").prepare_splits is modalities.get("images").prepare_splits


def write(tmp_path, params) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def test_a_dataset_of_another_modality_says_which_modality_to_set(tmp_path):
    params = default_params()
    params["data"].update(dataset="text", path="data/raw")
    with pytest.raises(
        ParamsError,
        match=r"data.dataset: 'text' is not a dataset of data.modality images; set data.modality: text",
    ):
        modalities.load_params(write(tmp_path, params))
    params["data"].update(modality="text", dataset="imagefolder")
    with pytest.raises(
        ParamsError,
        match=r"'imagefolder' is not a dataset of data.modality text; set data.modality: images",
    ):
        modalities.load_params(write(tmp_path, params))
    params["data"].update(modality="images", dataset="mnist")
    with pytest.raises(ParamsError, match=r"the images datasets are: digits, imagefolder, cifar10, cifar100"):
        modalities.load_params(write(tmp_path, params))
