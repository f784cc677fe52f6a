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
    from pipeline.modalities.images.data import scan_tree

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


def test_the_photo_patches_are_a_split_tree_whose_test_patches_overlap_no_training_one(tmp_path):
    from benchmarks.photo_patches import PHOTOS, write_patches
    from pipeline.modalities.images.data import scan_tree

    assert write_patches(tmp_path / "patches") == {"train": 480, "test": 160}
    tree = scan_tree(tmp_path / "patches")
    assert tree.classes == sorted(PHOTOS) and set(tree.files) == {"train", "test"}
    columns = {
        split: {int(path.stem.split("_")[1]) for path, _ in files} for split, files in tree.files.items()
    }
    assert columns == {"train": set(range(6)), "test": {6, 7}}


def test_the_recipe_table_follows_its_results(tmp_path):
    from benchmarks.finetune_recipes import table

    run = {"set": "faces", "recipe": "", "seed": 1, "probe": 0.9, "finetuned": 0.95}
    run.update(epoch1_val=0.8, probe_val=0.85)
    record = {"results": [run, {**run, "seed": 2, "finetuned": 0.9, "epoch1_val": 0.9}]}
    row = table(record).splitlines()[2]
    assert row == "| faces | defaults | 2 | 90.00 ± 0.00 | 92.50 ± 3.54 | +2.50 | +0.00 | -5.00 |"
