"""Shared test helpers: tiny random models and Apple's reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.convert import load_ml_tarflow_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_CASES = ("tiny_cond", "tiny_uncond")


def tiny_config(**overrides) -> TarFlowConfig:
    settings = dict(
        image_size=8,
        num_channels=1,
        patch_size=2,
        hidden_size=32,
        head_dim=16,
        num_blocks=2,
        layers_per_block=1,
        num_classes=3,
        noise_std=0.1,
    )
    settings.update(overrides)
    return TarFlowConfig(**settings)


def random_model(config: TarFlowConfig | None = None, seed: int = 0, **overrides) -> TarFlowModel:
    """A model whose every path matters: Apple zero-initialises the output projections, which would make the
    flow nearly the identity, so they get small random weights here (as in the reference fixtures)."""
    torch.manual_seed(seed)
    model = TarFlowModel(config or tiny_config(**overrides)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    return model


def reference_config(name: str) -> TarFlowConfig:
    apple = json.loads((FIXTURES / f"{name}.json").read_text())["config"]
    return TarFlowConfig(
        image_size=apple["img_size"],
        num_channels=apple["in_channels"],
        patch_size=apple["patch_size"],
        hidden_size=apple["channels"],
        num_blocks=apple["num_blocks"],
        layers_per_block=apple["layers_per_block"],
        nvp=apple["nvp"],
        num_classes=apple["num_classes"],
        noise_std=0.1,
    )


def load_reference(name: str) -> tuple[dict, TarFlowModel, dict[str, torch.Tensor]]:
    """(the case's json, the model with its weights, Apple's expected outputs)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    model = load_ml_tarflow_checkpoint(str(FIXTURES / f"{name}.pth"), reference_config(name))
    expected = torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)
    return meta, model, expected


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny models: starting threads costs more than it saves, and far more on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=REFERENCE_CASES)
def reference(request):
    return load_reference(request.param)
