"""Apple's original models, for the benchmarks to compare against: `transformer_flow.py` loaded at run time from a
checkout of apple/ml-tarflow or apple/ml-starflow (never copied into this repository), and built with our weights
through the reverse conversions."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tarflow_hf import convert, convert_starflow
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.modeling_tarflow import TarFlowModel


def shared_model_arguments(config: Any, channels: int, size: int) -> dict[str, int]:
    """`in_channels`, `img_size`, `patch_size`, `channels` (the width) and `num_blocks` of Apple's model, which both
    checkouts name alike; our configs name the images' channels and side differently (`num_channels` /
    `image_size` for TarFlow, `in_channels` / `sample_size` for STARFlow), hence the two arguments."""
    return {
        "in_channels": channels,
        "img_size": size,
        "patch_size": config.patch_size,
        "channels": config.hidden_size,
        "num_blocks": config.num_blocks,
    }


def _transformer_flow_file(checkout: Path, flag: str, repository: str) -> Path:
    path = Path(checkout) / "transformer_flow.py"
    if not path.is_file():
        raise SystemExit(f"{flag} {checkout}: no transformer_flow.py (expected a checkout of {repository})")
    return path


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _importable_from(folder: Path) -> Iterator[None]:
    """`folder` first on `sys.path` for the duration, and only that: ml-starflow's `transformer_flow.py` imports its
    sibling package `misc` (`from misc.pe import ...`), which only resolves with the checkout on the path. Nothing
    in that module imports lazily, so the entry is removed as soon as it has loaded."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def load_ml_tarflow(checkout: Path) -> ModuleType:
    """apple/ml-tarflow's `transformer_flow` module (it imports only torch), under a name of its own."""
    return _load_module("ml_tarflow_transformer_flow", _transformer_flow_file(checkout, "--ml-tarflow", "ml-tarflow"))


def load_ml_starflow(checkout: Path) -> ModuleType:
    """apple/ml-starflow's `transformer_flow` module (it needs `einops` and its own `misc` package)."""
    path = _transformer_flow_file(checkout, "--ml-starflow", "apple/ml-starflow")
    with _importable_from(path.parent):
        return _load_module("ml_starflow_transformer_flow", path)


def build_apple_tarflow(module: ModuleType, model: TarFlowModel) -> torch.nn.Module:
    """ml-tarflow's `Model` with `model`'s architecture and weights, on its device, in eval mode."""
    config = model.config
    apple = module.Model(
        **shared_model_arguments(config, config.num_channels, config.image_size),
        layers_per_block=config.layers_per_block,
        nvp=config.nvp,
        num_classes=config.num_classes,
    )
    apple.load_state_dict(convert.hf_to_apple_state_dict(model.state_dict()))
    return apple.to(model.device).eval()


def build_apple_starflow(module: ModuleType, model: StarFlowModel) -> torch.nn.Module:
    """ml-starflow's `Model` with `model`'s architecture (Apple's text-to-image settings: RoPE, a start token,
    guidance in the deep block only, softplus scales, the final norm, left-to-right order) and weights."""
    config = model.config
    apple = module.Model(
        **shared_model_arguments(config, config.in_channels, config.sample_size),
        layers_per_block=list(config.layers_per_block),
        head_dim=config.head_dim,
        rope=1,
        sos=1,
        txt_size=config.max_text_length,
        txt_dim=config.text_hidden_size,
        cond_top_only=1,
        use_softplus=1,
        use_final_norm=1,
        soft_clip=config.soft_clip,
        seq_order="L2R",
        top_block_channels=config.deep_hidden_size,
    )
    state = convert_starflow.hf_to_apple_state_dict(model.state_dict(), config)
    missing, unexpected = apple.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights did not transfer: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return apple.eval()
