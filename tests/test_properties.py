"""Flow properties over many tiny random architectures (Hypothesis, derandomized: the same examples every run).

TarFlow's replace test_modeling.py's `test_inverse_undoes_forward_and_back` and
`test_logdet_equals_brute_force_jacobian` (8 and 6 random examples, unseeded); STARFlow's cover random stacks of
shallow blocks and a deep one, with and without text, on square and non-square grids. Expected values are
independent of the model's own bookkeeping: the inverse is checked by composing with the forward pass, the
log-determinant against torch.linalg.slogdet of the full Jacobian (autograd, float64).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tarflow_hf import StarFlowConfig, StarFlowModel, TarFlowConfig, TarFlowModel

configs = st.fixed_dictionaries(
    {
        "num_channels": st.sampled_from([1, 2]),
        "patch_size": st.sampled_from([1, 2]),
        "image_size": st.sampled_from([2, 4]),
        "num_blocks": st.integers(1, 3),
        "layers_per_block": st.integers(1, 2),
        "nvp": st.booleans(),
        "num_classes": st.sampled_from([0, 3]),
    }
)
PROPERTY_SETTINGS = settings(
    derandomize=True, max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def random_model(overrides: dict, seed: int) -> TarFlowModel:
    """Width 16, one 16-wide head; output projections get small random weights (Apple starts them at zero, which
    would make every block nearly the identity)."""
    torch.manual_seed(seed)
    config = TarFlowConfig(hidden_size=16, head_dim=16, noise_std=0.1, **overrides)
    model = TarFlowModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj_out.weight" in name:
                param.normal_(0.0, 0.05)
    return model


@PROPERTY_SETTINGS
@given(overrides=configs, seed=st.integers(0, 10_000), guidance_scale=st.sampled_from([1.0, 1.0, 0.5, 2.0]))
def test_inverse_undoes_forward_and_back(overrides, seed, guidance_scale):
    model = random_model(overrides, seed)
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes, (3,), generator=generator) if cfg.num_classes else None
    images = torch.rand(3, cfg.num_channels, cfg.image_size, cfg.image_size, generator=generator) * 2 - 1
    latents = model(images, labels).latents
    torch.testing.assert_close(model.inverse(latents, labels), images, atol=1e-4, rtol=0)
    noise = torch.randn(3, cfg.num_patches, cfg.patch_dim, generator=generator)
    torch.testing.assert_close(model(model.inverse(noise, labels), labels).latents, noise, atol=1e-4, rtol=0)
    if guidance_scale != 1.0 and cfg.num_classes:
        # Guided sampling is the exact inverse of no flow in particular, but the parallel samplers must agree with it.
        sequential = model.inverse(noise, labels, guidance_scale=guidance_scale)
        jacobi = model.inverse(noise, labels, guidance_scale=guidance_scale, sampler="jacobi:tolerance=1e-7")
        torch.testing.assert_close(jacobi, sequential, atol=1e-4, rtol=0)


@PROPERTY_SETTINGS
@given(overrides=configs, seed=st.integers(0, 10_000))
def test_logdet_equals_brute_force_jacobian(overrides, seed):
    model = random_model(overrides, seed).double()
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, cfg.num_channels, cfg.image_size, cfg.image_size, generator=generator, dtype=torch.float64)
    image = image * 2 - 1
    label = torch.tensor([1]) if cfg.num_classes else None
    jacobian = torch.autograd.functional.jacobian(lambda x: model(x, label).latents.flatten(), image)
    _, brute_force = torch.linalg.slogdet(jacobian.reshape(image.numel(), image.numel()))
    torch.testing.assert_close(model(image, label).logdet[0], brute_force, atol=1e-8, rtol=1e-8)


# ----------------------------------------------------------------------------------------------------- STARFlow
starflow_configs = st.fixed_dictionaries(
    {
        "in_channels": st.sampled_from([1, 2]),
        "patch_size": st.sampled_from([1, 2]),
        "layers_per_block": st.lists(st.integers(1, 2), min_size=1, max_size=3),
        "deep_hidden_size": st.sampled_from([32, 64]),
        "text": st.booleans(),
    }
)


def random_starflow(overrides: dict, seed: int) -> StarFlowModel:
    """Width 32 (one 32-wide head: the smallest STARFlow's 3-axis RoPE takes with text), a 2x2-patch grid; output
    projections and final norms get small random weights (Apple starts them at zero: every block the identity)."""
    overrides = dict(overrides)
    text = overrides.pop("text")
    torch.manual_seed(seed)
    config = StarFlowConfig(
        sample_size=2 * overrides["patch_size"],
        hidden_size=32,
        head_dim=32,
        text_hidden_size=4 if text else 0,
        max_text_length=2 if text else 0,
        noise_std=0.1,
        **overrides,
    )
    model = StarFlowModel(config).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.1)
            block.final_norm.weight.normal_(0.0, 0.1)
    return model


def starflow_inputs(model: StarFlowModel, seed: int, batch: int, grid: tuple[int, int], dtype=torch.float32):
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, grid[0] * cfg.patch_size, grid[1] * cfg.patch_size)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    text = torch.randn(batch, 2, 4, generator=generator, dtype=dtype) if cfg.has_text else None
    return x, text


@PROPERTY_SETTINGS
@given(overrides=starflow_configs, seed=st.integers(0, 10_000), grid=st.sampled_from([(2, 2), (1, 3), (3, 2)]))
def test_starflow_inverse_undoes_forward_and_back(overrides, seed, grid):
    model = random_starflow(overrides, seed)
    x, text = starflow_inputs(model, seed, 2, grid)
    torch.testing.assert_close(model.inverse(model(x, text).latents, text), x, atol=1e-4, rtol=0)
    noise, _ = starflow_inputs(model, seed + 1, 2, grid)
    torch.testing.assert_close(model(model.inverse(noise, text), text).latents, noise, atol=1e-4, rtol=0)
    if text is not None:
        # Guided sampling inverts no flow in particular, but every sampler must reach the sequential result.
        negative = torch.zeros_like(text)
        sequential = model.inverse(noise, text, negative, guidance_scale=2.5)
        for sampler in ("jacobi:tolerance=1e-7", "newton:tolerance=1e-7"):
            parallel = model.inverse(noise, text, negative, guidance_scale=2.5, sampler=sampler)
            torch.testing.assert_close(parallel, sequential, atol=1e-4, rtol=0, msg=sampler)


@PROPERTY_SETTINGS
@given(overrides=starflow_configs, seed=st.integers(0, 10_000), grid=st.sampled_from([(2, 2), (1, 3)]))
def test_starflow_logdet_equals_brute_force_jacobian(overrides, seed, grid):
    model = random_starflow(overrides, seed).double()
    x, text = starflow_inputs(model, seed, 1, grid, torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: model(v, text).latents.flatten(), x)
    _, brute_force = torch.linalg.slogdet(jacobian.reshape(x.numel(), x.numel()))
    torch.testing.assert_close(model(x, text).logdet[0], brute_force, atol=1e-8, rtol=1e-8)
