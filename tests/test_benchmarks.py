"""Memory stays bounded: prepare plus extract stream image files instead of loading them."""

import pytest

from benchmarks.memory import measure


@pytest.mark.slow
def test_peak_memory_on_4x_the_images_stays_within_1_3x():
    one, four = measure(per_class=40, side=256)
    assert four <= 1.3 * one, f"peak memory {one:.0f} MiB on 80 images, {four:.0f} MiB on 320"
