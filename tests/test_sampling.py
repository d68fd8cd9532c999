"""The samplers against a straightforward reference: the sequential inverse written the obvious way
(the whole prefix through the transformer at every step, no cache, branches run separately)."""

import pytest
import torch
from conftest import random_model

from tarflow_hf import TarFlowModel
from tarflow_hf.modeling_tarflow import TarFlowBlock


def naive_block_inverse(
    block: TarFlowBlock, z: torch.Tensor, labels, guidance_scale, target, schedule, temperature
) -> torch.Tensor:
    """z in the block's order. At step t, run the transformer over patches 0..t for each branch and read row t."""
    x = z.clone()
    num_patches = z.shape[1]
    positions = block.permute(block.position_embedding.unsqueeze(0))
    g = guidance_scale - 1.0

    def branch(branch_labels, temp):
        hidden = block.proj_in(x[:, : t + 1]) + positions[:, : t + 1]
        condition = block.class_condition(branch_labels, x.shape[0])
        if condition is not None:
            hidden = hidden + condition
        scale = None if temp == 1.0 else torch.full((x.shape[0], 1, 1, 1), 1.0 / temp)
        for layer in block.layers:
            hidden = layer(hidden, query_scale=scale)
        return block.scale_shift(block.proj_out(hidden[:, t : t + 1]))

    for t in range(num_patches - 1):
        a, b = branch(labels, 1.0)
        if guidance_scale != 1.0:
            a_u, b_u = branch(None, temperature)
            w = g * (t + 1) / (num_patches - 1) if schedule == "linear" else g
            if target in ("both", "scale"):
                a = a + w * (a - a_u)
            if target in ("both", "shift"):
                b = b + w * (b - b_u)
        x[:, t + 1 : t + 2] = x[:, t + 1 : t + 2] * a.exp() + b
    return x


def naive_inverse(
    model: TarFlowModel, latents, labels=None, guidance_scale=1.0, target="both", schedule="constant", temperature=1.0
):
    x = latents * model.prior_variance.sqrt()
    for block in reversed(model.blocks):
        z = block.permute(x)
        x = block.permute(naive_block_inverse(block, z, labels, guidance_scale, target, schedule, temperature))
    return model.unpatchify(x)


@pytest.mark.parametrize("target", ["both", "scale", "shift"])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequential_sampler_equals_the_straightforward_algorithm(target, schedule, temperature):
    model = random_model(num_blocks=2, layers_per_block=2)
    noise, labels = torch.randn(3, 16, 4), torch.tensor([0, 2, -1])
    with torch.no_grad():
        expected = naive_inverse(model, noise, labels, 2.5, target, schedule, temperature)
    ours = model.inverse(
        noise,
        labels,
        guidance_scale=2.5,
        guidance_target=target,
        guidance_schedule=schedule,
        attention_temperature=temperature,
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    jacobi = model.inverse(
        noise,
        labels,
        guidance_scale=2.5,
        guidance_target=target,
        guidance_schedule=schedule,
        attention_temperature=temperature,
        sampler="jacobi",
        jacobi_tolerance=1e-7,
        jacobi_max_iterations=15,
    )
    torch.testing.assert_close(jacobi, expected, atol=1e-5, rtol=0)


def test_unguided_and_unconditional_match_the_straightforward_algorithm():
    model = random_model(num_classes=0, nvp=False)
    noise = torch.randn(2, 16, 4)
    with torch.no_grad():
        expected = naive_inverse(model, noise)
    torch.testing.assert_close(model.inverse(noise), expected, atol=1e-5, rtol=0)


def test_jacobi_reports_what_it_did():
    model = random_model(num_blocks=3)
    noise = torch.randn(2, 16, 4) * 0.5
    exact = model.inverse(noise, [0, 1], guidance_scale=2.0)
    images, stats = model.inverse(
        noise,
        [0, 1],
        guidance_scale=2.0,
        sampler="jacobi",
        jacobi_tolerance=1e-6,
        jacobi_max_iterations=15,
        return_stats=True,
    )
    torch.testing.assert_close(images, exact, atol=1e-4, rtol=0)
    assert len(stats.iterations) == len(stats.sequential_steps) == len(stats.residuals) == 3
    assert all(1 <= n <= 15 for n in stats.iterations)
    assert stats.transformer_passes == sum(stats.iterations) + sum(stats.sequential_steps)
    assert stats.transformer_passes < 3 * 15, "a random tiny flow should converge faster than sequentially"

    _, forced = model.inverse(noise, [0, 1], sampler="jacobi", jacobi_sequential_blocks=2, return_stats=True)
    assert forced.iterations[:2] == [0, 0] and forced.sequential_steps[:2] == [15, 15]
    assert forced.sequential_blocks[:2] == [True, True]


def test_jacobi_falls_back_to_an_exact_sequential_finish():
    model = random_model(num_blocks=2)
    noise = torch.randn(2, 16, 4)
    exact = model.inverse(noise, [0, 1], guidance_scale=3.0)
    images, stats = model.inverse(
        noise,
        [0, 1],
        guidance_scale=3.0,
        sampler="jacobi",
        jacobi_max_iterations=2,
        jacobi_tolerance=1e-9,
        return_stats=True,
    )
    # Two iterations cannot reach 1e-9, so both blocks finish sequentially from an exact prefix of >= 3 patches.
    assert stats.iterations == [2, 2]
    assert all(0 < steps <= 15 - 2 for steps in stats.sequential_steps)
    assert stats.sequential_blocks == [True, True]
    torch.testing.assert_close(images, exact, atol=1e-5, rtol=0)


def test_cache_prefill_continues_exactly():
    model = random_model(layers_per_block=2)
    block = model.blocks[1]
    z = torch.randn(2, 16, 4)
    conditions, query_scale = model._branch_conditions(block, torch.tensor([1, 2]), 2, None)
    with torch.no_grad():
        full = model._invert_block_sequential(block, z, conditions, query_scale, None)
        mixed = torch.cat([full[:, :6], z[:, 6:]], dim=1)
        resumed = model._invert_block_sequential(block, mixed, conditions, query_scale, None, start=5)
    torch.testing.assert_close(resumed, full, atol=1e-6, rtol=0)
