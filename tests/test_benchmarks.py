"""The benchmarks' own pieces: memory stays bounded (prepare plus extract stream image files
instead of loading them), and the faces set is a tree the pipeline reads."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

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


def test_the_val_strip_cut_holds_out_the_column_beside_the_test_strip(tmp_path):
    from benchmarks.photo_patches import write_named
    from pipeline.modalities.images.data import scan_tree

    assert write_named(tmp_path / "strip", "patches-b-strip") == {"train": 360, "val": 72, "test": 144}
    tree = scan_tree(tmp_path / "strip")
    columns = {
        split: {int(path.stem.split("_")[1]) for path, _ in files} for split, files in tree.files.items()
    }
    assert columns == {"train": set(range(5)), "val": {5}, "test": {6, 7}}
    with pytest.raises(ValueError, match="'patches-c': not a patch set; the sets are patches, patches-b"):
        write_named(tmp_path / "c", "patches-c")


def test_the_check_set_cuts_other_photos_of_both_wheels(tmp_path):
    from benchmarks.photo_patches import CHECK_PHOTOS, PHOTOS, write_patches
    from pipeline.modalities.images.data import scan_tree

    assert write_patches(tmp_path / "patches-b", CHECK_PHOTOS) == {"train": 432, "test": 144}
    tree = scan_tree(tmp_path / "patches-b")
    assert tree.classes == sorted(CHECK_PHOTOS) and not set(CHECK_PHOTOS) & set(PHOTOS)


def test_the_dense_windows_cover_the_test_strip_and_its_grid_patches_and_nothing_else(tmp_path):
    from benchmarks.dense_patches import strip_windows, write_windows
    from benchmarks.photo_patches import PATCH, SIDE, photo

    corners = strip_windows()
    assert len(corners) == len(set(corners)) == 6 * 36
    grid = {(column * PATCH, row * PATCH) for row in range(8) for column in (6, 7)}  # the test patches
    assert grid <= set(corners)
    assert all(SIDE - 2 * PATCH <= left <= SIDE - PATCH and 0 <= top <= SIDE - PATCH for left, top in corners)
    assert write_windows(tmp_path / "windows", ("coffee",)) == 216
    window = np.array(Image.open(tmp_path / "windows" / "coffee" / "40_248.png"))
    assert np.array_equal(window, np.array(photo("coffee"))[40:80, 248:288])


def test_the_dense_table_sets_each_model_against_its_start_on_the_grid_and_the_windows():
    from benchmarks.dense_patches import table

    def seed(number: int, grid: tuple[float, float], dense: tuple[float, float]) -> dict:
        return {
            "set": "patches-b",
            "seed": number,
            **{f"grid_{name}": value for name, value in zip(("start", "finetuned"), grid, strict=True)},
            **{f"dense_{name}": value for name, value in zip(("start", "finetuned"), dense, strict=True)},
            "grid_examples": 144,
            "dense_examples": 1944,
        }

    record = {"results": [seed(1, (0.99, 1.0), (0.98, 0.985)), seed(2, (1.0, 0.99), (0.99, 0.989))]}
    row = table(record).splitlines()[2]
    assert row == (
        "| patches-b | 2 | 144 | 99.50% | +0.00 (-1.00; 1 of 2) | 1,944 | 98.50% | +0.20 (-0.10; 1 of 2) |"
    )


def test_the_dense_shares_table_ships_the_blend_or_the_probe_as_val_decided():
    from benchmarks.dense_patches import shipped_dense, table

    shares = {"0.9": 0.99, "0.8": 0.98, "0.7": 0.97, "0.5": 0.96}
    run = {
        "set": "patches",
        "seed": 1,
        "dense_start": 0.97,
        "dense_finetuned": 0.95,
        "dense_shares": shares,
        "ships_start": {"0.9": False, "0.8": True, "0.7": False, "0.5": False},
    }
    assert shipped_dense(run, 1.0) == 0.95 and shipped_dense(run, 0.9) == 0.99
    assert shipped_dense(run, 0.8) == 0.97  # val preferred the probe: finetune ships it
    lines = table({"results": [run]}, "shares").splitlines()
    assert lines[0] == "| set | seeds | share 1 (shipped) | share 0.9 | share 0.8 | share 0.7 | share 0.5 |"
    assert lines[2] == (
        "| patches | 1 | -2.00 (-2.00; 1 of 1) | +2.00 (+2.00; 0 of 1) | +0.00 (+0.00; 0 of 1) "
        "| +0.00 (+0.00; 0 of 1) | -1.00 (-1.00; 1 of 1) |"
    )


def test_the_recipe_table_follows_its_results(tmp_path):
    from benchmarks.finetune_recipes import table

    run = {"set": "faces", "recipe": "", "seed": 1, "probe": 0.9, "finetuned": 0.95}
    run.update(epoch1_val=0.8, probe_val=0.85)
    record = {"results": [run, {**run, "seed": 2, "finetuned": 0.9, "epoch1_val": 0.9}]}
    row = table(record).splitlines()[2]
    assert row == (
        "| faces | defaults before auto (8 epochs × 64) | 2 | 90.00 ± 0.00 | 92.50 ± 3.54 "
        "| +2.50 | +0.00 | -5.00 |"
    )


def faces_run(recipe: str, seed: int, finetuned: float, correct: str, **fields: Any) -> dict[str, Any]:
    """A finetune_recipes record on faces with a probe at 0.9: its fine-tuned accuracy and
    which test examples it got right, with ``fields`` (sizes, seconds) beside."""
    return {
        "set": "faces",
        "recipe": recipe,
        "seed": seed,
        "probe": 0.9,
        "finetuned": finetuned,
        "correct": correct,
        **fields,
    }


def test_the_headline_shows_the_runs_of_the_schedule_auto_picks_and_the_schedule_table_compares(tmp_path):
    """113 training photos: auto is 32 epochs at 16 (250 steps); the headline takes those
    runs, not those of 8 x 64; the schedule table holds each schedule to 8 x 64 on the same
    seeds, with McNemar's test on the test examples only one of the two gets right."""
    from benchmarks.finetune_recipes import table

    before, auto = "finetune.epochs=8,finetune.batch_size=64", "finetune.epochs=32,finetune.batch_size=16"

    def run(recipe, seed, finetuned, correct):
        seconds = 10.0 if recipe == before else 30.0
        return faces_run(recipe, seed, finetuned, correct, sizes={"train": 113}, finetune_seconds=seconds)

    record = {
        "results": [
            run(before, 1, 0.9, "1" * 9 + "0"),
            run(before, 2, 0.9, "1" * 9 + "0"),
            run(auto, 1, 1.0, "1" * 10),
            run(auto, 2, 0.9, "1" * 10),
        ]
    }
    headline = table(record, "headline").splitlines()
    assert headline[2] == "| faces vs non-faces (LFW crops), Lite0 | 2 | 90.00% | 95.00% | +5.00 | +0.00 |"
    rows = table(record, "schedule").splitlines()
    assert rows[2] == "| faces | 113 | 8 × 64 (16) | 2 | +0.00 | – | – | 10 | – |"
    assert rows[3] == "| faces | 113 | 32 × 16 (256) **auto** | 2 | +5.00 | +5.00 | 0.500 | 30 | 3.0 |"


def test_the_gpu_benchmark_refuses_a_machine_without_cuda(monkeypatch):
    import sys

    import torch

    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["benchmarks.gpu", "--parts", "steps"])
    with pytest.raises(SystemExit, match="torch sees no CUDA GPU"):
        gpu.main()


def test_the_gpu_benchmark_times_the_plain_and_the_pipeline_loop_and_tables_them():
    import torch

    from benchmarks import gpu

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        rows = gpu.step_speeds(torch.device("cpu"), steps=1, batch=2, size=32, archs=("resnet18",))
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    assert [row["arch"] for row in rows] == ["resnet18"]
    loops = ("plain_fp32", "pipeline", "pipeline_nondeterministic")
    assert all(row[loop] > 0 for row in rows for loop in loops)
    record = {"results": {"gpu": "a GPU", "torch": "2", "steps": rows}}
    lines = gpu.table(record, "steps").splitlines()
    plain, ours = rows[0]["plain_fp32"], rows[0]["pipeline"]
    assert lines[0].startswith("| fine-tuning step, a GPU, torch 2 |")
    assert lines[2].startswith(f"| resnet18, 32 px, batch 2 (images/s) | {plain:.0f} | {ours:.0f} ")
    assert f"({ours / plain:.2f}x)" in lines[2]


def test_the_gpu_loader_rows_are_timed_after_a_warm_up_at_their_size(monkeypatch):
    import torch
    from torch import nn

    from benchmarks import gpu
    from pipeline.core.data import SeededAugmentation

    calls = []
    tiny = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 10))
    monkeypatch.setattr(gpu, "fresh_classifier", lambda arch, size: tiny)
    real_warm_up = gpu.warm_up

    def warm_up(model, device, optimizer, scaler, batch, size):
        calls.append(("warm-up", batch, size))
        before = [p.detach().clone() for p in model.parameters()]
        real_warm_up(model, device, optimizer, scaler, batch, size=8)  # small images on a CPU
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    def photos(policy, count, batch, photos, device):
        images = torch.utils.data.TensorDataset(torch.rand(6, 3, 8, 8), torch.arange(6) % 10)
        images.labels = images.tensors[1].tolist()
        return torch.utils.data.DataLoader(SeededAugmentation(images, 0), batch_size=batch)

    monkeypatch.setattr(gpu, "warm_up", warm_up)
    monkeypatch.setattr(gpu.augment_speed, "loader", photos)
    real_train_epoch = gpu.train_epoch

    def train_epoch(*args, **kwargs):
        calls.append("pass")
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(gpu, "train_epoch", train_epoch)
    rows = gpu.loader_speeds(torch.device("cpu"), Path("photos"), [2, 8], epochs=1, batch=4)
    # The warm-up's own pass, then one timed pass per worker count.
    assert calls == [("warm-up", 4, gpu.augment_speed.SIZE), "pass", "pass", "pass"]
    assert [row["workers"] for row in rows] == [2, 8] and all(row["warmed_up"] for row in rows)
    record = {"results": {"gpu": "a GPU", "torch": "2", "loaders": rows}}
    assert "first pass" not in gpu.table(record, "loaders")
    unwarmed = [{key: value for key, value in row.items() if key != "warmed_up"} for row in rows]
    lines = gpu.table({"results": {**record["results"], "loaders": unwarmed}}, "loaders").splitlines()
    assert "(the run's first pass at 96 px)" in lines[2] and "first pass" not in lines[3]


def test_the_interpolation_table_gives_what_finetune_ships_at_each_share_and_val_s_pick():
    from benchmarks.interpolation import SHARES, table, val_pick

    def shares(test: dict[float, float], val_best: float, worse_on_val: float = -1) -> dict:
        return {
            f"{share:.1f}": {
                "test_accuracy": test.get(share, 0.9),
                "val_accuracy": 0.9 if share == worse_on_val else 0.97,
                "val_loss": abs(share - val_best),  # val's loss is lowest at val_best
            }
            for share in SHARES
        }

    first = {"set": "patches", "seed": 1, "probe": 0.9, "select": "accuracy"}
    first["shares"] = shares({1.0: 0.95, 0.5: 0.92}, 1.0)
    second = {**first, "seed": 2, "shares": shares({1.0: 0.89, 0.5: 0.93}, 0.9)}
    assert val_pick(first) == "1.0" and val_pick(second) == "0.9"
    header, _, row = table({"results": [second, first]}).splitlines()
    assert header.startswith("| set | seeds | share 1 (shipped) | share 0.9 |")
    cells = row.split(" | ")
    assert cells[2:4] == ["+2.00 (-1.00; 1 under the probe)", "+0.00 (+0.00)"] and cells[6:] == [
        "+2.50 (+2.00)",
        "1.0 ×1, 0.9 ×1 |",
    ]
    # A blend worse than the start on val ships the probe, as finetune does.
    second["shares"] = shares({1.0: 0.89, 0.5: 0.93}, 0.9, worse_on_val=0.5)
    assert (
        table({"results": [second, first]}).splitlines()[2].split(" | ")[6]
        == "+1.00 (+0.00, 1 kept the probe)"
    )


def test_the_interpolation_table_says_how_many_seeds_end_under_the_probe_and_their_p_value():
    from benchmarks.interpolation import SHARES, under_note

    def run(seed: int, tuned: float, p_value: float | None) -> dict:
        row = {"test_accuracy": tuned, "val_accuracy": 0.99, "val_loss": 0.1}
        if p_value is not None:
            row["test_vs_start"] = {"p_value": p_value}
        start = {"test_accuracy": 0.9, "val_accuracy": 0.9, "val_loss": 0.3}
        shares = {f"{share:.1f}": start if share == 0 else row for share in SHARES}
        return {"set": "patches", "seed": seed, "probe": 0.9, "select": "accuracy", "shares": shares}

    assert under_note([run(1, 0.95, 0.01)], 1.0) == ""
    assert under_note([run(1, 0.95, 0.01), run(2, 0.89, 0.8)], 1.0) == "; 1 under the probe, p = 0.8"
    both = [run(1, 0.88, 0.5), run(2, 0.89, 1.0)]
    assert under_note(both, 1.0) == "; 2 under the probe, p ≥ 0.5"
    assert under_note([run(1, 0.88, 1.0), run(2, 0.89, 1.0)], 1.0) == "; 2 under the probe, p = 1 each"
    assert under_note([run(1, 0.89, None)], 1.0) == "; 1 under the probe"  # measured before the counts


def test_the_loop_benchmark_feeds_finetunes_loop_from_photo_files_and_times_the_step_alone():
    """benchmarks.loop_speed (the GPU benchmark's loop part) on this CPU: four 500x375 JPEGs,
    Lite0 at 224 px, one timed epoch of each loader; its table gives the ratio."""
    import torch

    from benchmarks import loop_speed
    from pipeline.core.loaders import worker_count

    rows = loop_speed.loop_rows(torch.device("cpu"), photos=4, epochs=1, archs=("efficientnet_lite0",))
    (row,) = rows
    assert (row["arch"], row["size"], row["workers"]) == ("efficientnet_lite0", 224, worker_count("auto"))
    assert row["images_per_second"] > 0 and row["step_images_per_second"] > 0
    record = {"machine": {"gpu": None}, "results": {"loop": rows}}
    ratio = row["images_per_second"] / row["step_images_per_second"]
    assert loop_speed.table(record).splitlines()[2].endswith(f"| {ratio:.2f} |")


def test_the_val_floor_table_holds_the_runs_without_it_to_the_committed_params_runs():
    from benchmarks.finetune_recipes import table

    def run(recipe, seed, finetuned, correct, train, val):
        return faces_run(recipe, seed, finetuned, correct, sizes={"train": train, "val": val})

    auto, floorless = (
        "finetune.epochs=32,finetune.batch_size=16",
        "data.min_val_examples=0,finetune.epochs=32,finetune.batch_size=16",
    )
    record = {
        "results": [
            run(auto, 1, 1.0, "1" * 10, 113, 37),
            run(floorless, 1, 0.9, "1" * 9 + "0", 120, 30),
            run("finetune.epochs=8,finetune.batch_size=64", 1, 0.9, "1" * 9 + "0", 113, 37),  # not auto's
        ]
    }
    rows = table(record, "val_floor").splitlines()
    assert rows[2:] == [
        "| faces | 100 | 113 | 37 | 1 | 100.00 | +10.00 | – | – |",
        "| faces | 0 | 120 | 30 | 1 | 90.00 | +0.00 | -10.00 | 1.000 |",
    ]
    assert not any("min_val_examples" in line for line in table(record, "images").splitlines()[2:])
