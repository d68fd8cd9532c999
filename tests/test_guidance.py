"""Guidance (`tarflow_hf.guidance`): the rules checked by hand, their options, and guidance below 1 (Apple's g < 0)
against Apple's formula.

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

from tarflow_hf import JacobiSampler, TarFlowPipeline
from tarflow_hf.guidance import Guidance, GuidanceRule, gaussian_product

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
    ours = model.inverse(noise, labels, guidance_scale, GuidanceRule(target=target, schedule=schedule))
    torch.testing.assert_close(ours, apple, atol=TOLERANCE, rtol=0)
    assert (ours - expected["sample_0"]).abs().max() > 1e-3  # sample_0 is Apple's unguided sample


def test_guidance_below_one_reaches_the_sampler_through_the_pipeline():
    ref, _, expected = AppleTarFlow.from_fixture("tiny_cond")
    _, model, _ = load_reference("tiny_cond")
    noise, labels = expected["noise"], expected["y_sample"]
    with torch.no_grad():
        apple = ref.reverse(noise, labels, guidance=-0.5, skip_negative_guidance=False)
    pipe = TarFlowPipeline(transformer=model)
    for sampler in ("sequential", JacobiSampler(tolerance=1e-7)):
        images = pipe(
            class_labels=labels.tolist(),
            latents=noise,
            guidance_scale=0.5,
            sampler=sampler,
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
    ours = model.inverse(noise, None, guidance_scale=0.5, guidance_rule="extrapolate:unconditional_temperature=0.6")
    torch.testing.assert_close(ours, apple, atol=TOLERANCE, rtol=0)
    assert (ours - expected["sample_0"]).abs().max() > 1e-3


def test_gaussian_product_rule_is_the_product_of_the_two_gaussians():
    """p_c^(1+w) / p_u^w of N(b_c, s_c^2) and N(b_u, s_u^2), by completing the square by hand, where the
    conditional is the narrower one (no clipping needed)."""
    w = 1.7
    a_c, b_c, a_u, b_u = torch.tensor([-0.4]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([-1.1])
    precision = (1 + w) / a_c.exp() ** 2 - w / a_u.exp() ** 2
    mean = ((1 + w) * b_c / a_c.exp() ** 2 - w * b_u / a_u.exp() ** 2) / precision
    log_scale, shift = gaussian_product((a_c, b_c), (a_u, b_u), w)
    torch.testing.assert_close(log_scale, -0.5 * precision.log(), atol=1e-6, rtol=0)
    torch.testing.assert_close(shift, mean, atol=1e-6, rtol=0)
    # A wider conditional is clipped to the unconditional's width: the ratio is 1 and the result is the
    # conditional, its mean pushed away from the unconditional one.
    log_scale, shift = gaussian_product((a_u, b_c), (a_c, b_u), w)
    torch.testing.assert_close(log_scale, a_u)
    torch.testing.assert_close(shift, (1 + w) * b_c - w * b_u)


def test_rules_parse_from_names_and_the_command_lines_form():
    assert GuidanceRule.parse(None) == GuidanceRule("extrapolate")
    assert GuidanceRule.parse(None, "gaussian_product") == GuidanceRule("gaussian_product")
    rule = GuidanceRule.parse("extrapolate:target=scale, schedule=linear,unconditional_temperature=0.5")
    assert rule == GuidanceRule("extrapolate", "scale", "linear", 0.5)
    assert GuidanceRule.parse(rule.to_spec()) == rule and GuidanceRule.parse(rule) is rule
    assert GuidanceRule("gaussian_product").to_spec() == "gaussian_product"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Guidance(scale=float("nan")), "guidance_scale must be a finite number"),
        (lambda: Guidance(scale="2"), "guidance_scale must be a finite number, got '2'"),
        (lambda: GuidanceRule("gaussian_product", target="shift"), "target applies to the 'extrapolate' rule only"),
        (lambda: Guidance(0.5, GuidanceRule("gaussian_product")), "needs guidance_scale >= 1"),
        (lambda: GuidanceRule("average"), r"guidance_rule must be one of \('extrapolate', 'gaussian_product'\)"),
        (lambda: GuidanceRule(target="ab"), r"target must be one of \('both', 'scale', 'shift'\), got 'ab'"),
        (lambda: GuidanceRule(schedule="cosine"), r"schedule must be one of \('constant', 'linear'\), got 'cosine'"),
        (lambda: GuidanceRule(unconditional_temperature=0), "unconditional_temperature must be a finite number > 0"),
        (lambda: GuidanceRule.parse("extrapolate:targte=scale"), "guidance rule option 'targte=scale'"),
        (lambda: GuidanceRule.parse(3), "guidance_rule must be a rule name or a GuidanceRule, got int"),
    ],
)
def test_bad_guidance_settings_are_one_clear_line(make, message):
    with pytest.raises(ValueError, match=message):
        make()
