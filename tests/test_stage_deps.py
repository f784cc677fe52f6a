"""dvc.yaml declares exactly the code each stage runs: its module, every pipeline module
that module imports, directly or through others, and, for a stage that goes through the
modality seam, the package of the run's modality: ``pipeline/modalities/${data.modality}``,
with the core modules that package imports.

A module missing from a stage's deps is code DVC does not watch: editing it would not
rerun the stage, and the run-cache would restore outputs that code never made. A module
listed that the stage never imports reruns it for nothing; and the other modality's code
is never a dep, so an edit to the text code leaves an image run's stages alone.
tests/test_stage_params.py does the same for params.
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import pytest
import yaml

from pipeline.modalities import BUILTIN
from tests.conftest import ROOT, copy_repo, run

PACKAGE = ROOT / "pipeline"
SEAM = "pipeline/modalities/__init__.py"
MODALITY_DEP = "pipeline/modalities/${data.modality}"


def in_type_checking_block(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` sits under ``if TYPE_CHECKING:``, which never runs."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def module_file(name: str) -> Path | None:
    """The file of the pipeline module ``name`` (a package's ``__init__.py``), or None where
    ``name`` is something a module holds (``pipeline.core.training.fit``)."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def imported_modules(path: Path) -> set[str]:
    """The pipeline modules a file imports anywhere (a function's lazy import included),
    and the packages that hold them, whose ``__init__.py`` runs first."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if in_type_checking_block(node, parents):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {name for name in names if name.startswith("pipeline.") and module_file(name)}
    packages = {".".join(name.split(".")[:end]) for name in modules for end in range(2, name.count(".") + 1)}
    return modules | packages


@functools.cache
def import_closure(module: str) -> frozenset[str]:
    """``module`` and every pipeline module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_modules(module_file(name))
    return frozenset(seen)


def test_the_closure_follows_lazy_imports_and_skips_type_checking_ones(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from pipeline.core import errors\n"
        "if TYPE_CHECKING:\n    from pipeline.core.training import fit\n"
        "def later():\n    from pipeline.core.models import build_head\n"
        "    import pipeline.modalities.images\n"
    )
    assert imported_modules(source) == {
        "pipeline.core",
        "pipeline.core.errors",
        "pipeline.core.models",
        "pipeline.modalities",
        "pipeline.modalities.images",
    }


def modality_modules(name: str) -> set[str]:
    """The modules of the modality package ``name`` (the registry imports it by name, which
    no import statement shows): its files, and what they import."""
    folder = PACKAGE / "modalities" / name
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in folder.rglob("*.py")
    }
    return set().union(*(import_closure(module) for module in modules))


def code_file(module: str) -> str | None:
    """``module``'s file as dvc.yaml lists it, None for an empty package file (it runs nothing)."""
    path = module_file(module)
    return path.relative_to(ROOT).as_posix() if path.read_text() else None


def expected_deps(module: str) -> set[str]:
    """The code deps of the stage ``module``: what it imports, and for a stage that goes
    through the seam, the run's modality package (as dvc.yaml writes it) and the core modules
    any modality's package imports."""
    modules = import_closure(module)
    files = {code_file(name) for name in modules}
    if "pipeline.modalities" in modules:
        for name in BUILTIN:
            files |= {
                code_file(m) for m in modality_modules(name) if not m.startswith("pipeline.modalities.")
            }
        files.add(MODALITY_DEP)
    return files - {None}


def test_the_stages_modality_code_is_one_package_per_modality_and_nothing_else():
    """Each registered modality is the package dvc.yaml's dep names, and its modules import
    no other modality's: so the dep ``pipeline/modalities/${data.modality}`` is all the
    modality code a run can reach."""
    for name, module in BUILTIN.items():
        assert (
            module == f"pipeline.modalities.{name}"
            and (PACKAGE / "modalities" / name / "__init__.py").is_file()
        )
        reached = {m for m in modality_modules(name) if m.startswith("pipeline.modalities.")}
        others = {m for m in reached if not m.startswith(f"pipeline.modalities.{name}")}
        assert not others, f"the {name} modality imports other modalities' code: {sorted(others)}"


def test_every_stage_depends_on_exactly_the_code_it_imports():
    """Empty package files (pipeline/__init__.py, pipeline/core/__init__.py) run nothing and
    are not listed; a package file with code (pipeline/modalities/__init__.py) is."""
    for empty in (PACKAGE / "__init__.py", PACKAGE / "core" / "__init__.py"):
        assert empty.read_text() == "", f"{empty} runs with every stage"
    problems = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        module = stage["cmd"].removeprefix("python -m ")
        declared = {dep for dep in stage["deps"] if dep.startswith("pipeline/")}
        imported = expected_deps(module)
        if declared != imported:
            problems[name] = {
                "missing": sorted(imported - declared),
                "not imported": sorted(declared - imported),
            }
    assert not problems, f"dvc.yaml's code deps differ from what each stage imports: {problems}"


def modality_files(name: str) -> list[Path]:
    return sorted((PACKAGE / "modalities" / name).rglob("*.py"))


def edit(repo: Path, files: list[Path]) -> None:
    for path in files:
        with (repo / path.relative_to(ROOT)).open("a") as file:
            file.write("# an edit\n")


def status(repo: Path) -> dict:
    return json.loads(run(repo, "dvc", "status", "--json").stdout or "{}")


@pytest.mark.slow
def test_an_edit_to_the_text_code_leaves_an_image_run_alone(tiny_run, tmp_path):
    """After an image run, every text file edited: nothing to rerun. A core edit to the
    training code reruns the stages that run it; an edit to the image code, every stage
    that goes through the seam; naming the text modality, the same stages."""
    repo = copy_repo(tiny_run.repo, tmp_path / "repo")
    assert status(repo) == {}
    cache = repo / "pipeline" / "modalities" / "images" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "data.cpython-311.pyc").write_bytes(b"bytecode")  # what an import writes: .dvcignore'd
    assert status(repo) == {}
    edit(repo, modality_files("text"))
    assert status(repo) == {}, "an edit to the text code reruns stages of an image run"

    edit(repo, [PACKAGE / "core" / "training.py"])
    assert {"backbone", "train_head", "finetune"} <= set(status(repo))
    run(repo, "git", "checkout", "pipeline")

    through_seam = {"prepare", "backbone", "extract", "finetune", "baseline", "evaluate", "export", "report"}
    edit(repo, [PACKAGE / "modalities" / "images" / "glyphs.py"])
    assert set(status(repo)) == through_seam  # train_head reads features, no modality code
    run(repo, "git", "checkout", "pipeline")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(modality="text", dataset="text", path="data/raw")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = status(repo)
    assert set(changed) == through_seam
    assert any("pipeline/modalities/text" in change.get("changed deps", {}) for change in changed["prepare"])


@pytest.mark.slow
def test_an_edit_to_the_image_code_leaves_a_text_run_alone(tiny_text_run, tmp_path):
    repo = copy_repo(tiny_text_run.repo, tmp_path / "repo")
    assert status(repo) == {}
    edit(repo, modality_files("images"))
    assert status(repo) == {}, "an edit to the image code reruns stages of a text run"
    edit(repo, [PACKAGE / "modalities" / "text" / "models.py"])
    assert "finetune" in status(repo) and "train_head" not in status(repo)
