"""Classifier-free guidance below 1 (Apple's g < 0), checked by hand against Apple's formula.

README: "Guidance applies whenever guidance_scale != 1 (Apple skips guidance for negative g)". The reference is
`ml_tarflow_reference.AppleTarFlow` (Apple's sampling loop, pinned to Apple's fixtures in test_bf16_reference.py)
with Apple's `if guidance > 0` skip turned off, so it computes cond + g * (cond - uncond) for g = w - 1 < 0.
Every case also checks that guidance changed the sample (by far more than the tolerance), so skipping guidance for
w < 1 fails here.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_reference
from ml_tarflow_reference import AppleTarFlow

from tarflow_hf import TarFlowPipeline

TOLERANCE = 1e-5  # float32; the implementations agree to 6e-7
TARGETS = {"both": "ab", "scale": "a", "shift": "b"}


@pytest.mark.parametrize(
    ("guidance_scale", "target", "schedule"),
    [(0.5, "both", "constant"), (0.5, "scale", "linear"), (0.0, "shift", "constant"), (-1.0, "both", "linear")],
)
def test_guidance_below_one_follows_apples_formula(guidance_scale, target, schedule):
    ref, _, expected = AppleTarFlow.from_fixture("tiny_cond")
    _, model, _ = load_reference("tiny_cond")
    noise, labels = expected["noise"], expected["y_sample"]
    with torch.no_grad():
        apple = ref.reverse(
            noise,
            labels,
            guidance=guidance_scale - 1.0,
            guide_what=TARGETS[target],
            annealed_guidance=schedule == "linear",
            skip_negative_guidance=False,
        )
    ours = model.inverse(
        noise, labels, guidance_scale=guidance_scale, guidance_target=target, guidance_schedule=schedule
    )
    torch.testing.assert_close(ours, apple, atol=TOLERANCE, rtol=0)
    assert (ours - expected["sample_0"]).abs().max() > 1e-3  # sample_0 is Apple's unguided sample


def test_guidance_below_one_reaches_the_sampler_through_the_pipeline():
    ref, _, expected = AppleTarFlow.from_fixture("tiny_cond")
    _, model, _ = load_reference("tiny_cond")
    noise, labels = expected["noise"], expected["y_sample"]
    with torch.no_grad():
        apple = ref.reverse(noise, labels, guidance=-0.5, skip_negative_guidance=False)
    pipe = TarFlowPipeline(transformer=model)
    for sampler in ("sequential", "jacobi"):
        images = pipe(
            class_labels=labels.tolist(),
            latents=noise,
            guidance_scale=0.5,
            sampler=sampler,
            jacobi_tolerance=1e-7,
            denoise=False,
            output_type="pt",
        ).images
        # Pipeline output: model space x -> x / 2 + 0.5, clipped to [0, 1].
        torch.testing.assert_close(
            images,
            (apple / 2 + 0.5).clamp(0, 1),
            atol=TOLERANCE,
            rtol=0,
            msg=lambda m, sampler=sampler: f"{sampler}: {m}",
        )
    unguided = (expected["sample_0"] / 2 + 0.5).clamp(0, 1)
    assert (images - unguided).abs().max() > 1e-3


def test_guidance_scale_zero_is_the_unconditional_model():
    """By hand: w = 0 gives cond + (0 - 1) * (cond - uncond) = uncond at every step, i.e. the mean-class model."""
    _, model, expected = load_reference("tiny_cond")
    noise, labels = expected["noise"], expected["y_sample"]
    guided = model.inverse(noise, labels, guidance_scale=0.0)
    unconditional = model.inverse(noise, None)
    torch.testing.assert_close(guided, unconditional, atol=1e-4, rtol=0)
    assert (unconditional - model.inverse(noise, labels)).abs().max() > 1e-3


def test_guidance_below_one_on_an_unconditional_model_uses_the_temperature_branch():
    """Unconditional models guide against themselves at another attention temperature (Apple's attn_temp)."""
    ref, _, expected = AppleTarFlow.from_fixture("tiny_uncond")
    _, model, _ = load_reference("tiny_uncond")
    noise = expected["noise"]
    with torch.no_grad():
        apple = ref.reverse(noise, None, guidance=-0.5, attn_temp=0.6, skip_negative_guidance=False)
    ours = model.inverse(noise, None, guidance_scale=0.5, attention_temperature=0.6)
    torch.testing.assert_close(ours, apple, atol=TOLERANCE, rtol=0)
    assert (ours - expected["sample_0"]).abs().max() > 1e-3
