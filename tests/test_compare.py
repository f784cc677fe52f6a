"""The pull-request model diff: pipeline.tools.compare, .ci/model-diff, and the workflows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, Run, csv_rows, ran_stages, read_params, run, timed, write_params

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
UNCHANGED_ROWS = (
    "linear-probe accuracy",
    "linear-probe macro-F1",
    "random-init probe accuracy",
    "random-init probe macro-F1",
)


def compare(repo: Path, base: str = "main") -> str:
    run(repo, sys.executable, "-m", "pipeline.tools.compare", "--base", base)
    return (repo / "reports" / "compare.md").read_text()


def metric_row(markdown: str, label: str) -> list[str]:
    """The cells of a metric's row: label, base value, this branch's value, change."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, markdown)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def changed_counts(markdown: str) -> tuple[int, int]:
    """The example-by-example section's counts: the test examples this branch's fine-tuned
    model newly gets right, and newly gets wrong (0, 0 where it says they are the same)."""
    if "This branch's fine-tuned model gets the same " in markdown:
        return 0, 0
    found = re.search(r"gets (\d+) right that `[^`]+`'s got wrong, and (\d+) wrong that it got", markdown)
    assert found, markdown
    return int(found[1]), int(found[2])


def pull_request(tiny_run: Run, path: Path, remote: bool) -> Path:
    """A clone of the tiny run on a branch that changes one param.

    With ``remote``: a fresh clone (no DVC cache) that pulls main's run, on a branch that
    fine-tunes one epoch longer and also commits upstream metrics as its author's machine
    computed them (here: the random-init probe's, a little off), which the diff must not
    take for a change. Without: main drops the DVC remote, the clone holds the DVC cache of
    the machine that ran main (a developer's clone), so the base is restored from its
    run-cache, and the branch changes only the export's tolerance. A CI job with neither
    recomputes the base with the same `dvc repro`; tests/test_pipeline.py checks that
    recomputing on one machine gives the same bits."""
    run(path.parent, "git", "clone", "-q", str(tiny_run.repo), str(path))
    if not remote:
        shutil.copytree(tiny_run.repo / ".dvc" / "cache", path / ".dvc" / "cache")
        run(path, "dvc", "remote", "remove", "storage")
        run(path, "git", "commit", "-q", "-am", "No DVC remote")
    run(path, "git", "checkout", "-q", "-b", "change")
    params = read_params(path)
    if remote:
        params["finetune"]["epochs"] += 1
        baseline = json.loads((path / "metrics/baseline.json").read_text())
        baseline["random_init_probe"]["accuracy"] += 0.0022
        (path / "metrics/baseline.json").write_text(json.dumps(baseline, indent=2) + "\n")
    else:
        params["export"]["tolerance"] *= 2
    write_params(path, params)
    run(path, "git", "commit", "-q", "-am", "Change one param")
    return path


@pytest.fixture(scope="module")
def diff_without_remote(tiny_run, tmp_path_factory) -> Run:
    repo = pull_request(tiny_run, tmp_path_factory.mktemp("no-remote") / "repo", remote=False)
    return timed(repo, ".ci/model-diff", "main")


@pytest.fixture(scope="module")
def diff_with_remote(tiny_run, tmp_path_factory) -> Run:
    repo = pull_request(tiny_run, tmp_path_factory.mktemp("remote") / "repo", remote=True)
    return timed(repo, ".ci/model-diff", "main")


def base_and_branch_output(diff: Run) -> tuple[str, str]:
    """What .ci/model-diff printed while reproducing the base, and then this branch."""
    base, _, branch = diff.output.partition("model-diff: reproducing this branch")
    return base, branch


@pytest.mark.slow
def test_finetune_only_change_reruns_finetune_onward_and_leaves_upstream_deltas_zero(diff_with_remote):
    diff = diff_with_remote
    markdown = (diff.repo / "reports" / "compare.md").read_text()
    base_output, branch_output = base_and_branch_output(diff)
    assert ran_stages(base_output) == []  # main's run pulled from the remote
    assert ran_stages(branch_output) == ["finetune", "evaluate", "export", "report"]
    assert "Reran: `finetune`, `evaluate`, `export`, `report`." in markdown

    for label in UNCHANGED_ROWS:
        _, old, new, change = metric_row(markdown, label)
        assert old == new and change in ("+0.00 pp", "+0.0000"), (label, old, new, change)
    _, old, new, change = metric_row(markdown, "fine-tuned accuracy")
    head = json.loads((diff.repo / "metrics/test.json").read_text())["finetuned"]["accuracy"]
    assert new == f"{head:.2%}"  # this branch's own result
    assert change.endswith(" pp"), change  # the change, from unrounded values, in points:
    assert float(change[:-3]) == pytest.approx(float(new[:-1]) - float(old[:-1]), abs=0.011), (old, new)
    assert "| `finetune.epochs` | `2` | `3` |" in markdown
    fixed, broken = changed_counts(markdown)  # counted from both sides' test_predictions.csv
    examples = len(csv_rows(diff.repo / "metrics/test_predictions.csv"))
    assert (fixed - broken) / examples * 100 == pytest.approx(float(change[:-3]), abs=0.011)
    assert "No change" not in markdown
    probe = json.loads((diff.repo / "metrics/test.json").read_text())["finetuned_vs_probe"]
    assert f"| {probe['only_finetuned_right']} |\n| only the linear probe right | " in markdown
    assert f"| {probe['only_probe_right']} |\n| exact McNemar test | " in markdown
    for side_name in ("base", "head"):
        assert (diff.repo / "reports" / "compare" / f"{side_name}_confusion_matrices.png").is_file()
        assert f"compare/{side_name}_training_curves.png" in markdown
    print(f"model diff with a remote: {diff.seconds:.0f} s")


@pytest.mark.slow
def test_without_a_remote_the_base_is_restored_here_and_only_what_changed_reruns(diff_without_remote):
    """No remote to pull from: the base comes from this clone's run-cache, and an export-only
    change reruns export and the report; every metric of the models is the base's."""
    diff = diff_without_remote
    markdown = (diff.repo / "reports" / "compare.md").read_text()
    base_output, branch_output = base_and_branch_output(diff)
    assert ran_stages(base_output) == [] and "is cached - skipping run" in base_output
    assert ran_stages(branch_output) == ["export", "report"]
    assert "Reran: `export`, `report`." in markdown
    for label in (*UNCHANGED_ROWS, "fine-tuned accuracy"):
        _, old, new, change = metric_row(markdown, label)
        assert old == new and change in ("+0.00 pp", "+0.0000"), (label, old, new, change)
    assert "| `export.tolerance` | `0.0001` | `0.0002` |" in markdown
    assert "This branch's fine-tuned model gets the same " in markdown
    print(f"model diff without a remote: {diff.seconds:.0f} s")


@pytest.mark.slow
def test_model_diff_refuses_uncommitted_changes(tiny_repo):
    params = read_params(tiny_repo)
    params["lr"] = 0.01
    write_params(tiny_repo, params)
    result = run(tiny_repo, ".ci/model-diff", "main", check=False)
    assert result.returncode == 2
    assert "uncommitted changes; commit or stash them first" in result.stderr


@pytest.mark.slow
def test_branch_with_no_change_says_so(tiny_repo):
    run(tiny_repo, "git", "checkout", "-q", "-b", "docs-only")
    markdown = compare(tiny_repo)
    assert "**No change**" in markdown
    assert "No params changed against `main`." in markdown
    assert "+0.00 pp" in markdown
    assert "No class's F1 changed." in markdown  # the base's per-class scores, read from the DVC cache
    assert "This branch's fine-tuned model gets the same " in markdown  # its predictions, likewise


@pytest.mark.slow
def test_unknown_base_is_a_clear_error(tiny_repo):
    result = run(tiny_repo, sys.executable, "-m", "pipeline.tools.compare", "--base", "nope", check=False)
    assert result.returncode == 2
    assert "--base: 'nope' is not a commit here" in result.stderr


def test_repro_log_names_the_stages_that_ran_and_those_restored():
    from pipeline.tools.compare import stages_section

    log = (
        "Stage 'prepare' didn't change, skipping\n"
        "Stage 'finetune' is cached - skipping run, checking out outputs\n"
        "Running stage 'evaluate':\n> python -m pipeline.evaluate\n"
        "Running stage 'report':\n"
    )
    text = stages_section(log)
    assert "Reran: `evaluate`, `report`." in text
    assert "Restored from the run-cache: `finetune`." in text
    assert "Reran: none." in stages_section("Stage 'prepare' didn't change, skipping\n")


def predictions(*right: bool, sources: str = "") -> list[dict[str, str]]:
    """test_predictions.csv rows: one per example, right or wrong, all of class "a"."""
    source = (lambda i: f"{sources}/{i}.png") if sources else (lambda i: "")
    return [
        {"index": str(i), "source": source(i), "actual": "a", "predicted": "a" if ok else "b"}
        for i, ok in enumerate(right)
    ]


def test_example_by_example_counts_what_the_branch_fixed_and_broke_and_tests_it():
    from pipeline.tools.compare import examples_section

    base = predictions(*[False] * 12, *[True] * 88)
    better = predictions(*[True] * 12, *[True] * 88)
    text = examples_section(base, better, same_prepared=True, base="main")
    assert "gets 12 right that `main`'s got wrong, and 0 wrong that it got right" in text
    assert "p < 0.001" in text and "this branch's model is better on this test split" in text
    text = examples_section(better, base, same_prepared=True, base="main")
    assert "gets 0 right that `main`'s got wrong, and 12 wrong" in text
    assert "this branch's model is worse on this test split" in text
    mixed = predictions(*[True] * 2, *[False] * 10, False, *[True] * 87)
    text = examples_section(base, mixed, same_prepared=True, base="main")
    assert "gets 2 right that `main`'s got wrong, and 1 wrong that it got right" in text
    assert "p = 1, a split at least this uneven comes 100% of the time" in text
    assert "cannot tell them apart" in text
    assert "gets the same 100 test examples right as `main`'s" in examples_section(base, base, True, "main")


def test_example_by_example_needs_the_same_test_examples_on_both_sides():
    from pipeline.tools.compare import examples_section

    base = predictions(True, False, True)
    other_labels = [{**row, "actual": "b"} for row in base]
    assert "scored other test examples" in examples_section(base, other_labels, True, "main")
    assert "scored other test examples" in examples_section(base, base[:2], True, "main")
    # Digits and CIFAR have no sources: only equal prepared data says the examples are the same.
    assert "scored other test examples" in examples_section(base, base, same_prepared=False, base="main")
    files = predictions(True, False, True, sources="cat")
    assert "gets the same 3" in examples_section(files, files, same_prepared=False, base="main")
    moved = [{**row, "source": row["source"].replace("cat", "dog")} for row in files]
    assert "scored other test examples" in examples_section(files, moved, same_prepared=False, base="main")
    assert "No per-example predictions of `main`" in examples_section(None, base, True, "main")


def test_probe_section_sets_each_side_against_its_own_probe():
    from pipeline.tools.compare import probe_section

    base = {
        "finetuned_vs_probe": {
            "examples": 450,
            "only_finetuned_right": 0,
            "only_probe_right": 2,
            "p_value": 0.5,
        }
    }
    branch = {"examples": 450, "only_finetuned_right": 9, "only_probe_right": 0, "p_value": 0.003906}
    text = probe_section(base, branch, "main")
    assert "| only the fine-tuned model right | 0 | 9 |" in text
    assert "| only the linear probe right | 2 | 0 |" in text
    assert "| exact McNemar test | p = 0.5 | p = 0.0039 |" in text
    assert "On this branch, of the 450 test examples, the fine-tuned model gets 9 right" in text
    assert text.endswith("the fine-tuned model is better here.")
    for old in (None, {"finetuned": {"accuracy": 0.9}}):  # a base from before evaluate counted them
        assert "| only the fine-tuned model right | — | 9 |" in probe_section(old, branch, "main")
    same = {"examples": 50, "only_finetuned_right": 0, "only_probe_right": 0, "p_value": 1.0}
    assert "On this branch, the fine-tuned model and the linear probe get the same test examples right" in (
        probe_section(base, same, "main")
    )


def test_prepared_md5_reads_the_prepare_stage_out_of_a_lock():
    from pipeline.tools.compare import prepared_md5

    lock = (ROOT / "dvc.lock").read_text()
    recorded = yaml.safe_load(lock)["stages"]["prepare"]["outs"][0]
    assert prepared_md5(lock) == recorded["md5"] and recorded["path"] == "data/prepared"
    assert prepared_md5(None) is None and prepared_md5("stages: {}") is None


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_passes_actionlint(workflow):
    result = run(ROOT, shutil.which("actionlint") or "actionlint", str(workflow), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    text = (ROOT / ".github" / "workflows" / "model-diff.yml").read_text()
    broken.write_text(text.replace("runs-on: ubuntu-latest", "runs-onn: ubuntu-latest"))
    result = run(tmp_path, shutil.which("actionlint") or "actionlint", str(broken), check=False)
    assert result.returncode != 0


def load_workflow(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def test_pull_request_workflow_has_least_privilege_full_history_and_a_summary_for_forks():
    workflow = load_workflow("model-diff.yml")
    assert set(workflow[True]) == {"pull_request"}  # PyYAML reads the key `on` as True
    assert workflow["permissions"] == {"contents": "read", "pull-requests": "write"}
    job = workflow["jobs"]["model-diff"]
    steps = job["steps"]
    checkout = next(step for step in steps if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    commands = "\n".join(step.get("run", "") for step in steps)
    assert '.ci/model-diff "origin/$BASE_REF"' in commands
    summary = next(step for step in steps if "GITHUB_STEP_SUMMARY" in step.get("run", ""))
    assert summary["if"] == "always()"
    comment = next(step for step in steps if ".ci/pr-comment post" in step.get("run", ""))
    assert comment["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    assert "set -x" not in commands  # never trace a command that holds a secret


def secret_steps(job: dict) -> dict[str, list[str]]:
    """Each step that reads secrets (by its name) and the secrets it reads."""
    return {
        step.get("name", step.get("uses", "")): [
            value for value in step.get("env", {}).values() if "secrets." in value
        ]
        for step in job["steps"]
        if any("secrets." in value for value in step.get("env", {}).values())
    }


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_workflows_pin_actions_by_commit_and_leave_no_token_behind(workflow):
    for job in load_workflow(workflow.name)["jobs"].values():
        assert "env" not in job  # no secret reaches every step of a job
        for step in job["steps"]:
            action = step.get("uses")
            if action:
                assert len(action.split("@")[1]) == 40, f"{action}: pin the action by commit"
            if action and action.startswith("actions/checkout"):
                assert step["with"]["persist-credentials"] is False
    assert "--publish" not in workflow.read_text()  # no figure goes to a public image host


def test_a_pull_request_gets_read_only_credentials_in_the_step_that_pulls_and_main_writes():
    diff = secret_steps(load_workflow("model-diff.yml")["jobs"]["model-diff"])
    assert list(diff) == ["Reproduce both sides and build the diff"]
    assert all(value.startswith("${{ secrets.DVC_READ_") for value in diff[next(iter(diff))])
    publish = load_workflow("publish.yml")["jobs"]["publish"]
    assert publish["environment"] == "dvc-remote"  # protected: its secrets reach main's jobs only
    steps = secret_steps(publish)
    assert list(steps) == ["Reproduce", "Push outputs and run-cache"]
    assert all(value.startswith("${{ secrets.DVC_READ_") for value in steps["Reproduce"])
    assert not any("DVC_READ_" in value for value in steps["Push outputs and run-cache"])
    runs = {step.get("name"): step.get("run", "") for step in publish["steps"]}
    assert ".ci/publish reproduce" in runs["Reproduce"]
    pushing = [line.strip() for line in runs["Push outputs and run-cache"].splitlines()]
    assert pushing == [". .venv/bin/activate", '.ci/publish push | tee -a "$GITHUB_STEP_SUMMARY"']


def test_the_comment_links_its_figures_to_the_artifact_instead_of_embedding_them(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    (repo / "reports").mkdir()
    (repo / "reports" / "compare.md").write_text(
        "<!-- marker -->\n| `main` | this branch |\n|---|---|\n"
        "| ![base](compare/base_confusion_matrices.png) | ![head](compare/head_confusion_matrices.png) |\n"
    )
    run(repo, "git", "init", "-q")
    url = "https://github.com/o/r/actions/runs/1/artifacts/2?a=1&b=2"
    body = run(repo, ".ci/pr-comment", "body", url).stdout
    assert "![" not in body and "compare/" not in body
    assert f"| [base: figure in the model-diff artifact]({url}) |" in body
    assert body.startswith("<!-- marker -->\n")


@pytest.mark.parametrize(
    ("comments", "expected"),
    [
        (
            [
                ("github-actions[bot]", "<!-- marker -->\nold diff", 11),
                ("mallory", "<!-- marker -->\nfake", 12),
            ],
            "PATCH 11",
        ),
        ([("mallory", "<!-- marker -->\nfake", 12), ("github-actions[bot]", "other words", 13)], "NEW"),
    ],
    ids=["its-own-comment-updated", "another-users-comment-left-alone"],
)
def test_the_bot_updates_its_own_comment_and_nobody_elses(tmp_path, comments, expected):
    """.ci/pr-comment post finds the comment to update by the bot's login and the marker:
    a comment by anyone else that starts with the marker is never edited (a stand-in for
    gh answers from a list of comments, through jq, as gh does)."""
    import os
    import stat

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    run(repo, "git", "init", "-q")
    listed = [{"id": id_, "user": {"login": login}, "body": body} for login, body, id_ in comments]
    (tmp_path / "comments.json").write_text(json.dumps(listed))
    gh = tmp_path / "bin" / "gh"
    gh.parent.mkdir()
    gh.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "api --method" ]; then echo "PATCH ${4##*/}" >> "$RECORD"; exit 0; fi\n'
        'if [ "$1 $2" = "pr comment" ]; then echo NEW >> "$RECORD"; exit 0; fi\n'
        'jq -r "${@: -1}" "$COMMENTS"\n'
    )
    gh.chmod(gh.stat().st_mode | stat.S_IEXEC)
    (repo / "comment.md").write_text("<!-- marker -->\nnew diff\n")
    env = {
        **os.environ,
        "PATH": f"{gh.parent}:{os.environ['PATH']}",
        "RECORD": str(tmp_path / "record"),
        "COMMENTS": str(tmp_path / "comments.json"),
        "GITHUB_REPOSITORY": "o/r",
    }
    done = subprocess.run(
        [".ci/pr-comment", "post", "7", "comment.md"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "record").read_text().split("\n")[0] == expected


def test_main_workflow_reproduces_and_pushes_outputs_and_run_cache():
    workflow = load_workflow("publish.yml")
    assert workflow[True] == {"push": {"branches": ["main"]}}
    assert workflow["permissions"] == {"contents": "read"}
    commands = "\n".join(step.get("run", "") for step in workflow["jobs"]["publish"]["steps"])
    assert ".ci/publish" in commands
    script = (ROOT / ".ci" / "publish").read_text()
    assert "dvc repro" in script and "\n  python -m pipeline push-runs" in script


def stub(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)


def test_model_diff_stops_where_it_cannot_list_the_outputs_kept_in_git(tmp_path):
    """A failure inside `mapfile < <(...)` was invisible to set -e: the diff then went on
    against the branch's own metrics. Here dvc and python are stubs; listing the outputs
    kept in git (python -c) fails, and the script must stop before comparing."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "base")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub(
        stubs,
        "dvc",
        f'[ "$1 $2" = "cache dir" ] && [ $# = 2 ] && echo {tmp_path}/cache\n'
        '[ "$1 $2" = "remote default" ] && exit 1\nexit 0\n',
    )
    stub(stubs, "python", '[ "$1" = "-c" ] && { echo "dvc: broken install" >&2; exit 1; }\necho compared\n')
    env_path = f"{stubs}:/usr/bin:/bin"
    result = run(repo, "env", f"PATH={env_path}", "bash", ".ci/model-diff", "main", check=False)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "compared" not in result.stdout
    assert "dvc: broken install" in result.stderr
