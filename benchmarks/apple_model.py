"""What the benchmarks share about Apple's code: the constructor arguments of `transformer_flow.Model` that
apple/ml-tarflow and apple/ml-starflow name alike, read from our configs (which name the images' channels and side
differently: `num_channels` / `image_size` for TarFlow, `in_channels` / `sample_size` for STARFlow)."""

from __future__ import annotations

from typing import Any


def shared_model_arguments(config: Any, channels: int, size: int) -> dict[str, int]:
    """`in_channels`, `img_size`, `patch_size`, `channels` (the width) and `num_blocks` of Apple's model."""
    return {
        "in_channels": channels,
        "img_size": size,
        "patch_size": config.patch_size,
        "channels": config.hidden_size,
        "num_blocks": config.num_blocks,
    }
