"""The package's one grid-drawing function: images tiled row by row, with an optional caption under each.

Without captions the tiles touch, as in diffusers' `make_image_grid` (which draws them); an unfilled last row is
white. With captions every cell gets a white frame of `PADDING` pixels and its caption below, in PIL's default font;
cells widen to fit the longest caption up to `CAPTION_WIDTH` pixels (or the image width, when wider), and longer
captions are cut there with an ellipsis, so a grid's size never depends on what a prompt says.
"""

from __future__ import annotations

import math

import PIL.Image
from PIL import ImageDraw, ImageFont

PADDING = 2  # border and gap of a captioned grid, in pixels
CAPTION_WIDTH = 160  # the widest a caption makes its cell, in pixels
# The most pixels a grid may have: PIL refuses to open larger images (a decompression-bomb guard), so a bigger grid
# would be written but could not be read back.
MAX_GRID_PIXELS = PIL.Image.MAX_IMAGE_PIXELS or 2**31


def grid_size(
    count: int, columns: int, image_size: tuple[int, int], captions: list[str] | None = None
) -> tuple[int, int]:
    """(width, height) in pixels of the grid `make_grid` draws for `count` images of `image_size` (width, height)."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    if not captions:
        return columns * image_size[0], rows * image_size[1]
    cell_width, caption_height = _caption_cell(image_size[0], captions)
    return columns * (cell_width + PADDING) + PADDING, rows * (image_size[1] + caption_height + PADDING) + PADDING


def _caption_cell(image_width: int, captions: list[str]) -> tuple[int, int]:
    """The width of a captioned cell (image or longest caption, at most the caption limit) and its caption height."""
    font = ImageFont.load_default()
    limit = max(image_width, CAPTION_WIDTH)
    boxes = [font.getbbox(text[:limit]) for text in captions]  # a glyph is a pixel wide at least
    widest = max(box[2] - box[0] for box in boxes) + 2 * PADDING
    return max(image_width, min(widest, limit)), max(box[3] for box in boxes) + 2 * PADDING


def fit_caption(text: str, width: int, font: ImageFont.ImageFont) -> str:
    """`text`, cut with an ellipsis to at most `width` pixels in `font`."""
    text = text[: width + 1]  # a glyph is a pixel wide at least: the rest cannot fit
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


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
    width, caption_height = _caption_cell(images[0].width, captions)
    captions = [fit_caption(text, width - 2 * PADDING, font) for text in captions]
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
