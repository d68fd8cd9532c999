"""The samplers (`tarflow_hf.samplers`) against a straightforward reference, the sequential inverse written the
obvious way (the whole prefix through the transformer at every step, no cache, branches run separately), and as
config-carrying components."""

import copy
import json
import re

import pytest
import torch
from conftest import random_model
from transformers.testing_utils import CaptureLogger

from tarflow_hf import BUNDLED_MODEL, TarFlowModel, samplers
from tarflow_hf.guidance import Guidance, GuidanceRule
from tarflow_hf.layers import KVCache
from tarflow_hf.modeling_tarflow import TarFlowBlock
from tarflow_hf.samplers import (
    SAMPLERS,
    BlockJacobiSampler,
    JacobiSampler,
    NewtonSampler,
    SequentialSampler,
    get_sampler,
    sampler_spec,
)

EXACT = ("sequential", "jacobi:tolerance=1e-7", "newton:tolerance=1e-7")


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
    rule = GuidanceRule(target=target, schedule=schedule, unconditional_temperature=temperature)
    for sampler in EXACT:
        ours = model.inverse(noise, labels, guidance_scale=2.5, guidance_rule=rule, sampler=sampler)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=sampler)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
@pytest.mark.parametrize("sampler", EXACT)
def test_unconditional_models_match_the_straightforward_algorithm(sampler, guidance_scale):
    model = random_model(num_classes=0, nvp=False)
    noise = torch.randn(2, 16, 4)
    with torch.no_grad():
        expected = naive_inverse(model, noise, guidance_scale=guidance_scale, temperature=0.8)
    rule = GuidanceRule(unconditional_temperature=0.8)
    ours = model.inverse(noise, guidance_scale=guidance_scale, guidance_rule=rule, sampler=sampler)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_attention_temperature_divides_every_logit_of_both_branches():
    """A global temperature T on top of the rule's unconditional one: the same as dividing every query projection
    by T (the logits are query . key / sqrt(d)), whichever the sampler."""
    model = random_model(num_blocks=2, layers_per_block=2)
    noise, labels, rule = torch.randn(2, 16, 4), [0, 1], GuidanceRule(unconditional_temperature=0.8)
    cooled = copy.deepcopy(model)
    with torch.no_grad():
        for block in cooled.blocks:
            for layer in block.layers:
                width = layer.attention.qkv.out_features // 3
                layer.attention.qkv.weight[:width] /= 0.6
                layer.attention.qkv.bias[:width] /= 0.6
    expected = cooled.inverse(noise, labels, guidance_scale=2.0, guidance_rule=rule)
    for sampler in EXACT:
        ours = model.inverse(noise, labels, 2.0, rule, attention_temperature=0.6, sampler=sampler)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=sampler)
    assert (model.inverse(noise, labels, 2.0, rule) - expected).abs().max() > 1e-3


def test_jacobi_reports_what_it_did():
    model = random_model(num_blocks=3)
    noise = torch.randn(2, 16, 4) * 0.5
    exact = model.inverse(noise, [0, 1], guidance_scale=2.0)
    images, stats = model.inverse(
        noise, [0, 1], guidance_scale=2.0, sampler=JacobiSampler(tolerance=1e-6), return_stats=True
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

    _, forced = model.inverse(noise, [0, 1], sampler=JacobiSampler(sequential_blocks=2), return_stats=True)
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


def assert_exact_to_rounding(model, noise, images):
    """`images` are the exact inverse up to float32 rounding: no farther from the float64 inverse than a few times
    the float32 sequential sampler is. A strongly coupled flow amplifies rounding (1e-7) to 1e-5 and more, and a
    parallel sampler's products, on other row counts, round differently."""
    exact64 = copy.deepcopy(model).double().inverse(noise.double(), [0, 1], guidance_scale=3.0)
    rounding = (model.inverse(noise, [0, 1], guidance_scale=3.0) - exact64).abs().max().item()
    assert (images - exact64).abs().max().item() <= 4 * rounding + 1e-6


@pytest.mark.parametrize("sampler", [JacobiSampler(1e-9), JacobiSampler(1e-9, window=1), JacobiSampler(1e-9, window=3),
                                     JacobiSampler(1e-9, window=8), NewtonSampler(1e-9)])  # fmt: skip
def test_parallel_samplers_never_need_more_passes_than_the_sequential_one(sampler):
    model, noise = strongly_coupled_model()
    images, stats = model.inverse(noise, [0, 1], guidance_scale=3.0, sampler=sampler, return_stats=True)
    assert_exact_to_rounding(model, noise, images)
    assert all(n <= 15 for n in stats.iterations)
    window = getattr(sampler, "window", None)
    if window == 1:  # one patch per pass is the sequential sampler
        assert stats.iterations == [15, 15] and stats.rows_computed == [15, 15]
    if window is not None:
        assert all(rows <= window * n for rows, n in zip(stats.rows_computed, stats.iterations, strict=True))


def test_jacobi_budget_finishes_one_patch_at_a_time():
    model, noise = strongly_coupled_model()
    sampler = JacobiSampler(tolerance=1e-9, max_iterations=2)
    images, stats = model.inverse(noise, [0, 1], guidance_scale=3.0, sampler=sampler, return_stats=True)
    # Two passes settle at least two patches; the rest (at most 13) go one at a time, exactly.
    assert all(0 < steps <= 13 for steps in stats.sequential_steps)
    assert [n - steps for n, steps in zip(stats.iterations, stats.sequential_steps, strict=True)] == [2, 2]
    assert_exact_to_rounding(model, noise, images)


class ChainBlock:
    """x_t = z_t + c_t * x_{t-1}: a linear chain whose coupling c_t is strong (0.95) for the first `strong` tokens (each
    Jacobi pass settles one token there: the window drops to a probe) and negligible after them."""

    def __init__(self, num_tokens: int, strong: int):
        self.coupling = torch.full((num_tokens,), 1e-6)
        self.coupling[1 : strong + 1] = 0.95

    def new_cache(self, condition, batch_size, num_tokens):
        return None

    def affine_span(self, tokens, position, cache, condition, weight):
        coupling = self.coupling[position + 1 : position + 1 + tokens.shape[1]].view(1, -1, 1)
        return torch.zeros_like(tokens), coupling * tokens

    def forward(self, x):
        z = x.clone()
        z[:, 1:] = x[:, 1:] - self.coupling[1:].view(1, -1, 1) * x[:, :-1]
        return z


def test_jacobi_window_grows_again_after_a_stagnating_stretch():
    """After the strongly coupled stretch (one token per pass, the window down to a probe of 16), a pass settles
    the whole window, which then doubles: 16, 32, 64, 128 tokens reach the end of the 200 weak tokens in about 5
    passes, where a window stuck at the probe's 16 tokens would need 200 / 16 = 13 at least."""
    block = ChainBlock(num_tokens=225, strong=24)
    z = torch.randn(1, 225, 2, generator=torch.Generator().manual_seed(0))
    x, record = samplers.sample_jacobi(block, z, ToyCondition(), tolerance=1e-5)
    torch.testing.assert_close(block.forward(x), z, atol=1e-5, rtol=0)
    weak_passes = record.iterations - 24  # the strong stretch settles one token per pass
    assert 0 < weak_passes <= 8, record


def test_jacobi_shrinks_its_window_where_it_stagnates(monkeypatch):
    """The bundled model's first block settles one patch per pass for its first half: there the sampler drops
    to a probe window, computing far fewer rows for the same number of passes."""
    model = TarFlowModel.from_pretrained(BUNDLED_MODEL, subfolder="transformer").eval()
    noise = torch.randn(4, model.config.num_patches, model.config.patch_dim, generator=torch.Generator().manual_seed(0))

    def sample():
        return model.inverse(noise, [1, 4, 7, 9], guidance_scale=3.0, sampler="jacobi", return_stats=True)

    images, stats = sample()
    monkeypatch.setattr(samplers, "JACOBI_STAGNATION_PASSES", 10**6)  # never shrink
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
    condition = block.sampling_condition(torch.tensor([1, 2]), 2, Guidance())
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
    options = dict(guidance_scale=2.0, guidance_rule=GuidanceRule(schedule=schedule), sampler=JacobiSampler(tolerance))
    with CaptureLogger(samplers.logger) as float32_log:
        model.inverse(noise, [0, 1], **options)
    with CaptureLogger(samplers.logger) as bfloat16_log, torch.autocast("cpu", dtype=torch.bfloat16):
        model.inverse(noise, [0, 1], **options)
    assert float32_log.out == ""
    assert f"the Jacobi tolerance {tolerance:g} is below the resolution of torch.bfloat16" in bfloat16_log.out


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
    sampler = JacobiSampler(tolerance=3e-2) if sampler == "jacobi" else sampler
    images = model.inverse(torch.randn(2, 16, 4), guidance_scale=2.0, sampler=sampler)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()  # the trajectory stays in float32
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("sampler", [JacobiSampler(), JacobiSampler(window=4), NewtonSampler()])
def test_parallel_samplers_report_a_real_overflow_like_the_sequential_one(sampler):
    model = random_model(num_blocks=2, seed=0)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.3)
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.inverse(noise, [0, 1], guidance_scale=3.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.inverse(noise, [0, 1], guidance_scale=3.0, sampler=sampler)


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


def test_newton_takes_no_jacobi_only_options():
    with pytest.raises(TypeError, match="window"):
        NewtonSampler(window=4)
    with pytest.raises(ValueError, match=r"sampler 'newton' option 'window=4'.*sequential_blocks, tolerance"):
        get_sampler("newton:window=4")


class ToyCondition:
    """No embeddings at all: the toy block depends on its tokens only."""

    guidance = None

    def repeat_interleave(self, copies: int) -> "ToyCondition":
        return self


class ToyBlock:
    """A minimal affine autoregressive block that is not TarFlow: a_t, b_t are fixed smooth functions of the
    running mean of the tokens before t (a "cache" is just the running sum)."""

    def __init__(self, dim: int, coupling: float = 1.0):
        generator = torch.Generator().manual_seed(3)
        self.w_a = 0.3 * coupling * torch.randn(dim, dim, generator=generator)
        self.w_b = 0.5 * coupling * torch.randn(dim, dim, generator=generator)

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


TOY_SAMPLERS = {
    "sequential": SequentialSampler(),
    "jacobi": JacobiSampler(tolerance=1e-7),
    "newton": NewtonSampler(tolerance=1e-7),
    "block_jacobi": BlockJacobiSampler(block_size=5, threshold=1e-14),
}


@pytest.mark.parametrize("sampler", list(TOY_SAMPLERS))
def test_samplers_invert_a_block_that_is_not_tarflow(sampler):
    block = ToyBlock(dim=3)
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0))
    z = block.forward(x)
    inverted, record = TOY_SAMPLERS[sampler].invert_block(block, z, ToyCondition())
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
    inverted, _ = get_sampler(sampler).invert_block(block, z, ToyCondition())
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
    ours, record = samplers.sample_block_jacobi(block, z, ToyCondition(), 8, threshold, max_iterations)
    apple, iterations = apple_block_jacobi(block, z, 8, threshold, max_iterations)
    assert record.chunk_iterations == iterations
    # The toy block computes in float32, whose matrix products round differently for fewer rows.
    torch.testing.assert_close(ours, apple, atol=1e-6, rtol=0)
    chunk_lengths = [8, 8, 6]
    whole_chunks = sum(n * length for n, length in zip(iterations, chunk_lengths, strict=True))
    # Pass i of a chunk skips its first min(i, length) rows.
    skipped = sum(min(i, length) for n, length in zip(iterations, chunk_lengths, strict=True) for i in range(n))
    assert max(iterations) > 1 and record.rows_computed == whole_chunks - skipped


def test_both_guidance_rules_serve_tarflow():
    model = random_model(num_blocks=2)
    noise, labels = torch.randn(2, 16, 4), [0, 1]
    extrapolated = model.inverse(noise, labels, guidance_scale=2.0)
    product = model.inverse(noise, labels, guidance_scale=2.0, guidance_rule="gaussian_product")
    unguided = model.inverse(noise, labels)
    assert (product - extrapolated).abs().max() > 1e-3 and (product - unguided).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rule must be one of"):
        model.inverse(noise, labels, guidance_scale=2.0, guidance_rule="average")


# ------------------------------------------------------------------------------------------- the components
@pytest.mark.parametrize(
    "sampler",
    [SequentialSampler(), JacobiSampler(1e-3, window=8, max_iterations=5, sequential_blocks=1),
     NewtonSampler(1e-5, sequential_blocks=2), BlockJacobiSampler(4, 1e-2, 7, 1)],
)  # fmt: skip
def test_a_sampler_keeps_its_options_through_its_config_file(sampler, tmp_path):
    sampler.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "sampler_config.json").read_text())
    assert config["_class_name"] == type(sampler).__name__
    assert {key: config[key] for key in sampler.options()} == sampler.options()
    loaded = type(sampler).from_pretrained(tmp_path)
    assert loaded == sampler and loaded.options() == sampler.options()
    assert get_sampler(sampler_spec(sampler)) == sampler  # the command line's form, both ways


def test_samplers_swap_through_from_config_keeping_shared_options():
    jacobi = JacobiSampler(tolerance=1e-3, window=4, sequential_blocks=1)
    newton = NewtonSampler.from_config(jacobi.config)
    assert newton == NewtonSampler(tolerance=1e-3, sequential_blocks=1)
    assert SequentialSampler.from_config(newton.config) == SequentialSampler()


def test_sampler_names_and_specs():
    assert set(SAMPLERS) == {"sequential", "jacobi", "newton", "block_jacobi"}
    assert get_sampler(None) == SequentialSampler()
    assert get_sampler("jacobi") == JacobiSampler()
    assert get_sampler(" jacobi : tolerance=0.01, window=none , sequential_blocks=1") == JacobiSampler(
        0.01, None, None, 1
    )
    same = JacobiSampler(tolerance=0.5)
    assert get_sampler(same) is same


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: get_sampler("fastest"),
            r"sampler must be one of \('sequential', 'jacobi', 'newton', 'block_jacobi'\), got 'fastest'",
        ),
        (lambda: get_sampler(3), "sampler must be a sampler or one of"),
        (lambda: get_sampler("jacobi:tolerance"), "expected key=value"),
        (lambda: get_sampler("jacobi:tolerance=abc"), "tolerance must be a finite number > 0, got 'abc'"),
        (lambda: JacobiSampler(tolerance=0), "tolerance must be a finite number > 0, got 0"),
        (lambda: JacobiSampler(tolerance=float("nan")), "tolerance must be a finite number > 0"),
        (lambda: JacobiSampler(window=0), "window must be an integer >= 1 or None, got 0"),
        (lambda: JacobiSampler(window=2.5), "window must be an integer >= 1 or None, got 2.5"),
        (lambda: JacobiSampler(sequential_blocks=-1), "sequential_blocks must be an integer >= 0 or None, got -1"),
        (lambda: JacobiSampler(sequential_blocks=True), "sequential_blocks must be an integer >= 0 or None, got True"),
        (lambda: BlockJacobiSampler(block_size=0), "block_size must be an integer >= 1, got 0"),
        (lambda: BlockJacobiSampler(threshold="1e-3"), "threshold must be a finite number > 0, got '1e-3'"),
        (lambda: BlockJacobiSampler(max_iterations=None), "max_iterations must be an integer >= 1, got None"),
    ],
)
def test_bad_sampler_options_are_one_clear_line(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_the_first_blocks_run_exactly_whatever_the_sampler():
    model = random_model(num_blocks=3)
    noise = torch.randn(2, 16, 4) * 0.5
    for sampler in (NewtonSampler(sequential_blocks=2), BlockJacobiSampler(sequential_blocks=2)):
        _, stats = model.inverse(noise, [0, 1], sampler=sampler, return_stats=True)
        assert stats.sequential_blocks == [True, True, False], sampler


# ------------------------------------------------------------------------------------ a capturable sequential step
def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def starflow_case():
    from test_modeling_starflow import random_model as starflow_model

    model = starflow_model()
    config = model.config
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text, negative = torch.randn(2, 2, config.max_text_length, config.text_hidden_size, generator=generator)
    return model, (latents, text, negative), {"guidance_scale": 3.0}


def tarflow_case():
    model = random_model(num_blocks=3, seed=2)
    with torch.no_grad():
        for block in model.blocks:  # far from the identity, so that the steps matter
            block.proj_out.weight.normal_(0.0, 0.05)
    latents = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(3))
    return model, (latents, [0, 1, 2]), {"guidance_scale": 2.0, "guidance_rule": GuidanceRule(schedule="linear")}


@pytest.mark.parametrize("case", [tarflow_case, starflow_case])
def test_a_compiled_sequential_step_gives_the_same_samples(case):
    """The sequential step compiles whole (`fullgraph`: no value read on the host, which would break the graph), to
    one graph per block whatever the number of tokens (no shape changes between them), reused by later calls; the
    samples are the step-by-step sampler's, to the rounding of attention over a full-length cache. The backend is
    the compiler's front end without code generation (CUDA graphs need a GPU; the capture conditions are the same)."""
    model, inputs, options = case()
    exact = model.inverse(*inputs, **options)
    sampler = SequentialSampler(compile_mode="default", compile_backend="aot_eager")
    before = compiled_graphs()
    first = model.inverse(*inputs, sampler=sampler, **options)
    graphs = compiled_graphs() - before
    assert 1 <= graphs <= len(model.blocks)
    again = model.inverse(*inputs, sampler=sampler, **options)
    assert compiled_graphs() - before == graphs
    torch.testing.assert_close(first, exact, atol=2e-5, rtol=0)
    assert torch.equal(again, first)


def test_the_static_cache_step_matches_the_growing_cache():
    """Uncompiled, the static step is the sequential sampler: full-length keys with a mask read what the growing
    cache reads."""
    model, inputs, options = tarflow_case()
    exact = model.inverse(*inputs, **options)

    class Static(SequentialSampler):
        def invert(self, block, z, condition):
            return samplers.sample_sequential_static(block, z, condition)

    torch.testing.assert_close(model.inverse(*inputs, sampler=Static(), **options), exact, atol=2e-5, rtol=0)


@pytest.mark.parametrize("case", [tarflow_case, starflow_case])
def test_the_captured_step_reads_no_value_on_the_host(case):
    """What the compiler captures of a step holds no host read of a device value (`.item()`, `int(tensor)`: a
    device synchronisation inside a CUDA graph) and no symbolic sizes (a shape that changes between tokens)."""
    graphs = []

    def recorder(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    step = torch.compile(samplers.static_step, backend=recorder, fullgraph=True, dynamic=False)

    class Recorded(SequentialSampler):
        def invert(self, block, z, condition):
            return samplers.sample_sequential_static(block, z, condition, step)

    model, inputs, options = case()
    torch.testing.assert_close(
        model.inverse(*inputs, sampler=Recorded(), **options), model.inverse(*inputs, **options), atol=2e-5, rtol=0
    )
    assert 1 <= len(graphs) <= len(model.blocks)
    for graph in graphs:
        assert not re.search(r"\.item\(|_local_scalar_dense|sym_", graph.code), graph.code


def test_a_compiled_sampler_serves_more_kinds_of_blocks_than_the_compilers_recompile_limit():
    """Blocks of other shapes are graphs of their own, and the compiler keeps at most `recompile_limit` graphs per
    function: each block compiles a copy of the step, or a process that samples a few models (a Space switching
    them, float32 then bf16) would stop with an error."""
    sampler = SequentialSampler(compile_mode="default", compile_backend="eager")
    for heads in range(1, torch._dynamo.config.recompile_limit + 2):
        model = random_model(hidden_size=16 * heads, num_blocks=1)
        noise = torch.randn(1, 16, 4) * 0.5
        exact = model.inverse(noise, [0])
        torch.testing.assert_close(model.inverse(noise, [0], sampler=sampler), exact, atol=2e-5, rtol=0)


def test_int8_steps_compiled_with_frozen_weights_match_eager_and_follow_weight_changes(caplog):
    """Inductor with the weights frozen in (its int8 kernels): STARFlow's int8 samples match the eager int8 ones,
    its 4-channel input layer included (a width the int8 kernel cannot take: it crashed the process); weights
    changed in place afterwards are noticed and compiled again instead of sampling with the old ones."""
    from test_modeling_starflow import random_model as starflow_model
    from test_modeling_starflow import small_config
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    _, inputs, options = starflow_case()
    # 4-channel latents, patch 1: STARFlow's released input and output widths, narrower than the int8 kernels take
    model = starflow_model(small_config(in_channels=4, patch_size=1, sample_size=4)).to(torch.bfloat16)
    inputs = (torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)), *inputs[1:])
    quantize_(model, Int8WeightOnlyConfig())
    assert model.blocks[0].proj_in.weight.shape[1] == 4 and model.blocks[0].proj_out.weight.shape[0] == 8
    sampler = SequentialSampler(compile_mode="default", freeze_weights=True)
    before = model.inverse(*inputs, sampler=sampler, **options)
    torch.testing.assert_close(before, model.inverse(*inputs, **options), atol=0.15, rtol=0)
    with torch.no_grad():
        model.blocks[0].final_norm.weight.mul_(3.0)  # in place: the frozen graph holds the old values
    with caplog.at_level("WARNING"):
        changed = model.inverse(*inputs, sampler=sampler, **options)
    assert "recompiling" in caplog.text
    assert (changed - before).abs().max() > 0.5  # the change matters: the old graph would be far off
    torch.testing.assert_close(changed, model.inverse(*inputs, **options), atol=0.15, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compile_mode": "fast"}, "compile_mode must be None or one of"),
        ({"compile_backend": ""}, "compile_backend must be the name"),
        ({"freeze_weights": True}, "freeze_weights=True needs a compile_mode with the inductor backend"),
        ({"compile_mode": "default", "freeze_weights": 1}, "freeze_weights must be True or False, got 1"),
    ],
)
def test_compile_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        SequentialSampler(**options)
