"""The package's layers, bottom up: pipeline/core (shared code), pipeline/modalities (the
seam and one package per modality), the stages (pipeline/<stage>.py, each a dvc.yaml cmd)
and the tools (pipeline/tools, run by users). A layer imports only those below it:

- nothing in core imports a modality, a stage or a tool;
- a modality imports no stage, no tool and no other modality;
- a stage imports no other stage and no tool; a tool imports no stage.

Every import counts, a function's lazy one and a type checker's too.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import yaml

from tests.conftest import ROOT


def stage_modules(root: Path) -> set[str]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
    return {stage["cmd"].removeprefix("python -m ") for stage in stages}


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """Every pipeline module or name ``path`` imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("pipeline.")}


def layer(module: str, stages: set[str], root: Path) -> str:
    """The layer of ``module`` (or of the module that holds the name ``module``)."""
    parts = module.split(".")
    if parts[:2] == ["pipeline", "core"]:
        return "core"
    if parts[:2] == ["pipeline", "tools"]:
        return "tool"
    if parts[:2] == ["pipeline", "modalities"]:  # a modality is a package there; the rest is the seam
        is_package = len(parts) > 2 and (root / "pipeline" / "modalities" / parts[2]).is_dir()
        return f"modality:{parts[2]}" if is_package else "seam"
    for stage in stages:
        if module == stage or module.startswith(stage + "."):
            return "stage:" + stage
    return "other"


def allowed(importer: str, imported: str) -> bool:
    if importer == "core":
        return imported == "core"
    if importer.startswith("modality:"):
        return imported in ("core", "seam", importer)
    if importer == "seam":
        return imported in ("core", "seam")
    if importer.startswith("stage:"):
        return imported in ("core", "seam", importer)
    if importer == "tool":
        return imported in ("core", "seam", "tool")
    return True


def forbidden_imports(root: Path) -> list[str]:
    """``file: imports module (layer -> layer)`` for each import that crosses the layers."""
    stages, problems = stage_modules(root), []
    for path in sorted((root / "pipeline").rglob("*.py")):
        importer = layer(module_name(path, root), stages, root)
        for name in sorted(imports_of(path)):
            imported = layer(name, stages, root)
            if not allowed(importer, imported):
                problems.append(f"{path.relative_to(root)}: imports {name} ({importer} -> {imported})")
    return problems


def test_each_layer_imports_only_the_layers_below_it():
    assert forbidden_imports(ROOT) == []


def test_a_forbidden_import_is_caught(tmp_path):
    """Core reaching up into a modality, a stage into another stage, a modality into the
    other modality: each is named, with the layers it crosses."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    additions = {
        "pipeline/core/common.py": "from pipeline.modalities import images\n",
        "pipeline/finetune.py": "def later():\n    from pipeline.train_head import main\n",
        "pipeline/modalities/text/files.py": "from pipeline.modalities.images.data import read_rgb\n",
        "pipeline/tools/samples.py": "import pipeline.prepare\n",
    }
    for name, code in additions.items():
        with (tmp_path / name).open("a") as file:
            file.write(code)
    assert forbidden_imports(tmp_path) == [
        "pipeline/core/common.py: imports pipeline.modalities.images (core -> modality:images)",
        "pipeline/finetune.py: imports pipeline.train_head.main"
        " (stage:pipeline.finetune -> stage:pipeline.train_head)",
        "pipeline/modalities/text/files.py: imports pipeline.modalities.images.data.read_rgb"
        " (modality:text -> modality:images)",
        "pipeline/tools/samples.py: imports pipeline.prepare (tool -> stage:pipeline.prepare)",
    ]
