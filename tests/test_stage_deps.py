"""dvc.yaml declares exactly the code each stage runs: its module and every pipeline module
that module imports, directly or through others.

A module missing from a stage's deps is code DVC does not watch: editing it would not
rerun the stage, and the run-cache would restore outputs that code never made. A module
listed that the stage never imports reruns it for nothing. tests/test_stage_params.py does
the same for params.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"


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


def import_closure(module: str) -> set[str]:
    """``module`` and every pipeline module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_modules(module_file(name))
    return seen


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


def test_every_stage_depends_on_exactly_the_code_it_imports():
    """Empty package files (pipeline/__init__.py, pipeline/core/__init__.py) run nothing and
    are not listed; a package file with code (pipeline/modalities/__init__.py) is."""
    for empty in (PACKAGE / "__init__.py", PACKAGE / "core" / "__init__.py"):
        assert empty.read_text() == "", f"{empty} runs with every stage"
    problems = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        module = stage["cmd"].removeprefix("python -m ")
        declared = {dep for dep in stage["deps"] if dep.startswith("pipeline/")}
        files = {module_file(name) for name in import_closure(module)}
        imported = {file.relative_to(ROOT).as_posix() for file in files if file.read_text()}
        if declared != imported:
            problems[name] = {
                "missing": sorted(imported - declared),
                "not imported": sorted(declared - imported),
            }
    assert not problems, f"dvc.yaml's code deps differ from what each stage imports: {problems}"
