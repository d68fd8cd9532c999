"""bfloat16 autocast against apple/ml-tarflow's semantics.

Apple's fixtures (tests/fixtures/) hold float32 outputs only, so the bfloat16 reference is
`ml_tarflow_reference.AppleTarFlow`: an independent re-implementation of Apple's `transformer_flow.Model` in Apple's
operation order and dtypes. The first test pins it to Apple's float32 fixtures; the others run it and
`TarFlowModel` side by side under `torch.autocast("cpu", torch.bfloat16)` on the fixtures' weights.

Measured on this project's CPU (torch 2.13, 2 cores) -- the numbers behind every tolerance below:

| quantity (max abs deviation)                      | tiny_cond | tiny_uncond | tolerance |
|---------------------------------------------------|-----------|-------------|-----------|
| log-det vs exact sum of the bf16 log-scales       | 4.8e-7    | 0.0         | 1e-4      |
|   ... with the fp32 upcasts removed (mutation)    | 4.4e-2    | 6.2e-3      |           |
| log-likelihood (nats) vs the formula              | 2.4e-5    | 3.6e-6      | 1e-3      |
|   ... with the fp32 upcasts removed (mutation)    | 4.4e-2    | 6.3e-3      |           |
| bits/dim vs the formula                           | 8.1e-7    | 4.4e-7      | 1e-5      |
|   ... with the fp32 upcasts removed (mutation)    | 8.3e-5    | 1.4e-4      |           |
| latents z (same patch memory layout)              | 0.0       | 0.0         | 1e-6      |
| samples, guidance 0 / 1.5 / annealed 2 / -0.5     | <= 1.2e-7 | <= 6e-8     | 1e-5      |
|   (bf16 sample vs Apple's float32 fixture)        | 3e-3..1e-2| 3.3e-3      | (> 1e-3)  |
| sample with attention temperature 0.7             | (below)   |             | 1e-5      |

Where the upcasts matter on a CPU: with float32 weights under autocast the residual stream is float32 anyway
(`proj_in(x) + pos_embed` promotes), and bfloat16 `exp` is computed in float32 and rounded, so LayerNorm and exp
give the same bits with or without the upcast. What changes is the log-determinant: summed in bfloat16 it is rounded
to 8 significant bits (4.4e-2 nats on a log-det of 24), and so are the log-likelihood and bits/dim. Apple itself
returns `-xa.mean()` in bfloat16 (rounded); tarflow-hf returns the exact sum on purpose (README: "logdet is the
true log-determinant"), so the test below holds it to the exact sum and to Apple's value within Apple's rounding.

Apple's own `unfold` patches are a strided view; a bfloat16 matmul on them takes a different oneDNN path than on
contiguous patches and rounds differently (z differs by 9.6e-3 / 4.6e-3, about one bfloat16 ulp of the shift --
as much as float32 differs from bfloat16 here, so that comparison could prove nothing). The likelihood tests hand
the reference contiguous patches, the same layout `TarFlowModel.patchify` produces; the values are identical.

The attention temperature used to differ by 1.4e-2 at temperature 0.7 (the queries were multiplied by 1/T in
bfloat16); it now goes into the kernel's `scale`, as in Apple's code, and the sample agrees like the others.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_reference
from ml_tarflow_reference import FIXTURES, AppleTarFlow

from tarflow_hf.guidance import tarflow_guidance_from_apple

CASES = ("tiny_cond", "tiny_uncond")
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits


def autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def our_options(kwargs: dict) -> dict:
    """Apple's `Model.reverse` keyword arguments in tarflow-hf's names (Apple's guidance g is w = 1 + g)."""
    return tarflow_guidance_from_apple(kwargs)


@pytest.mark.parametrize("name", CASES)
def test_reference_reimplementation_reproduces_apples_fixtures(name):
    """The re-implementation is Apple's code as far as the fixtures can tell (float32, 1e-5)."""
    ref, meta, expected = AppleTarFlow.from_fixture(name)
    with torch.no_grad():
        z, logdets, _ = ref.forward(expected["x"], expected.get("y"))
        torch.testing.assert_close(z, expected["z"], atol=1e-5, rtol=0)
        torch.testing.assert_close(logdets, expected["logdets"], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            (0.5 * z.pow(2).mean() - logdets.mean()).reshape(1), expected["loss"], atol=1e-5, rtol=0
        )
        for i, kwargs in enumerate(meta["sample_kwargs"]):
            sample = ref.reverse(expected["noise"], expected.get("y_sample"), **kwargs)
            torch.testing.assert_close(
                sample, expected[f"sample_{i}"], atol=1e-5, rtol=0, msg=lambda m, i=i: f"sample_{i}: {m}"
            )
    # Apple's denoised_0 = x + sigma^2 * grad log p(x): the reference's likelihood has the right gradient too.
    x = expected["sample_0"].clone().requires_grad_(True)
    (score,) = torch.autograd.grad(ref.log_likelihood(x, expected.get("y_sample")).sum(), x)
    sigma = meta["denoise"]["noise_std"]
    torch.testing.assert_close(x.detach() + sigma**2 * score, expected["denoised_0"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_likelihood_is_exact_given_the_bf16_network(name):
    ref, _, expected = AppleTarFlow.from_fixture(name)
    _, model, _ = load_reference(name)
    apple_patchify = ref.patchify
    ref.patchify = lambda images: apple_patchify(images).contiguous()  # same GEMM path as ours (module docstring)
    images, labels = expected["x"], expected.get("y")
    with torch.no_grad(), autocast_bf16():
        z, apple_logdets, log_scales = ref.forward(images, labels)
        out = model(images, labels)
    dims = z.shape[1] * z.shape[2]
    assert log_scales[0].dtype == torch.bfloat16  # autocast was on: the network ran in bfloat16
    torch.testing.assert_close(out.latents, z, atol=1e-6, rtol=0)

    # The true log|det| is minus the sum of the log-scales; summed exactly (float64) from the bf16 values.
    exact_logdet = sum(-a.double().sum(dim=(1, 2)) for a in log_scales)
    torch.testing.assert_close(out.logdet.double(), exact_logdet, atol=1e-4, rtol=0)
    # Apple's per-block means are rounded to bfloat16; ours agrees with them within that rounding.
    apple_rounding = sum(BF16_UNIT_ROUNDOFF * a.double().mean(dim=(1, 2)).abs() for a in log_scales) * dims
    assert ((out.logdet.double() - apple_logdets.double() * dims).abs() <= apple_rounding + 1e-5).all()

    # log p(x) and bits/dim from the change-of-variables formula, by hand.
    log_likelihood = -0.5 * z.double().pow(2).flatten(1).sum(1) - 0.5 * dims * math.log(2 * math.pi) + exact_logdet
    bits_per_dim = (-log_likelihood / dims + math.log(128)) / math.log(2)
    torch.testing.assert_close(out.log_likelihood.double(), log_likelihood, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.bits_per_dim.double(), bits_per_dim, atol=1e-5, rtol=0)


def sample_cases():
    cases = []
    for name in CASES:
        meta = json.loads((FIXTURES / f"{name}.json").read_text())
        for kwargs in meta["sample_kwargs"]:
            cases.append(pytest.param(name, kwargs, id=f"{name}-{kwargs}"))
        if meta["config"]["num_classes"]:
            # Guidance below 1 (Apple's g < 0): tarflow-hf guides there too, with the same formula.
            cases.append(pytest.param(name, {"guidance": -0.5}, id=f"{name}-guidance-0.5"))
    return cases


@pytest.mark.parametrize(("name", "kwargs"), sample_cases())
def test_bf16_autocast_samples_match_apple(name, kwargs):
    ref, _, expected = AppleTarFlow.from_fixture(name)
    _, model, _ = load_reference(name)
    noise, labels = expected["noise"], expected.get("y_sample")
    with torch.no_grad(), autocast_bf16():
        apple = ref.reverse(noise, labels, skip_negative_guidance=False, **kwargs)
        ours = model.inverse(noise, labels, **our_options(kwargs))
    with torch.no_grad():
        float32 = ref.reverse(noise, labels, skip_negative_guidance=False, **kwargs)
    # The comparison is about bfloat16: the bf16 sample is visibly not the float32 one.
    assert (apple - float32).abs().max() > 1e-3
    torch.testing.assert_close(ours, apple, atol=1e-5, rtol=0)
