"""STARFlow's 3-axis rotary position embedding (image row, image column, text index), scaled so that any latent size
covers the positions the model was trained on (Apple's `misc/pe.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .configuration_starflow import StarFlowConfig
from .layers import rows_at


def rope_angles(config: StarFlowConfig, height: int, width: int, text_length: int) -> torch.Tensor:
    """Rotary angles (text_length + height * width, head_dim / 2) in float32, one per interleaved pair of a head's
    channels, text positions first.

    Apple's `get_positions` + `VisionRotaryEmbeddingFast`: image token (i, j) of an h x w grid sits at
    (i * P / sqrt(hw), j * P / sqrt(hw), 0) with P the training grid side, so the training size gives integer
    positions and other sizes (also non-square) cover the same range; text token k sits at (0, 0, k * P / L). The
    two image axes share `rope_spatial_frequencies` frequencies 1 / theta^(2k / d); the text axis has 8
    frequencies 1 / theta^(k / 8) (step 1, not 2: Apple's choice)."""
    spatial_dim = 2 * config.rope_spatial_frequencies
    grid = config.grid_size
    spatial = 1.0 / (config.rope_theta ** (torch.arange(0, spatial_dim, 2)[: spatial_dim // 2].float() / spatial_dim))
    mean_length = math.sqrt(height * width)
    rows = torch.arange(height) / mean_length * grid
    cols = torch.arange(width) / mean_length * grid
    rows, cols = (axis.reshape(-1) for axis in torch.meshgrid(rows, cols, indexing="ij"))
    parts = []
    if config.has_text:
        text_dim = config.rope_text_frequencies
        text_frequencies = 1.0 / (config.rope_theta ** (torch.arange(0, text_dim).float() / text_dim))
        text = torch.arange(text_length) / max(text_length, 1) * grid
        zeros = torch.zeros(text_length)
        rows, cols = torch.cat([zeros, rows]), torch.cat([zeros, cols])
        depth = torch.cat([text, torch.zeros(height * width)])
        parts = [torch.outer(depth, text_frequencies)]
    return torch.cat([torch.outer(rows, spatial), torch.outer(cols, spatial), *parts], dim=-1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x_2m, x_2m+1) of (B, heads, L, head_dim) by the angles of (L, head_dim / 2), given
    as the unit complex numbers `rotation`: (x_2m + i x_2m+1) * e^(i angle), one complex product per pair, in
    float32 at least (Apple's x * cos + rotate_half(x) * sin, to float32 rounding)."""
    up = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = torch.view_as_complex(x.to(up).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


@dataclass
class RotaryTable:
    """The rotary angles of every sequence position of a block (text prefix first), as unit complex numbers
    (L, head_dim / 2) (`apply_rope`)."""

    rotation: torch.Tensor

    @classmethod
    def build(cls, config: StarFlowConfig, height: int, width: int, text_length: int, device, dtype) -> RotaryTable:
        angles = rope_angles(config, height, width, text_length).to(device)
        angles = angles.double() if dtype == torch.float64 else angles
        return cls(torch.polar(torch.ones_like(angles), angles))

    def rows(self, start: int | torch.Tensor, length: int) -> torch.Tensor:
        return rows_at(self.rotation, start, length, dim=0)

    def tail(self, length: int) -> RotaryTable:
        """The last `length` positions: the image part, for a block without the text prefix."""
        return RotaryTable(self.rotation[-length:])


__all__ = ["RotaryTable", "apply_rope", "rope_angles"]
