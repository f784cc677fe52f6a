import json

import pytest

from pipeline.common import atomic_path, write_json


def test_failed_write_leaves_the_old_file_as_it_was(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"old": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_directory_outputs_are_replaced_whole(tmp_path):
    target = tmp_path / "features"
    for version in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / f"{version}.pt").write_text(version)
    assert [p.name for p in target.iterdir()] == ["new.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["features"]
