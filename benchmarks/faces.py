"""A second real photo set for measuring strategies: faces vs non-faces, offline.

scikit-image ships in its wheel a subset of Labeled Faces in the Wild (``skimage.data.
lfw_subset``): 100 face crops and 100 crops of other parts of the same photos, 25 x 25
grayscale. This writes them as a class-per-folder tree of PNG files that the pipeline reads
as any user's photos (``data.dataset: imagefolder``): small, grayscale, two classes, a kind
of data unlike CIFAR's colour objects. Needs scikit-image (the dev extra).
Run from the repository root: ``python -m benchmarks.faces [--out data/raw/faces]``, then
``dvc add data/raw/faces`` and ``-S data.dataset=imagefolder -S data.path=data/raw/faces``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("face", "not_face")  # skimage's order: the first 100 images are faces


def write_faces(out: Path) -> dict[str, int]:
    """Write the tree under ``out`` (replacing it whole, never half-written); the count per class."""
    from skimage.data import lfw_subset

    images = lfw_subset()
    half = len(images) // 2
    staging = Path(tempfile.mkdtemp(prefix=".faces-", dir=out.parent))
    counts = {}
    for name, block in zip(CLASSES, (images[:half], images[half:]), strict=True):
        folder = staging / name
        folder.mkdir()
        for index, image in enumerate(block):
            Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(
                folder / f"{index:03d}.png"
            )
        counts[name] = len(block)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw/faces"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    counts = write_faces(args.out)
    print(f"{args.out}: " + ", ".join(f"{count} {name}" for name, count in counts.items()))


if __name__ == "__main__":
    main()
