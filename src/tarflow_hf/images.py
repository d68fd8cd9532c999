"""Image inputs of the pipelines: PIL images, NumPy arrays or torch tensors with values in [0, 1] (the pipelines'
own output formats) -> one float32 tensor (batch, channels, height, width) in [0, 1].

Shared by `TarFlowPipeline` (pixel-space likelihoods, encoding, classification) and `StarFlowPipeline` (the VAE's
input). A saved pipeline folder carries this file (see `tarflow_hf.hub`), so it imports nothing from `tarflow_hf`.

What is accepted:

- a PIL image or a list of them, converted to the model's mode (`"L"` or `"RGB"`); transparent images (RGBA, LA,
  palette images with transparency) are flattened onto white first, as a browser shows them;
- a NumPy array, channels last: one image `(height, width, channels)` (or `(height, width)` for a single-channel
  model), or a batch `(batch, height, width, channels)`; a list of such single images;
- a torch tensor, channels first: `(channels, height, width)` or `(batch, channels, height, width)`; a list of
  `(channels, height, width)` tensors.

uint8 values are divided by 255; floating-point values must lie in [0, 1]. Images are never resized. Everything
else (an empty batch, a channels-first array, a mixed list, values out of range) raises a one-line `ValueError`
that says what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image | np.ndarray | torch.Tensor]
PIL_MODES = {1: "L", 3: "RGB"}


def flatten_alpha(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """`image` in `mode`, with any transparency composited onto a white background (not dropped: the colour under
    a transparent pixel is usually black or arbitrary)."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def _check_array(image: np.ndarray, channels: int, batch: bool) -> np.ndarray:
    """A NumPy image or batch as (batch, height, width, channels); anything ambiguous is refused rather than
    guessed (a (3, H, W) array given to a grayscale model is not three images)."""
    if image.ndim == 2 and channels == 1:
        return image[None, ..., None]
    if image.ndim == 3 and image.shape[-1] == channels:
        return image[None]
    if image.ndim == 4 and batch and image.shape[-1] == channels:
        return image
    single = f"{'(height, width) or ' if channels == 1 else ''}(height, width, {channels})"
    allowed = f"{single} or (batch, height, width, {channels})" if batch else single
    raise ValueError(
        f"a NumPy image for this {channels}-channel model must be channels-last {allowed}, got shape {image.shape} "
        "(pass channels-first images as torch tensors)"
    )


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"image tensors must be uint8 or floating point in [0, 1], got dtype {images.dtype}")
    images = images.float()
    if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"image values must lie in [0, 1] (the pipeline's output range), got values in "
            f"[{images.min().item():.4g}, {images.max().item():.4g}]; map model-space images x to x / 2 + 0.5"
        )
    return images


def _array_to_tensor(images: np.ndarray) -> torch.Tensor:
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"image arrays must be uint8 or floating point in [0, 1], got dtype {images.dtype}")
    return _to_unit(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))


def _from_pil(images: Sequence[PIL.Image.Image], channels: int, size: int | None) -> np.ndarray:
    mode = PIL_MODES.get(channels)
    if mode is None:
        raise ValueError(f"PIL images cannot hold the model's {channels} channels; pass arrays or tensors")
    sizes = {image.size for image in images}
    if size is not None and sizes != {(size, size)}:
        raise ValueError(f"images must be {size}x{size} pixels, got sizes {sorted(sizes)}")
    if len(sizes) > 1:
        raise ValueError(f"images in one batch must have one size, got sizes {sorted(sizes)}")
    arrays = [np.asarray(flatten_alpha(image, mode)) for image in images]
    return np.stack([array[..., None] if array.ndim == 2 else array for array in arrays])


def _from_list(images: Sequence[Any], channels: int, size: int | None) -> np.ndarray | torch.Tensor:
    """A list of PIL images, single-image arrays or (channels, height, width) tensors -> one batch."""
    if not images:
        raise ValueError("images is empty")
    if all(isinstance(image, PIL.Image.Image) for image in images):
        return _from_pil(images, channels, size)
    if all(isinstance(image, np.ndarray) for image in images):
        arrays = [_check_array(image, channels, batch=False) for image in images]
        if len({array.shape for array in arrays}) > 1:
            raise ValueError(f"images in one batch must have one shape, got {sorted({a.shape for a in arrays})}")
        return np.concatenate(arrays)
    if all(isinstance(image, torch.Tensor) for image in images):
        if any(image.dim() != 3 for image in images):
            raise ValueError("a list of image tensors must hold (channels, height, width) tensors")
        shapes = sorted({tuple(image.shape) for image in images})
        if len(shapes) > 1:
            raise ValueError(f"images in one batch must have one shape, got {shapes}")
        return torch.stack(list(images))
    kinds = sorted({type(image).__name__ for image in images})
    raise ValueError(f"a list of images must hold PIL images, arrays or tensors of one kind, got {kinds}")


def to_tensor(images: ImageInput, channels: int, size: int | None = None) -> torch.Tensor:
    """Images in any accepted form (see the module doc) -> float32 (batch, channels, height, width) in [0, 1] on the
    CPU. `size`: the square size every image must have (`None`: any size, one per batch)."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        images = _from_list(images, channels, size)
    if isinstance(images, np.ndarray):
        if images.ndim in (3, 4) and images.shape[0] == 0:
            raise ValueError(f"images is an empty batch (shape {images.shape})")
        images = _array_to_tensor(_check_array(images, channels, batch=True))
    elif isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() == 4 and images.shape[0] == 0:
            raise ValueError(f"images is an empty batch (shape {tuple(images.shape)})")
        images = _to_unit(images.detach().cpu())
    else:
        raise ValueError(f"images must be PIL images, NumPy arrays or torch tensors, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != channels or (size is not None and images.shape[-2:] != (size, size)):
        height, width = ("height", "width") if size is None else (size, size)
        raise ValueError(
            f"images must have shape (batch, {channels}, {height}, {width}) as a tensor (or (batch, {height}, {width}, "
            f"{channels}) as an array), got {tuple(images.shape)}"
        )
    return images


__all__ = ["ImageInput", "flatten_alpha", "to_tensor"]
