"""The package's one grid-drawing function: images tiled row by row, with an optional caption under each.

Without captions the tiles touch, as in diffusers' `make_image_grid` (which draws them); an unfilled last row is
white. With captions every cell gets a white frame of `PADDING` pixels and its caption below, in PIL's default font,
and cells widen to fit the longest caption.
"""

from __future__ import annotations

import math

import PIL.Image
from PIL import ImageDraw, ImageFont

PADDING = 2  # border and gap of a captioned grid, in pixels


def make_grid(images: list[PIL.Image.Image], columns: int, captions: list[str] | None = None) -> PIL.Image.Image:
    """Tile `images` (all of one size) in `columns` columns (fewer when there are fewer images) as one RGB image,
    with `captions[i]` under image i when captions are given."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"make_grid needs columns >= 1, got {columns}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"make_grid got {len(captions)} captions for {len(images)} images")
    size = images[0].size
    if any(image.size != size for image in images):
        raise ValueError("make_grid needs images of one size")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    if not captions:
        from diffusers.utils import make_image_grid

        blank = PIL.Image.new("RGB", size, "white")
        cells = [image.convert("RGB") for image in images] + [blank] * (rows * columns - len(images))
        return make_image_grid(cells, rows=rows, cols=columns)
    return _captioned_grid(images, columns, rows, captions)


def _captioned_grid(images: list[PIL.Image.Image], columns: int, rows: int, captions: list[str]) -> PIL.Image.Image:
    font = ImageFont.load_default()
    boxes = [font.getbbox(text) for text in captions]
    width = max(images[0].width, *(box[2] - box[0] + 2 * PADDING for box in boxes))
    caption_height = max(box[3] for box in boxes) + 2 * PADDING
    cell_w, cell_h = width + PADDING, images[0].height + caption_height + PADDING
    grid = PIL.Image.new("RGB", (columns * cell_w + PADDING, rows * cell_h + PADDING), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        left = PADDING + (index % columns) * cell_w
        top = PADDING + (index // columns) * cell_h
        grid.paste(image.convert("RGB"), (left + (width - image.width) // 2, top))
        text_width = draw.textlength(captions[index], font=font)
        draw.text((left + (width - text_width) / 2, top + image.height + PADDING), captions[index], "black", font)
    return grid
