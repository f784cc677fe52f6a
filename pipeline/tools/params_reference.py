"""Write the params reference, docs/reference/params.md, from the one place params are
validated: ``python -m pipeline params-reference [--check]``.

Each key of params.yaml gets a row: its default (params.yaml's value), what it allows (the
rule pipeline.core.params applies to it), the stages that read it (dvc.yaml's params) and
what it does (params.yaml's comment on it). A key with no comment, or a schema key that
params.yaml lacks, is an error: the reference cannot drift from the code, and
tests/test_params_reference.py fails where the committed page is not what this writes.
``--check`` writes nothing and exits 1 where the page is stale.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline import modalities
from pipeline.core import params as schema
from pipeline.core.entry import run_tool
from pipeline.core.errors import StageError
from pipeline.tools import page_parser, write_or_check

REFERENCE_FILE = Path("docs/reference/params.md")
DVC_FILE = Path("dvc.yaml")

# What each rule of pipeline.core.params allows, in words; one_of rules list their choices.
RULES = {
    "seed_value": "a whole number, 0 to 2³² − 1",
    "positive_float": "a number above 0",
    "non_negative_float": "a number, 0 or more",
    "fraction": "a number between 0 and 1, exclusive",
    "below_one": "a number, at least 0 and below 1",
    "positive_int": "a whole number, 1 or more",
    "non_negative_int": "a whole number, 0 or more",
    "text": "a non-empty string",
    "optional_text": 'a string ("" for the default)',
    "text_lines": "a list of strings, one a line",
    "boolean": "true or false",
    "weights_source": (
        "pretrain, none, a torchvision weights name (IMAGENET1K_V1, DEFAULT) "
        "or a checkpoint under data/weights/"
    ),
    "amp_mode": "auto, bfloat16, float16 or off (true, false: auto, off)",
    "process_count": "auto, or a number of processes, 1 or more",
    "timeout_seconds": "a whole number of seconds, 1 to 604800 (a week)",
    "worker_setting": "auto, or a number of worker processes, 0 to 64",
    "epoch_setting": "auto (sized to the training set), or a number of epochs, 1 or more",
    "batch_setting": "auto (sized to the training set), or a number of examples, 1 or more",
    "pixel_limit": "a whole number of pixels, 1 to 1,000,000,000",
    "rank_spec": "auto, or a rank, 0 or more",
    "endpoint": "auto, or host:port",
    "unfreeze_spec": "all, or a number of last blocks, 1 or more",
    "augment_policy": "auto, none, jitter, photo or strong (true, false: auto, none)",
    "above_zero_up_to_one": "a number above 0, at most 1",
}


def allowed(rule: Any) -> str:
    """What a schema rule allows, in words."""
    if hasattr(rule, "choices"):
        return "one of: " + ", ".join(f"`{choice}`" for choice in rule.choices)
    if rule.__name__ not in RULES:
        raise StageError(
            f"pipeline/tools/params_reference.py: no words for the rule {rule.__name__}; add them to RULES"
        )
    return RULES[rule.__name__]


def modality_choices() -> dict[str, str]:
    """The keys the modalities' registry checks (pipeline.modalities), in words: its names,
    and each one's datasets."""
    names = modalities.names()
    datasets = "; ".join(
        f"{name}: " + ", ".join(f"`{dataset}`" for dataset in modalities.get(name).DATASETS) for name in names
    )
    return {
        "data.modality": "one of: " + ", ".join(f"`{name}`" for name in names),
        "data.dataset": f"one of data.modality's datasets ({datasets})",
    }


def comments(params_text: str) -> dict[str, str]:
    """Each dotted key's comment in params.yaml (the text after ``#`` on its line)."""
    found, section = {}, None
    for line in params_text.splitlines():
        match = re.match(r"^( *)([a-z0-9_]+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, value, comment = match.groups()
        if not indent:
            section = key if not value else None
            key_path = key
        else:
            key_path = f"{section}.{key}"
        if comment:
            found[key_path] = comment
    return found


def readers(dvc: dict[str, Any]) -> dict[str, list[str]]:
    """Each params entry dvc.yaml declares (a section, a key, a dotted key) and the stages
    that declare it, in dvc.yaml's order."""
    found: dict[str, list[str]] = {}
    for stage, body in dvc["stages"].items():
        for entry in body.get("params", []):
            found.setdefault(entry, []).append(stage)
    return found


def read_by(key: str, declared: dict[str, list[str]], stages: list[str]) -> list[str]:
    """The stages that read ``key`` (those declaring it, or its whole section), in order."""
    section = key.split(".")[0]
    reading = set(declared.get(key, [])) | (set(declared.get(section, [])) if section != key else set())
    return [stage for stage in stages if stage in reading]


def cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def reference(params_text: str, dvc_text: str) -> str:
    """The params reference page."""
    values = yaml.safe_load(params_text)
    notes = comments(params_text)
    dvc = yaml.safe_load(dvc_text)
    declared, stage_order = readers(dvc), list(dvc["stages"])
    choices = modality_choices()
    lines = [
        "# Params reference",
        "",
        "Every key of `params.yaml`, the pipeline's only configuration: its default, what it",
        "allows (checked when params load, before any stage works), the stages that read it (so",
        "the stages `dvc exp run -S key=value` reruns, with what follows them) and what it does.",
        "Written by `python -m pipeline params-reference` from `pipeline/core/params.py`,",
        "`params.yaml` and `dvc.yaml`; a test fails where this page is not what it writes.",
        "",
    ]
    top = [key for key, rule in schema.SCHEMA.items() if not isinstance(rule, dict)]
    sections = [("Top level", None, top)] + [
        (f"`{name}`", name, list(rule)) for name, rule in schema.SCHEMA.items() if isinstance(rule, dict)
    ]
    for title, section, keys in sections:
        lines += [
            f"## {title}",
            "",
            "| key | default | allowed | read by | what it does |",
            "|---|---|---|---|---|",
        ]
        for key in keys:
            dotted = f"{section}.{key}" if section else key
            rule = schema.SCHEMA[section][key] if section else schema.SCHEMA[key]
            value = values[section][key] if section else values[key]
            if dotted not in notes:
                raise StageError(f"params.yaml: {dotted} has no comment; say what it does beside it")
            stages = read_by(dotted, declared, stage_order)
            default = (
                "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"
            )
            lines.append(
                f"| `{dotted}` | {cell(default)} | {cell(choices.get(dotted) or allowed(rule))} | "
                f"{', '.join(stages) or '–'} | {cell(notes[dotted])} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def parser() -> argparse.ArgumentParser:
    return page_parser("params-reference", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    schema.validate(yaml.safe_load(schema.PARAMS_FILE.read_text()))  # every schema key is in params.yaml
    page = reference(schema.PARAMS_FILE.read_text(), DVC_FILE.read_text())
    return write_or_check(REFERENCE_FILE, page, args.check, "params-reference")


if __name__ == "__main__":
    run_tool(main)
