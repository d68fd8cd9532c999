"""Images in and out of the Space: uploads and drawings fitted to a model's input, outputs enlarged for display and
tiled into trajectory frames, each response's files kept distinct.

How an upload or a drawing becomes the model's input is `fit_to_model` (the README's "What the server accepts"
says the same in words).
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from tarflow_hf.grids import make_grid
from tarflow_hf.images import flatten_alpha

from .limits import MAX_UPLOAD_SIDE, check_choice

INVERT_CHOICES = ("auto", "yes", "no")
# Displayed images are scaled up (nearest neighbour, so pixels stay sharp) to at least this many pixels.
DISPLAY_SIZE = 192
# MNIST digits fit a 20x20 box centred by mass in a 28x28 image: drawings are fitted the same way.
MNIST_BOX_FRACTION = 20 / 28
# Uploads are decoded by PIL before our code sees them; this turns a decompression bomb into an error early.
PIL.Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_SIDE * MAX_UPLOAD_SIDE
TOO_LARGE = f"the image is too large: at most {MAX_UPLOAD_SIDE}x{MAX_UPLOAD_SIDE} pixels"
UNREADABLE = "could not read the upload as an image: use a PNG, JPEG, WebP, GIF or BMP file"
NO_IMAGE = "no image: upload or draw one first"


# ------------------------------------------------------------------------------------------------ inputs
def check_size(width: int, height: int) -> None:
    if max(width, height) > MAX_UPLOAD_SIDE or min(width, height) < 1:
        raise ValueError(f"{TOO_LARGE}, got {width}x{height}")


def check_image_file(path: str | Path) -> None:
    """A file is an image PIL reads, of an accepted size, from its header alone (no pixels decoded): what an
    upload is checked against the moment it arrives."""
    try:
        # PIL warns about a large image as it opens it; this function is that check. (catch_warnings is not
        # thread-safe: at worst the "ignore" outlives it, for this one warning.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                width, height = image.size
    except PIL.Image.DecompressionBombError:
        raise ValueError(TOO_LARGE) from None
    except (OSError, ValueError, SyntaxError):  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(UNREADABLE) from None
    check_size(width, height)


def the_image(value: Any) -> PIL.Image.Image:
    """A PIL image from what the page sends (an image, or a drawing pad's dict), else `ValueError`."""
    image = value.get("composite") if isinstance(value, dict) else value
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(NO_IMAGE)
    check_size(*image.size)
    return image


def fit_to_model(
    image: PIL.Image.Image, size: int, channels: int, invert: str = "auto", center: bool = False
) -> PIL.Image.Image:
    """An uploaded or drawn image -> the model's input, a `size`x`size` image in mode "L" (1 channel) or "RGB".

    - Transparency is flattened onto white (as the pipelines' `preprocess` does).
    - `invert`: "yes" inverts, "no" keeps, "auto" inverts single-channel images whose border is mostly light: MNIST
      (and models like it) expect light strokes on a dark background, a drawing is dark on light.
    - `center` (single-channel only): crop to the strokes, scale them to fit a box of 20/28 of the side and centre
      them by mass, as MNIST's digits were prepared.
    - Otherwise: centre-crop to a square and resize (Lanczos). An image already of the right size passes unchanged.
    """
    image = the_image(image)
    check_choice("invert", invert, INVERT_CHOICES)
    if channels not in (1, 3):
        raise ValueError(f"the demo handles 1- or 3-channel models, this one has {channels} channels")
    image = flatten_alpha(image, "L" if channels == 1 else "RGB")  # the pipelines' own rule (tarflow_hf.images)
    if invert == "yes" or (invert == "auto" and channels == 1 and _light_border(image)):
        image = PIL.ImageOps.invert(image)
    if center and channels == 1:
        return _center_by_mass(image, size)
    if image.size == (size, size):
        return image
    return PIL.ImageOps.fit(image, (size, size), method=PIL.Image.Resampling.LANCZOS)


def _light_border(image: PIL.Image.Image) -> bool:
    pixels = np.asarray(image, dtype=np.float32)
    margin = max(1, min(pixels.shape) // 20)
    border = np.concatenate(
        [pixels[:margin].ravel(), pixels[-margin:].ravel(), pixels[:, :margin].ravel(), pixels[:, -margin:].ravel()]
    )
    return float(border.mean()) > 127.5


def _center_by_mass(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    pixels = np.asarray(image)
    ink = pixels > 32
    if not ink.any():
        return PIL.ImageOps.fit(image, (size, size), method=PIL.Image.Resampling.LANCZOS)
    rows, cols = np.nonzero(ink)
    strokes = image.crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    box = max(1, round(size * MNIST_BOX_FRACTION))
    scale = box / max(strokes.size)
    strokes = strokes.resize(
        (max(1, round(strokes.width * scale)), max(1, round(strokes.height * scale))), PIL.Image.Resampling.LANCZOS
    )
    weights = np.asarray(strokes, dtype=np.float64)
    total = weights.sum()
    if total > 0:
        mass_y = (weights.sum(1) * np.arange(weights.shape[0])).sum() / total
        mass_x = (weights.sum(0) * np.arange(weights.shape[1])).sum() / total
    else:
        mass_y, mass_x = (weights.shape[0] - 1) / 2, (weights.shape[1] - 1) / 2
    left = min(max(round((size - 1) / 2 - mass_x), 0), size - strokes.width)
    top = min(max(round((size - 1) / 2 - mass_y), 0), size - strokes.height)
    canvas = PIL.Image.new("L", (size, size), 0)
    canvas.paste(strokes, (left, top))
    return canvas


# ------------------------------------------------------------------------------------------------ outputs
def upscale(image: PIL.Image.Image, size: int = DISPLAY_SIZE) -> PIL.Image.Image:
    """Nearest-neighbour enlargement by a whole factor, so 28x28 digits show as sharp pixels."""
    factor = max(1, size // image.width)
    return image.resize((image.width * factor, image.height * factor), PIL.Image.Resampling.NEAREST)


def for_display(image: PIL.Image.Image, **provenance: Any) -> PIL.Image.Image:
    """A copy of an output image whose PNG carries where it came from and a fresh id.

    Gradio caches an output image under the hash of its PNG bytes and rewrites that file in place, so two
    responses with identical pictures (two visitors asking for the same seed) race: one may be downloading the file
    while the other truncates it. The id makes every response's bytes, and so its cached files, distinct."""
    image = image.copy()
    image.info = {"Software": "tarflow-hf demo", **{f"tarflow:{key}": str(value) for key, value in provenance.items()}}
    image.info["tarflow:response"] = uuid.uuid4().hex
    return image


def model_space_to_pil(pipe: Any, images: torch.Tensor) -> list[PIL.Image.Image]:
    """TarFlow model-space images (about [-1, 1]) as PIL images."""
    return pipe.image_processor.postprocess(images.detach().float().cpu(), output_type="pil")


def latents_to_pil(pipe: Any, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """TarFlow latents (batch, patches, patch_dim), standard normal for typical images, shown as images: +-3 std
    maps to black..white."""
    images = pipe.transformer.unpatchify(latents.float().to(pipe.device))
    return model_space_to_pil(pipe, images / 3.0)


def tile(images: list[PIL.Image.Image], columns: int = 4, side: int = DISPLAY_SIZE // 2) -> PIL.Image.Image:
    """Images side by side (`columns` a row), each enlarged to about `side` pixels: one trajectory frame."""
    return make_grid([upscale(image, side) for image in images], columns=columns)
