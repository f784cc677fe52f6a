"""The benchmarks' own pieces: memory stays bounded (prepare plus extract stream image files
instead of loading them), and the faces set is a tree the pipeline reads."""

import pytest

from benchmarks.memory import measure


@pytest.mark.slow
def test_peak_memory_on_4x_the_images_stays_within_1_3x():
    one, four = measure(per_class=40, side=256)
    assert four <= 1.3 * one, f"peak memory {one:.0f} MiB on 80 images, {four:.0f} MiB on 320"


def test_the_faces_set_is_an_image_folder_the_pipeline_reads_and_a_rerun_replaces_it(tmp_path):
    from PIL import Image

    from benchmarks.faces import write_faces
    from pipeline.modalities.image_data import scan_tree

    out = tmp_path / "faces"
    assert write_faces(out) == {"face": 100, "not_face": 100}
    (out / "face" / "stray.png").write_bytes(b"not an image")
    write_faces(out)
    assert sorted(path.name for path in out.iterdir()) == ["face", "not_face"]
    assert len(list((out / "face").iterdir())) == 100  # the stray file went with the old tree
    with Image.open(out / "not_face" / "099.png") as image:
        assert image.size == (25, 25) and image.mode == "L"
    tree = scan_tree(out)
    assert tree.classes == ["face", "not_face"]
    assert [label for _, label in tree.files["all"]] == [0] * 100 + [1] * 100
