"""The samplers against a straightforward reference: the sequential inverse written the obvious way
(the whole prefix through the transformer at every step, no cache, branches run separately)."""

import pytest
import torch
from conftest import random_model
from transformers.testing_utils import CaptureLogger

from tarflow_hf import BUNDLED_MODEL, TarFlowModel, sampling
from tarflow_hf.layers import KVCache
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
        for layer in block.layers:
            hidden, _ = layer(hidden, temperatures=(temp,))
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
    for sampler in ("sequential", "jacobi", "newton"):
        ours = model.inverse(
            noise,
            labels,
            guidance_scale=2.5,
            guidance_target=target,
            guidance_schedule=schedule,
            attention_temperature=temperature,
            sampler=sampler,
            jacobi_tolerance=1e-7,
        )
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=sampler)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
@pytest.mark.parametrize("sampler", ["sequential", "jacobi", "newton"])
def test_unconditional_models_match_the_straightforward_algorithm(sampler, guidance_scale):
    model = random_model(num_classes=0, nvp=False)
    noise = torch.randn(2, 16, 4)
    with torch.no_grad():
        expected = naive_inverse(model, noise, guidance_scale=guidance_scale, temperature=0.8)
    ours = model.inverse(
        noise, guidance_scale=guidance_scale, attention_temperature=0.8, sampler=sampler, jacobi_tolerance=1e-7
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_jacobi_reports_what_it_did():
    model = random_model(num_blocks=3)
    noise = torch.randn(2, 16, 4) * 0.5
    exact = model.inverse(noise, [0, 1], guidance_scale=2.0)
    images, stats = model.inverse(
        noise, [0, 1], guidance_scale=2.0, sampler="jacobi", jacobi_tolerance=1e-6, return_stats=True
    )
    torch.testing.assert_close(images, exact, atol=1e-4, rtol=0)
    assert len(stats.iterations) == len(stats.sequential_steps) == len(stats.residuals) == len(stats.rows_computed)
    assert all(1 <= n <= 15 for n in stats.iterations)
    assert stats.sequential_steps == [0, 0, 0] and stats.sequential_blocks == [False] * 3
    assert all(0.0 <= r <= 1e-6 for r in stats.residuals)
    # Each pass computes the unsettled rows only: at least T - 1 rows per block, at most T - 1 per pass.
    assert all(15 <= rows <= 15 * n for rows, n in zip(stats.rows_computed, stats.iterations, strict=True))
    assert stats.transformer_passes == sum(stats.iterations)
    assert stats.transformer_passes < 3 * 15, "a random tiny flow should converge faster than sequentially"

    _, forced = model.inverse(noise, [0, 1], sampler="jacobi", jacobi_sequential_blocks=2, return_stats=True)
    assert forced.iterations[:2] == [0, 0] and forced.sequential_steps[:2] == [15, 15]
    assert forced.rows_computed[:2] == [15, 15]
    assert forced.sequential_blocks == [True, True, False]
    assert forced.transformer_passes == 30 + forced.iterations[2]


def strongly_coupled_model():
    """Larger output projections: each patch depends strongly on the ones before (as in a trained model's
    hardest block), so Jacobi settles about one patch per pass. Returns the model and latents it maps to finite
    images."""
    model = random_model(num_blocks=2, seed=1)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.1)
    return model, torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("sampler", "window"), [("jacobi", None), ("jacobi", 1), ("jacobi", 3), ("jacobi", 8),
                                                 ("newton", None)])  # fmt: skip
def test_parallel_samplers_never_need_more_passes_than_the_sequential_one(sampler, window):
    model, noise = strongly_coupled_model()
    exact = model.inverse(noise, [0, 1], guidance_scale=3.0)
    images, stats = model.inverse(
        noise, [0, 1], guidance_scale=3.0, sampler=sampler, jacobi_window=window, jacobi_tolerance=1e-9,
        return_stats=True,
    )  # fmt: skip
    torch.testing.assert_close(images, exact, atol=1e-5, rtol=0)
    assert all(n <= 15 for n in stats.iterations)
    if window == 1:  # one patch per pass is the sequential sampler
        assert stats.iterations == [15, 15] and stats.rows_computed == [15, 15]
    if window is not None:
        assert all(rows <= window * n for rows, n in zip(stats.rows_computed, stats.iterations, strict=True))


def test_jacobi_budget_finishes_one_patch_at_a_time():
    model, noise = strongly_coupled_model()
    exact = model.inverse(noise, [0, 1], guidance_scale=3.0)
    images, stats = model.inverse(
        noise, [0, 1], guidance_scale=3.0, sampler="jacobi", jacobi_max_iterations=2, jacobi_tolerance=1e-9,
        return_stats=True,
    )  # fmt: skip
    # Two passes settle at least two patches; the rest (at most 13) go one at a time, exactly.
    assert all(0 < steps <= 13 for steps in stats.sequential_steps)
    assert [n - steps for n, steps in zip(stats.iterations, stats.sequential_steps, strict=True)] == [2, 2]
    torch.testing.assert_close(images, exact, atol=1e-5, rtol=0)


def test_jacobi_shrinks_its_window_where_it_stagnates(monkeypatch):
    """The bundled model's first block settles one patch per pass for its first half: there the sampler drops
    to a probe window, computing far fewer rows for the same number of passes."""
    model = TarFlowModel.from_pretrained(BUNDLED_MODEL, subfolder="transformer").eval()
    noise = torch.randn(4, model.config.num_patches, model.config.patch_dim, generator=torch.Generator().manual_seed(0))

    def sample():
        return model.inverse(noise, [1, 4, 7, 9], guidance_scale=3.0, sampler="jacobi", return_stats=True)

    images, stats = sample()
    monkeypatch.setattr(sampling, "JACOBI_STAGNATION_PASSES", 10**6)  # never shrink
    wide_images, wide = sample()
    assert stats.iterations[0] <= wide.iterations[0] + 2
    assert stats.rows_computed[0] < 0.8 * wide.rows_computed[0]
    assert stats.iterations[1:] == wide.iterations[1:]  # the other blocks converge without stagnating
    torch.testing.assert_close(images, wide_images, atol=2e-3, rtol=0)


def test_a_window_after_cached_positions_attends_causally():
    """Rows s..e-1 run against a cache of rows 0..s-1 give the same hidden states as one causal pass."""
    model = random_model(layers_per_block=2)
    block = model.blocks[1]
    x = torch.randn(2, 16, 4)
    condition = block.sampling_condition(torch.tensor([1, 2]), 2, None)
    positions = block.position_table()
    with torch.no_grad():
        full = block.transformer(block.embed(x, positions, condition.class_rows))
        caches = [KVCache(16) for _ in block.layers]
        pieces = [
            block.transformer(block.embed(x[:, s:e], positions[:, s:e], condition.class_rows), caches, s)
            for s, e in [(0, 5), (5, 6), (6, 13), (13, 16)]
        ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_jacobi_warns_when_the_tolerance_is_below_half_precision(schedule):
    model = random_model()
    noise = torch.randn(2, 16, 4)
    tolerance = 1.2345e-4 if schedule == "constant" else 2.3456e-4  # warnings are given once per message
    options = dict(guidance_scale=2.0, guidance_schedule=schedule, sampler="jacobi", jacobi_tolerance=tolerance)
    with CaptureLogger(sampling.logger) as float32_log:
        model.inverse(noise, [0, 1], **options)
    with CaptureLogger(sampling.logger) as bfloat16_log, torch.autocast("cpu", dtype=torch.bfloat16):
        model.inverse(noise, [0, 1], **options)
    assert float32_log.out == ""
    assert f"jacobi_tolerance={tolerance:g} is below the resolution of torch.bfloat16" in bfloat16_log.out


def test_a_large_patch_settled_by_its_exact_row_is_kept():
    """A guess far outside the latents' range restarts from its latent, unless the pass settles it: computed from
    settled patches, it is right however large it is."""
    model = random_model(num_blocks=1, num_classes=0)
    dim = model.config.patch_dim
    with torch.no_grad():  # constant log-scale 3: x_t = e^3 * z_t, whatever came before
        model.blocks[0].proj_out.weight.zero_()
        model.blocks[0].proj_out.bias.zero_()
        model.blocks[0].proj_out.bias[:dim] = 3.0
    latents = torch.full((1, 16, dim), 0.1)
    latents[0, 9, 0] = 3.0  # x = 60: beyond ten times every latent and settled value
    exact = model.inverse(latents)
    for sampler in ("jacobi", "newton"):
        torch.testing.assert_close(model.inverse(latents, sampler=sampler), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["sequential", "jacobi"])
def test_unconditional_half_precision_model_samples_with_guidance(sampler):
    model = random_model(num_classes=0).to(torch.bfloat16)
    images = model.inverse(torch.randn(2, 16, 4), guidance_scale=2.0, sampler=sampler, jacobi_tolerance=3e-2)
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()


@pytest.mark.parametrize(("sampler", "window"), [("jacobi", None), ("jacobi", 4), ("newton", None)])
def test_parallel_samplers_report_a_real_overflow_like_the_sequential_one(sampler, window):
    model = random_model(num_blocks=2, seed=0)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.3)
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.inverse(noise, [0, 1], guidance_scale=3.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.inverse(noise, [0, 1], guidance_scale=3.0, sampler=sampler, jacobi_window=window)


def test_newton_takes_fewer_passes_than_jacobi_where_patches_depend_strongly():
    """The bundled model's first block: Jacobi settles one patch per pass for half of it; the quasi-Newton
    steps follow the dependence on the previous patch, at the price of 2 * patch_dim + 1 copies of the batch."""
    model = TarFlowModel.from_pretrained(BUNDLED_MODEL, subfolder="transformer").eval()
    config = model.config
    noise = torch.randn(4, config.num_patches, config.patch_dim, generator=torch.Generator().manual_seed(0))
    labels = [1, 4, 7, 9]
    exact = model.inverse(noise, labels, guidance_scale=3.0)
    _, jacobi = model.inverse(noise, labels, guidance_scale=3.0, sampler="jacobi", return_stats=True)
    images, newton = model.inverse(noise, labels, guidance_scale=3.0, sampler="newton", return_stats=True)
    assert newton.iterations[0] < 0.75 * jacobi.iterations[0]
    assert newton.transformer_passes < jacobi.transformer_passes
    copies = 2 * config.patch_dim + 1
    assert newton.rows_computed == [copies * (config.num_patches - 1) * n for n in newton.iterations]
    assert (images - exact).abs().max() / 2 < 1e-3  # the bound, on the [0, 1] scale


def test_newton_rejects_jacobi_only_options():
    with pytest.raises(ValueError, match="jacobi_window and jacobi_max_iterations apply to sampler='jacobi' only"):
        random_model().inverse(torch.randn(1, 16, 4), [0], sampler="newton", jacobi_window=4)


class ToyCondition:
    """No embeddings at all: the toy block depends on its tokens only."""

    guidance = None

    def repeat_interleave(self, copies: int) -> "ToyCondition":
        return self


class ToyBlock:
    """A minimal affine autoregressive block that is not TarFlow: a_t, b_t are fixed smooth functions of the
    running mean of the tokens before t (a "cache" is just the running sum)."""

    def __init__(self, dim: int):
        generator = torch.Generator().manual_seed(3)
        self.w_a = 0.3 * torch.randn(dim, dim, generator=generator)
        self.w_b = 0.5 * torch.randn(dim, dim, generator=generator)

    def new_cache(self, condition, batch_size, num_tokens):
        return {"tokens": torch.zeros(batch_size, num_tokens, self.w_a.shape[0])}

    def affine_span(self, tokens, position, cache, condition, weight):
        if cache is None:
            cache = self.new_cache(condition, tokens.shape[0], position + tokens.shape[1])
        cache["tokens"][:, position : position + tokens.shape[1]] = tokens
        seen = cache["tokens"][:, : position + tokens.shape[1]]
        counts = torch.arange(1, seen.shape[1] + 1, dtype=seen.dtype).view(1, -1, 1)
        mean = (seen.cumsum(dim=1) / counts)[:, position:]
        return torch.tanh(mean @ self.w_a), torch.sin(mean @ self.w_b)

    def forward(self, x):
        """z from x the direct way, to check the samplers' inverses."""
        counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        mean = x.cumsum(dim=1) / counts
        a, b = torch.tanh(mean @ self.w_a), torch.sin(mean @ self.w_b)
        z = x.clone()
        z[:, 1:] = (x[:, 1:] - b[:, :-1]) * torch.exp(-a[:, :-1])
        return z


@pytest.mark.parametrize("sampler", ["sequential", "jacobi", "newton", "block_jacobi"])
def test_samplers_invert_a_block_that_is_not_tarflow(sampler):
    block = ToyBlock(dim=3)
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0))
    z = block.forward(x)
    options = sampling.SamplerOptions(sampler, jacobi_tolerance=1e-7, jacobi_block_size=5, jacobi_threshold=1e-14)
    inverted, record = sampling.invert_block(block, z, ToyCondition(), options)
    torch.testing.assert_close(inverted, x, atol=1e-5, rtol=0)
    if sampler == "block_jacobi":
        assert len(record.chunk_iterations) == 3  # chunks of 5, 5 and 1 tokens after token 0
    else:  # never more sequential passes than the 11 of the exact sampler
        assert (record.sequential_steps if sampler == "sequential" else record.iterations) <= 11


@pytest.mark.parametrize("sampler", ["sequential", "jacobi"])
def test_samples_are_ordinary_tensors_that_autograd_can_use(sampler):
    """The samplers run in inference mode; what they return must not be an inference tensor, or the score
    denoising step (autograd on the sample) and any in-place edit by the caller would fail."""
    block = ToyBlock(dim=3)
    z = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(1))
    inverted, _ = sampling.invert_block(block, z, ToyCondition(), sampling.SamplerOptions(sampler))
    assert not inverted.is_inference()
    inverted[:, 0] = 0.0  # in place, outside inference mode
    weight = torch.ones(3, requires_grad=True)
    (inverted * weight).sum().backward()  # saves the sample for backward
    torch.testing.assert_close(weight.grad, inverted.sum(dim=(0, 1)))


def apple_block_jacobi(block, z, block_size, threshold, max_iterations):
    """Apple's block Jacobi as written: every pass recomputes the whole chunk."""
    x, iterations = z.clone(), []
    cache = block.new_cache(ToyCondition(), z.shape[0], z.shape[1])
    for start in range(0, z.shape[1] - 1, block_size):
        end = min(start + block_size, z.shape[1] - 1)
        for iteration in range(max_iterations):
            a, b = block.affine_span(x[:, start:end], start, cache, ToyCondition(), 0.0)
            new = z[:, start + 1 : end + 1] * a.exp() + b
            change = (new - x[:, start + 1 : end + 1]).pow(2).mean() / new.pow(2).mean()
            x[:, start + 1 : end + 1] = new
            if change < threshold or iteration == max_iterations - 1:
                break
        iterations.append(iteration + 1)
    return x, iterations


@pytest.mark.parametrize(("threshold", "max_iterations"), [(1e-3, 32), (1e-9, 32), (1e-9, 3)])
def test_block_jacobi_skips_final_rows_and_stays_apples_algorithm(threshold, max_iterations):
    """Pass i + 1 recomputes only the rows after the chunk's first i + 1 (final) tokens: the iterates, the
    iteration counts and the result are Apple's whole-chunk passes', with fewer rows computed."""
    block = ToyBlock(dim=3)
    z = torch.randn(2, 23, 3, generator=torch.Generator().manual_seed(1))
    ours, record = sampling.sample_block_jacobi(block, z, ToyCondition(), 8, threshold, max_iterations)
    apple, iterations = apple_block_jacobi(block, z, 8, threshold, max_iterations)
    assert record.chunk_iterations == iterations
    # The toy block computes in float32, whose matrix products round differently for fewer rows.
    torch.testing.assert_close(ours, apple, atol=1e-6, rtol=0)
    chunk_lengths = [8, 8, 6]
    whole_chunks = sum(n * length for n, length in zip(iterations, chunk_lengths, strict=True))
    # Pass i of a chunk skips its first min(i, length) rows.
    skipped = sum(min(i, length) for n, length in zip(iterations, chunk_lengths, strict=True) for i in range(n))
    assert max(iterations) > 1 and record.rows_computed == whole_chunks - skipped


def test_gaussian_product_rule_is_the_product_of_the_two_gaussians():
    """p_c^(1+w) / p_u^w of N(b_c, s_c^2) and N(b_u, s_u^2), by completing the square by hand, where the
    conditional is the narrower one (no clipping needed)."""
    w = 1.7
    a_c, b_c, a_u, b_u = torch.tensor([-0.4]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([-1.1])
    precision = (1 + w) / a_c.exp() ** 2 - w / a_u.exp() ** 2
    mean = ((1 + w) * b_c / a_c.exp() ** 2 - w * b_u / a_u.exp() ** 2) / precision
    log_scale, shift = sampling.gaussian_product((a_c, b_c), (a_u, b_u), w)
    torch.testing.assert_close(log_scale, -0.5 * precision.log(), atol=1e-6, rtol=0)
    torch.testing.assert_close(shift, mean, atol=1e-6, rtol=0)
    # A wider conditional is clipped to the unconditional's width: the ratio is 1 and the result is the
    # conditional, its mean pushed away from the unconditional one.
    log_scale, shift = sampling.gaussian_product((a_u, b_c), (a_c, b_u), w)
    torch.testing.assert_close(log_scale, a_u)
    torch.testing.assert_close(shift, (1 + w) * b_c - w * b_u)


def test_both_guidance_rules_serve_tarflow():
    model = random_model(num_blocks=2)
    noise, labels = torch.randn(2, 16, 4), [0, 1]
    extrapolated = model.inverse(noise, labels, guidance_scale=2.0)
    product = model.inverse(noise, labels, guidance_scale=2.0, guidance_rule="gaussian_product")
    unguided = model.inverse(noise, labels)
    assert (product - extrapolated).abs().max() > 1e-3 and (product - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rule must be one of"):
        model.inverse(noise, labels, guidance_scale=2.0, guidance_rule="average")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"rule": "gaussian_product", "target": "shift"}, "guidance_target applies to guidance_rule='extrapolate'"),
        ({"rule": "gaussian_product", "scale": 0.5}, "needs guidance_scale >= 1"),
        ({"attention_temperature": 0.0}, "attention_temperature must be > 0"),
    ],
)
def test_guidance_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sampling.Guidance(**kwargs)
