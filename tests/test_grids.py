"""`tarflow_hf.grids.make_grid`: the one grid of the package (sample and evaluate draw with it)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageFont
import pytest
from diffusers.utils import make_image_grid

from tarflow_hf.grids import PADDING, make_grid


def tiles(count: int, size=(8, 6), mode="L") -> list[PIL.Image.Image]:
    return [PIL.Image.new(mode, size, 40 * index + 10) for index in range(count)]


def test_uncaptioned_grid_is_diffusers_grid_with_white_fill():
    images = tiles(5)  # 8 wide, 6 high
    grid = make_grid(images, columns=2)
    assert grid.mode == "RGB" and grid.size == (2 * 8, 3 * 6)  # tiles touch: no frame without captions
    for index, image in enumerate(images):
        left, top = (index % 2) * 8, (index // 2) * 6
        np.testing.assert_array_equal(np.asarray(grid.crop((left, top, left + 8, top + 6))),
                                      np.asarray(image.convert("RGB")))  # fmt: skip
    assert (np.asarray(grid.crop((8, 12, 16, 18))) == 255).all()  # the unfilled cell is white, not black
    full = tiles(4, mode="RGB")
    np.testing.assert_array_equal(np.asarray(make_grid(full, 2)), np.asarray(make_image_grid(full, 2, 2)))


def test_columns_beyond_the_image_count_shrink_to_one_row():
    assert make_grid(tiles(3), columns=10).size == (3 * 8, 6)


def test_captioned_grid_frames_cells_and_writes_captions():
    images = tiles(5)
    short = make_grid(images, columns=2, captions=["a"] * 5)
    box = PIL.ImageFont.load_default().getbbox("a")
    caption_height = box[3] + 2 * PADDING
    width = max(8, box[2] - box[0] + 2 * PADDING)  # a cell is as wide as its tile or its caption
    cell_w, cell_h = width + PADDING, 6 + caption_height + PADDING
    assert short.size == (2 * cell_w + PADDING, 3 * cell_h + PADDING)
    for index, image in enumerate(images):
        left = PADDING + (index % 2) * cell_w + (width - 8) // 2  # tiles centred in their cells
        top = PADDING + (index // 2) * cell_h
        np.testing.assert_array_equal(np.asarray(short.crop((left, top, left + 8, top + 6))),
                                      np.asarray(image.convert("RGB")))  # fmt: skip
        caption = np.asarray(short.crop((left, top + 6, left + 8, top + cell_h - PADDING)))
        assert (caption < 128).any()  # dark caption pixels under each tile
    wide = make_grid(images[:2], columns=2, captions=["a very long class name", "b"])
    assert wide.width > 2 * cell_w + PADDING  # cells widen to fit the longest caption


@pytest.mark.parametrize(
    ("images", "columns", "captions", "message"),
    [
        ([], 2, None, "at least one image"),
        (tiles(2), 0, None, "columns >= 1"),
        (tiles(2), 2, ["only one"], "1 captions for 2 images"),
        ([*tiles(1), *tiles(1, size=(4, 4))], 2, None, "one size"),
    ],
)
def test_bad_arguments_are_refused(images, columns, captions, message):
    with pytest.raises(ValueError, match=message):
        make_grid(images, columns, captions)
