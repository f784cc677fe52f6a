import string

import numpy as np

from pipeline.modalities.images.glyphs import CHARACTERS, glyph_fonts, render_glyph_dataset


def test_glyph_classes_hold_no_digits_and_no_repeats():
    assert not set(CHARACTERS) & set(string.digits)
    assert len(set(CHARACTERS)) == len(CHARACTERS) > 100


def test_bundled_fonts_draw_every_glyph():
    assert len(glyph_fonts()) >= 4


def test_rendering_is_deterministic_balanced_and_varied():
    images, labels, classes = render_glyph_dataset(2 * len(CHARACTERS), 16, seed=1)
    again, _, _ = render_glyph_dataset(2 * len(CHARACTERS), 16, seed=1)
    assert images.shape == (2 * len(CHARACTERS), 16, 16) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    assert np.bincount(labels).tolist() == [2] * len(classes)
    assert all(image.max() > 32 for image in images)  # every glyph left ink, even thin ones
    first, second = (images[labels == 0][i] for i in (0, 1))
    assert not np.array_equal(first, second)  # same letter, different rendering
