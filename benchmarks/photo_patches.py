"""A third real photo set, of another kind: which photo a patch was cut from, offline.

scikit-image ships ten photos in its wheel (an astronaut, bricks, a cameraman, a cat,
coffee, grass, gravel, a Hubble deep field, a stained tissue slide, a rocket launch). Each
is cut into a grid of 40 x 40 px patches; a patch's class is its photo. The left three
quarters of each photo give the training patches, the right quarter the test patches, so no
test patch overlaps a training one and the test is a shift within each photo: textures and
regions, not objects (cifar10-dev) or faces (benchmarks/faces.py). Written as a
class-per-folder tree with train/ and test/ folders (``data.dataset: imagefolder``).

``--photos patches-b`` cuts nine other photos the wheels ship the same way (scikit-image's coins,
moon, a motorcycle, a retina, a scanned page, a photo of text, a cell; scikit-learn's China
temple and flower): patches-b, a set assembled after the defaults were chosen, to check
them on photos they were never judged on.

``--val-strip`` moves the column of patches beside the test strip out of train into val/, so
that the pipeline judges its epochs (and the probe against them) on patches shifted from the
training ones as the test patches are, instead of on val patches drawn from among the
training ones: the sets patches-strip and patches-b-strip of benchmarks.finetune_recipes.

Needs scikit-image (the dev extra). Run from the repository root:
``python -m benchmarks.photo_patches [--out data/raw/patches] [--photos patches-b] [--val-strip]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
)
CHECK_PHOTOS = ("coins", "moon", "motorcycle", "retina", "page", "text", "cell", "china", "flower")
PHOTO_SETS = {"patches": PHOTOS, "patches-b": CHECK_PHOTOS}  # each set's photos, by its name
SIDE = 320  # each photo's centre square, resized to this
PATCH = 40  # an 8 x 8 grid of patches
TEST_COLUMNS = 2  # the right quarter of each photo: test patches
VAL_STRIP = "-strip"  # a set's name with this: its column beside the test strip is val


def pixels(name: str) -> np.ndarray:
    """The photo's pixels: scikit-learn's sample images by their file's stem, the left view
    of scikit-image's stereo motorcycle, scikit-image's other photos by name."""
    from skimage import data

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def photo(name: str) -> Image.Image:
    """A photo as RGB, its centre square resized to SIDE x SIDE."""
    image = Image.fromarray(pixels(name)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def split_of(column: int, val_strip: bool) -> str:
    """Which split a patch of grid column ``column`` goes to."""
    cells = SIDE // PATCH
    if column >= cells - TEST_COLUMNS:
        return "test"
    return "val" if val_strip and column == cells - TEST_COLUMNS - 1 else "train"


def write_patches(out: Path, photos: tuple[str, ...] = PHOTOS, val_strip: bool = False) -> dict[str, int]:
    """Write the tree of ``photos`` under ``out`` (replacing it whole, never half-written);
    the patches of each split."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".patches-", dir=out.parent))
    counts = {"train": 0, "val": 0, "test": 0} if val_strip else {"train": 0, "test": 0}
    cells = SIDE // PATCH
    for name in photos:
        image = photo(name)
        for row in range(cells):
            for column in range(cells):
                split = split_of(column, val_strip)
                folder = staging / split / name
                folder.mkdir(parents=True, exist_ok=True)
                box = (column * PATCH, row * PATCH, (column + 1) * PATCH, (row + 1) * PATCH)
                image.crop(box).save(folder / f"{row}_{column}.png")
                counts[split] += 1
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return counts


def write_named(out: Path, name: str) -> dict[str, int]:
    """Write the set ``name``: a PHOTO_SETS name, with VAL_STRIP after it for its val-strip cut."""
    photos = name.removesuffix(VAL_STRIP)
    if photos not in PHOTO_SETS:
        raise ValueError(
            f"{name!r}: not a patch set; the sets are {', '.join(PHOTO_SETS)}, "
            f"or one of them followed by {VAL_STRIP!r} for its val-strip cut"
        )
    return write_patches(out, PHOTO_SETS[photos], val_strip=name.endswith(VAL_STRIP))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw/patches"))
    parser.add_argument("--photos", choices=PHOTO_SETS, default="patches")
    parser.add_argument("--val-strip", action="store_true", help="the column beside the test strip is val")
    args = parser.parse_args()
    photos = PHOTO_SETS[args.photos]
    counts = write_patches(args.out, photos, args.val_strip)
    *first, last = [f"{count} {split}" for split, count in counts.items()]
    total = f"{', '.join(first)} and {last} patches of {len(photos)} photos"
    print(f"photo_patches: {total} -> {args.out}")


if __name__ == "__main__":
    main()
