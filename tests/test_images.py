"""tarflow_hf.images: every accepted image input gives the same (batch, channels, height, width) tensor in [0, 1];
what would have to be guessed (a channels-first array, an empty batch, mixed kinds) is refused with one line."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from tarflow_hf.images import flatten_alpha, to_tensor


@pytest.fixture(scope="module")
def unit() -> torch.Tensor:
    return (torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 255).round() / 255


def test_every_format_gives_the_same_tensor(unit):
    arrays = unit.permute(0, 2, 3, 1).numpy()
    pil = [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
    for images in (unit, list(unit), arrays, list(arrays), (arrays * 255).round().astype(np.uint8), pil):
        out = to_tensor(images, 3)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 6)
        torch.testing.assert_close(out, unit, rtol=0, atol=1e-6)
    torch.testing.assert_close(to_tensor(unit[0], 3), unit[:1])  # one (C, H, W) tensor
    torch.testing.assert_close(to_tensor(arrays[0], 3), unit[:1])  # one (H, W, C) array
    gray = unit[:, :1]
    torch.testing.assert_close(to_tensor(gray[0, 0].numpy(), 1), gray[:1])  # (H, W) on a single-channel model


def test_alpha_is_flattened_onto_white():
    rgba = PIL.Image.new("RGBA", (2, 2), (0, 0, 255, 0))
    assert flatten_alpha(rgba, "RGB").getpixel((0, 0)) == (255, 255, 255)
    half = PIL.Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert flatten_alpha(half, "L").getpixel((0, 0)) in (126, 127)
    palette = PIL.Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert flatten_alpha(palette, "RGB").getpixel((1, 1)) == (255, 255, 255)
    assert flatten_alpha(PIL.Image.new("RGB", (2, 2), (1, 2, 3)), "RGB").getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("images", "channels", "message"),
    [
        (np.zeros((3, 4, 4)), 1, r"channels-last \(height, width\) or \(height, width, 1\) or \(batch, height"),
        (np.zeros((2, 3, 4, 4)), 3, r"\(height, width, 3\) or \(batch, height, width, 3\), got shape \(2, 3, 4, 4\)"),
        ([np.zeros((3, 4, 4))], 1, r"must be channels-last \(height, width\) or \(height, width, 1\), got"),
        (np.zeros((4, 4)), 3, r"got shape \(4, 4\)"),
        (np.zeros((0, 4, 4, 3)), 3, r"images is an empty batch"),
        (torch.zeros(0, 3, 4, 4), 3, r"images is an empty batch"),
        ((), 3, r"images is empty"),
        ([np.zeros((4, 4, 3)), np.zeros((5, 4, 3))], 3, r"images in one batch must have one shape"),
        ([torch.zeros(3, 4, 4), torch.zeros(3, 5, 4)], 3, r"images in one batch must have one shape"),
        ([PIL.Image.new("RGB", (4, 4)), PIL.Image.new("RGB", (5, 4))], 3, r"one size, got sizes"),
        ([PIL.Image.new("RGB", (4, 4)), torch.zeros(3, 4, 4)], 3, r"arrays or tensors of one kind"),
        (np.zeros((4, 4, 3), dtype=np.int64), 3, r"image arrays must be uint8 or floating point"),
        (torch.full((3, 4, 4), 1.5), 3, r"image values must lie in \[0, 1\]"),
        (torch.full((3, 4, 4), float("nan")), 3, r"image values must lie in \[0, 1\]"),
        (torch.zeros(1, 2, 4, 4), 3, r"images must have shape \(batch, 3, height, width\)"),
        ([PIL.Image.new("RGB", (4, 4))], 4, r"PIL images cannot hold the model's 4 channels"),
        ("image.png", 3, r"images must be PIL images, NumPy arrays or torch tensors, got str"),
    ],
)
def test_refused_inputs_raise_one_line(images, channels, message):
    with pytest.raises(ValueError, match=message) as error:
        to_tensor(images, channels)
    assert "\n" not in str(error.value)


def test_size_is_checked_when_given():
    with pytest.raises(ValueError, match=r"images must be 8x8 pixels, got sizes \[\(4, 4\)\]"):
        to_tensor([PIL.Image.new("L", (4, 4))], 1, size=8)
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, 8, 8\) .* got \(1, 1, 4, 4\)"):
        to_tensor(torch.zeros(1, 1, 4, 4), 1, size=8)
