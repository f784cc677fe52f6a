"""Where the benchmarks' figures live: one JSON file per benchmark under benchmarks/results/,
each with the command that made it, the machine (CPU model, cores, GPU) and the date, and
the markdown tables the docs show, made from those files and nothing else.

Every benchmark module has ``NAME`` and ``table(record) -> str``; ``python -m
benchmarks.results`` rewrites each ``<!-- results:NAME -->`` block of README.md and docs/
with its table, and tests/test_benchmarks.py fails where a block and its file disagree.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BLOCK = re.compile(
    r"<!-- results:(?P<name>[a-z_]+)(?::(?P<part>[a-z0-9_]+))? -->\n(?P<body>.*?)<!-- /results -->", re.S
)


def machine() -> dict[str, Any]:
    """Where the figures were measured: the CPU's model and cores, and a GPU's name."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        model = names[0] if names else model
    gpu = None
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        gpu = sys.modules["torch"].cuda.get_device_name(0)
    return {"cpu": model, "cores": os.cpu_count(), "gpu": gpu}


def path_of(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def save(name: str, command: str, results: Any) -> dict[str, Any]:
    """Write a benchmark's results with the command, the machine and today's date."""
    record = {
        "command": command,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "results": results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path_of(name).write_text(json.dumps(record, indent=1) + "\n")
    return record


def load(name: str) -> dict[str, Any]:
    return json.loads(path_of(name).read_text())


def provenance(record: dict[str, Any]) -> str:
    """One line under a table: the command, the machine and the date its figures come from."""
    where = record["machine"]
    gpu = f", {where['gpu']}" if where.get("gpu") else ""
    return f"`{record['command']}`, {where['cpu']} ({where['cores']} cores{gpu}), {record['date']}."


def rendered(name: str, part: str | None = None) -> str:
    """The table benchmark ``name`` makes from its results file (``part``: one of several)."""
    module = importlib.import_module(f"benchmarks.{name}")
    record = load(name)
    body = module.table(record, part) if part else module.table(record)
    return f"{body}\n\n{provenance(record)}"


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def fill(text: str) -> str:
    """``text`` with every results block holding the table its results file makes."""

    def body(match: re.Match) -> str:
        head = match.group(0).split("\n", 1)[0]
        return f"{head}\n{rendered(match['name'], match['part'])}\n<!-- /results -->"

    return BLOCK.sub(body, text)


def main() -> None:
    for document in documents():
        text = document.read_text()
        if blocks(text):
            document.write_text(fill(text))
            print(f"results: {document.relative_to(ROOT)}: {len(blocks(text))} table(s)")


if __name__ == "__main__":
    main()
