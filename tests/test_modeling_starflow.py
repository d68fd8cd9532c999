"""StarFlowModel: exact parity with apple/ml-starflow, flow properties, inputs, and serialisation.

Apple's reference outputs are in tests/fixtures/starflow (see its README). Every comparison prints the largest error
it saw (`pytest -s` shows them); the tolerance is 1e-4 and about 3e-6 is observed.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, T5EncoderModel

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.convert_starflow import load_ml_starflow_checkpoint
from tarflow_hf.guidance import Guidance
from tarflow_hf.modeling_starflow import (
    StarFlowBlockCache,
    StarFlowCondition,
    StarFlowModel,
)
from tarflow_hf.samplers import BlockJacobiSampler, JacobiSampler

FIXTURES = Path(__file__).parent / "fixtures" / "starflow"
CASES = ("sf_t2i", "sf_variant")
TOLERANCE = 1e-4


@cache
def reference(name: str) -> tuple[dict, StarFlowModel, dict[str, torch.Tensor]]:
    """(the case's json, the converted model, Apple's expected tensors)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    model = load_ml_starflow_checkpoint(FIXTURES / f"{name}.pth", FIXTURES / f"{name}.yaml")
    expected = torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)
    return meta, model, expected


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    error = (actual.detach().float() - expected.float()).abs().max().item()
    print(f"max |error| {what}: {error:.2e}")
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert error <= TOLERANCE, f"{what}: max error {error:.2e} > {TOLERANCE}"
    return error


def sample_inputs(spec: dict, expected: dict[str, torch.Tensor]) -> dict:
    """Our `inverse` arguments for one of Apple's recorded sampling runs (Apple's cfg g is guidance_scale 1 + g)."""
    kwargs = spec["kwargs"]
    guidance = kwargs["guidance"]
    negative = None
    if guidance > 0:
        negative = expected["y_empty"] if "y_empty" in spec["y"] else expected["y_neg"]
    options = {
        "encoder_hidden_states": expected["y_cond"],
        "negative_encoder_hidden_states": negative,
        "guidance_scale": 1.0 + guidance,
        "attention_temperature": kwargs.get("attn_temp", 1.0),
    }
    if kwargs.get("jacobi"):
        options["sampler"] = BlockJacobiSampler(
            kwargs["jacobi_block_size"], kwargs["jacobi_th"], kwargs["jacobi_max_iter"]
        )
    return options


def small_config(**overrides) -> StarFlowConfig:
    settings = dict(
        sample_size=4,
        in_channels=2,
        patch_size=2,
        hidden_size=32,
        deep_hidden_size=64,
        layers_per_block=[1, 1, 1],
        head_dim=32,
        text_hidden_size=8,
        max_text_length=3,
    )
    settings.update(overrides)
    return StarFlowConfig(**settings)


def random_model(config: StarFlowConfig | None = None, seed: int = 0) -> StarFlowModel:
    """Apple zero-initialises the output projection (each block starts as the identity map): random values here
    make every path of the flow matter."""
    torch.manual_seed(seed)
    model = StarFlowModel(config or small_config()).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.1)
            block.final_norm.weight.normal_(0.0, 0.1)
    return model


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", CASES)
def test_forward_matches_apple(name):
    _, model, expected = reference(name)
    out = model(expected["x"], expected["y_cond"], output_hidden_states=True)
    assert_close(out.latents, expected["z"], f"{name} z")
    num_blocks = model.config.num_blocks
    assert len(out.hidden_states) == num_blocks + 1
    assert_close(out.hidden_states[0], expected["x_patches"], f"{name} x_patches")
    for i in range(num_blocks):
        assert_close(out.hidden_states[i + 1], expected[f"block_output_{i}"], f"{name} block_output_{i}")
        assert_close(out.block_logdets[i], expected[f"logdet_{i}"].sum(dim=(1, 2)), f"{name} logdet_{i} (summed)")
    torch.testing.assert_close(out.logdet, torch.stack(out.block_logdets).sum(0), atol=1e-5, rtol=0)
    assert_close(out.text_hidden_states, expected["text_hidden_out"], f"{name} text_hidden_out")
    coefficient = model.config.latent_norm_regularization
    assert_close(out.latent_norm.reshape(1), expected["latent_norm_reg"], f"{name} latent_norm_reg")
    assert_close(out.loss.reshape(1), expected["train_loss"], f"{name} train_loss")
    assert_close((out.loss - coefficient * out.latent_norm).reshape(1), expected["loss"], f"{name} loss")
    # The loss is the per-dimension NLL without the 0.5 log(2 pi) constant: consistent with log_likelihood.
    num_dims = expected["x"][0].numel()
    nll = (-out.log_likelihood / num_dims).mean() - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    assert_close(nll.reshape(1), expected["loss"], f"{name} loss from log_likelihood")


@pytest.mark.parametrize("name", CASES)
def test_per_token_logdets_match_apple(name):
    """Each block's unreduced -log(scale), in the block's own token order, as Apple returns it."""
    _, model, expected = reference(name)
    grid = model.patchify(expected["x"]).flatten(1, 2)
    rope = model._rope_table(*expected["x"].shape[2:], expected["y_cond"].shape[1], torch.float32)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            table = rope if block.reads_text else rope.tail(grid.shape[1])
            grid, logdet, _ = block(grid, expected["y_cond"] if block.reads_text else None, table)
            assert_close(logdet, expected[f"logdet_{i}"], f"{name} logdet_{i}")


@pytest.mark.parametrize("name", CASES)
def test_samples_match_apple(name):
    """Every recorded sample, sequential and block-Jacobi, with and without guidance (y_neg and y_empty negatives),
    after every block, and the block-Jacobi iteration count of every chunk."""
    meta, model, expected = reference(name)
    num_blocks = model.config.num_blocks
    for spec in meta["samples"]:
        key = spec["key"]
        after = {}
        latents, stats = model.inverse(
            expected["noise"],
            return_stats=True,
            callback=lambda step, x, after=after: after.__setitem__(num_blocks - 1 - step, x),
            **sample_inputs(spec, expected),
        )
        assert_close(latents, expected[key], f"{name} {key}")
        for i in range(num_blocks - 1, 0, -1):
            assert_close(after[i], expected[f"{key}_after_block_{i}"], f"{name} {key}_after_block_{i}")
        if spec["kwargs"].get("jacobi"):
            assert stats.chunk_iterations == expected[f"{key}_jacobi_iters"].tolist() == spec["jacobi_iters"]
            # Every chunk stopped on Apple's rule (none ran out of iterations): its last change is below threshold.
            assert 0 < max(stats.residuals) < spec["kwargs"]["jacobi_th"]
        else:
            assert stats.sequential_blocks == [True] * num_blocks


@pytest.mark.parametrize("name", CASES)
def test_denoise_matches_apple(name):
    meta, model, expected = reference(name)
    source = meta["denoise"]["applied_to"]
    assert meta["denoise"]["noise_std"] == model.config.noise_std
    denoised = model.denoise(expected[source], expected["y_cond"])
    assert_close(denoised, expected["denoised"], f"{name} denoised")


def test_a_denoising_step_that_overflows_is_refused():
    model = random_model()
    size = model.config.sample_size
    text = torch.randn(2, model.config.max_text_length, model.config.text_hidden_size)
    with pytest.raises(FloatingPointError, match="denoising step produced non-finite values"):
        model.denoise(torch.full((2, model.config.in_channels, size, size), 1e30), text)
    assert torch.isfinite(model.denoise(torch.randn(2, model.config.in_channels, size, size), text)).all()


def test_non_square_latents_match_apple():
    meta, model, expected = reference("sf_variant")
    assert meta["aspect"]["latent_hw"] == list(expected["aspect_x"].shape[2:])
    out = model(expected["aspect_x"], expected["y_cond"])
    assert_close(out.latents, expected["aspect_z"], "aspect z")
    coefficient = model.config.latent_norm_regularization
    assert_close((out.loss - coefficient * out.latent_norm).reshape(1), expected["aspect_loss"], "aspect loss")
    for i in range(model.config.num_blocks):
        summed = expected[f"aspect_logdet_{i}"].sum(dim=(1, 2))
        assert_close(out.block_logdets[i], summed, f"aspect logdet_{i}")
    guidance = meta["aspect"]["sample_kwargs"]["guidance"]
    sample = model.inverse(expected["aspect_noise"], expected["y_cond"], expected["y_neg"], guidance_scale=1 + guidance)
    assert_close(sample, expected["aspect_sample"], "aspect sample")


def test_text_encoding_matches_apple():
    """Apple's prompt encoding: the T5 encoder's last hidden state times the attention mask."""
    expected = torch.load(FIXTURES / "text_encoding_expected.pt", weights_only=True)
    t5 = T5EncoderModel.from_pretrained(FIXTURES / "t5_tiny").eval()
    with torch.no_grad():
        hidden = t5(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).last_hidden_state
    assert_close(hidden, expected["t5_last_hidden_state"], "t5 last_hidden_state")
    embeds = hidden * expected["attention_mask"][..., None]  # Apple's encode_text (the pipeline's: its tests)
    assert_close(embeds, expected["prompt_embeds"], "prompt_embeds")
    assert torch.count_nonzero(embeds[3, 1:]) == 0  # "" is a lone </s>, then zeros
    _, _, flow_inputs = reference("sf_t2i")
    torch.testing.assert_close(flow_inputs["y_cond"], expected["prompt_embeds"][:3], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------- flow properties
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"layers_per_block": [2, 1], "patch_size": 1, "deep_hidden_size": 32},
        {"text_hidden_size": 0, "max_text_length": 0},
    ],
)
@pytest.mark.parametrize("shape", [(4, 4), (2, 6)])
def test_inverse_inverts_forward(overrides, shape):
    model = random_model(small_config(**overrides))
    torch.manual_seed(1)
    x = torch.randn(3, 2, *shape)
    text = torch.randn(3, 3, 8) if model.config.has_text else None
    z = model(x, text).latents
    for sampler in ("sequential", "jacobi:tolerance=1e-7", "newton:tolerance=1e-7"):
        back = model.inverse(z, text, sampler=sampler)
        torch.testing.assert_close(back, x, atol=1e-4, rtol=0, msg=f"sampler={sampler}")


def test_sequential_blocks_keep_the_deep_block_exact():
    """`JacobiSampler(sequential_blocks=1)`: the deep block (first in sampling order) decodes token by token, the
    shallow blocks iterate; the result matches the exact sample, and with every block forced it is the exact one."""
    model = random_model(small_config(layers_per_block=[1, 1, 2], patch_size=1))
    torch.manual_seed(4)
    z = torch.randn(2, 2, 4, 4)
    text, negative = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    guided = dict(negative_encoder_hidden_states=negative, guidance_scale=3.0)
    exact = model.inverse(z, text, **guided)
    hybrid, stats = model.inverse(
        z, text, **guided, sampler=JacobiSampler(1e-6, sequential_blocks=1), return_stats=True
    )
    assert stats.sequential_steps[0] == model.config.num_patches and stats.iterations[0] == 0
    assert all(passes > 0 for passes in stats.iterations[1:]), stats.iterations
    assert all(sequential == 0 for sequential in stats.sequential_steps[1:]), stats.sequential_steps
    torch.testing.assert_close(hybrid, exact, atol=1e-4, rtol=0)
    forced = model.inverse(z, text, **guided, sampler=JacobiSampler(1.0, sequential_blocks=3))
    torch.testing.assert_close(forced, exact, atol=1e-6, rtol=0)


def test_repeated_text_rows_run_the_prefix_once():
    """A batch repeating prompts (and the negative prompt) sends each distinct text row through the deep block's
    prefix once; its cache holds what running every row gives, and every image gets the sample it gets alone."""
    model = random_model(small_config(layers_per_block=[1, 2], patch_size=1))
    torch.manual_seed(6)
    z = torch.randn(3, 2, 4, 4)
    prompt_a, prompt_b, negative = torch.randn(3, 1, 3, 8).unbind(0)
    text = torch.cat([prompt_a, prompt_b, prompt_a])  # mixed order: the cache rows must follow the batch's
    negatives = negative.expand(3, -1, -1)
    deep = model.blocks[-1]
    rows = torch.cat([text, negatives])  # [conditional; unconditional], as guidance runs them
    rope = model._rope_table(4, 4, 3, torch.float32)
    condition = StarFlowCondition(rows, rope, 16, Guidance(3.0), temperatures=(0.7, 0.7))
    prefix_rows = []
    hook = deep.proj_txt.register_forward_hook(lambda _, args, __: prefix_rows.append(len(args[0])))
    with torch.no_grad():
        cache = deep.new_cache(condition, 3, 16)
    hook.remove()
    assert prefix_rows == [3], prefix_rows  # prompt a, prompt b, the negative: not 6 rows
    every_row = StarFlowBlockCache(len(deep.layers), 3)
    with torch.no_grad():
        deep.transformer(deep.proj_txt(rows), condition.rope, 0, every_row, (0.7, 0.7))
    for layer, expected in zip(cache.layers, every_row.layers, strict=True):
        torch.testing.assert_close(layer.keys[:, :, :3], expected.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.values[:, :, :3], expected.values, atol=1e-6, rtol=0)
    batched = model.inverse(z, text, negatives, guidance_scale=3.0)
    for i in range(3):
        alone = model.inverse(z[i : i + 1], text[i : i + 1], negatives[i : i + 1], guidance_scale=3.0)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)


def test_prompts_that_share_their_first_tokens_keep_their_own_prefix():
    """Rows are told apart by every token: two prompts that begin with the same words (the same first rows of
    embeddings) still each get their own prefix, and each image follows its own prompt."""
    model = random_model(small_config(layers_per_block=[1, 2], patch_size=1))
    torch.manual_seed(9)
    z = torch.randn(2, 2, 4, 4)
    prompt_a = torch.randn(1, 3, 8)
    prompt_b = prompt_a.clone()
    prompt_b[:, 2] = torch.randn(8)  # the same first two tokens, a different last one
    text, negatives = torch.cat([prompt_a, prompt_b]), torch.zeros(2, 3, 8)
    deep = model.blocks[-1]
    prefix_rows = []
    hook = deep.proj_txt.register_forward_hook(lambda _, args, __: prefix_rows.append(len(args[0])))
    batched = model.inverse(z, text, negatives, guidance_scale=3.0)
    hook.remove()
    assert prefix_rows[0] == 3  # prompt a, prompt b, the negative
    for i in range(2):
        alone = model.inverse(z[i : i + 1], text[i : i + 1], negatives[i : i + 1], guidance_scale=3.0)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-4


def test_a_span_without_cache_runs_the_prefix_once_and_matches_the_forward_pass():
    """The cache-less span (the Newton sampler's passes) also sends each distinct text row through the prefix once,
    and predicts what the forward pass computes from the whole sequence, every row with its own text."""
    model = random_model(small_config(layers_per_block=[1, 2], patch_size=1))
    torch.manual_seed(7)
    prompt_a, prompt_b = torch.randn(2, 1, 3, 8).unbind(0)
    text = torch.cat([prompt_a, prompt_b, prompt_a, prompt_a])
    x = torch.randn(4, 16, 2)  # tokens in raster order
    deep = model.blocks[-1]
    rope = model._rope_table(4, 4, 3, torch.float32)
    condition = StarFlowCondition(text, rope, 16)
    prefix_rows = []
    hook = deep.proj_txt.register_forward_hook(lambda _, args, __: prefix_rows.append(len(args[0])))
    with torch.no_grad():
        log_scale, shift = deep.affine_span(deep.sequence_inputs(deep.permute(x)), 0, None, condition)
        hook.remove()
        z, minus_log_scale, _ = deep(x, text, rope)
    assert prefix_rows == [2], prefix_rows
    torch.testing.assert_close(log_scale, -minus_log_scale, atol=1e-5, rtol=0)
    # z = (x - shift) / scale in block order
    torch.testing.assert_close(shift, deep.permute(x) - deep.permute(z) * log_scale.exp(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must start at position 0"):
        deep.affine_span(x[:, :1], 3, None, condition)


def test_logdet_is_the_jacobian_log_determinant():
    """Against brute force: slogdet of the autograd Jacobian of the whole flow, in float64."""
    model = random_model(small_config(sample_size=2, patch_size=1, layers_per_block=[1, 1])).double()
    torch.manual_seed(2)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    text = torch.randn(1, 3, 8, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: model(v, text).latents, x).reshape(x.numel(), x.numel())
    expected = torch.linalg.slogdet(jacobian).logabsdet
    torch.testing.assert_close(model(x, text).logdet[0], expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("rule", ["gaussian_product", "extrapolate"])
def test_guided_samples_follow_the_guidance_rule(rule):
    """One guided token by hand, x_1 = z_1 * sigma + mu: with STARFlow's rule (sigma, mu) is the product of the two
    branches' Gaussians, with TarFlow's log sigma and mu are extrapolated from the branches."""
    model = random_model(small_config(layers_per_block=[1]))
    torch.manual_seed(3)
    z = torch.randn(2, 2, 4, 4)
    text, negative = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    w = 2.5
    sample = model.inverse(z, text, negative, guidance_scale=1 + w, guidance_rule=rule)
    block = model.blocks[0]  # the deep block, reversed order: token 0 in its order is the last raster token
    tokens = block.permute(model.patchify(z).flatten(1, 2))
    sos = block.sos_embed.expand(2, -1, -1)
    rope = model._rope_table(4, 4, 3, torch.float32)
    with torch.no_grad():
        params = []
        for y in (text, negative):
            hidden = torch.cat([block.proj_txt(y), block.proj_in(sos)], dim=1)
            params.append(block.affine(block.transformer(hidden, rope, 0)[:, -1:]))
    (sigma_c, mu_c), (sigma_u, mu_u) = params
    if rule == "gaussian_product":
        s = (sigma_c / sigma_u).clamp(max=1) ** 2
        sigma = sigma_c / (1 + w - w * s).sqrt()
        mu = ((1 + w) * mu_c - w * s * mu_u) / (1 + w - w * s)
    else:
        sigma = (sigma_c.log() + w * (sigma_c.log() - sigma_u.log())).exp()
        mu = mu_c + w * (mu_c - mu_u)
    first = block.permute(model.patchify(sample).flatten(1, 2))[:, :1]
    torch.testing.assert_close(first, tokens[:, :1] * sigma + mu, atol=1e-5, rtol=0)


def test_attention_temperature_divides_every_attention_logit():
    """Temperature T is the same model with every query projection divided by T (logits are linear in the query,
    RoPE included), for every sampler, guided, in every block and the text prefix; the parallel samplers also
    agree with the sequential one at that temperature."""
    model = random_model(small_config(layers_per_block=[1, 2], patch_size=1))
    cooled = random_model(small_config(layers_per_block=[1, 2], patch_size=1))
    temperature = 0.7
    with torch.no_grad():
        for block in cooled.blocks:
            for layer in block.layers:
                width = layer.attention.proj.in_features
                layer.attention.qkv.weight[:width] /= temperature
                layer.attention.qkv.bias[:width] /= temperature
    torch.manual_seed(8)
    z = torch.randn(2, 2, 4, 4)
    text, negative = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    guided = dict(negative_encoder_hidden_states=negative, guidance_scale=3.0)
    samples = {}
    for name in ("sequential", "block_jacobi", "jacobi", "newton"):
        sampler = f"{name}:tolerance=1e-7" if name in ("jacobi", "newton") else name
        warm = model.inverse(z, text, **guided, sampler=sampler, attention_temperature=temperature)
        cold = cooled.inverse(z, text, **guided, sampler=sampler)
        torch.testing.assert_close(warm, cold, atol=1e-5, rtol=0, msg=f"sampler={sampler}")
        samples[name] = warm
    assert (samples["sequential"] - model.inverse(z, text, **guided)).abs().max() > 1e-2  # the temperature matters
    for name in ("jacobi", "newton"):
        torch.testing.assert_close(samples[name], samples["sequential"], atol=1e-4, rtol=0, msg=name)


def test_the_rules_unconditional_temperature_cools_the_negative_branch_only():
    """`unconditional_temperature` T divides the unconditional branch's logits: the same as guiding against a
    negative branch run by the model with its queries divided by T, which is what running the two branches with
    two copies of the model computes. Checked through the prefix cache's rows, branch by branch."""
    model = random_model(small_config(layers_per_block=[1, 2], patch_size=1))
    deep = model.blocks[-1]
    text, negative = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rope = model._rope_table(4, 4, 3, torch.float32)
    rows = torch.cat([text, negative])
    condition = StarFlowCondition(rows, rope, 16, Guidance(3.0), temperatures=(1.0, 0.5))
    with torch.no_grad():
        cache = deep.new_cache(condition, 2, 16)
        for part, temperature in ((slice(0, 2), 1.0), (slice(2, 4), 0.5)):
            alone = StarFlowBlockCache(len(deep.layers), 3)
            deep.transformer(deep.proj_txt(rows[part]), rope, 0, alone, (temperature,))
            for layer, expected in zip(cache.layers, alone.layers, strict=True):
                torch.testing.assert_close(layer.keys[part, :, :3], expected.keys, atol=1e-6, rtol=0)
    z = torch.randn(2, 2, 4, 4)
    plain = model.inverse(z, text, negative, guidance_scale=3.0)
    cooled = model.inverse(z, text, negative, 3.0, "gaussian_product:unconditional_temperature=0.5")
    assert (plain - cooled).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ inputs
def test_bad_inputs_are_refused_with_a_message():
    model = random_model()
    x, text = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 8)
    cases = [
        (lambda: model(torch.randn(2, 3, 4, 4), text), "channels|2, height"),
        (lambda: model(torch.randn(2, 2, 4, 5), text), "patch grid"),
        (lambda: model(torch.randn(2, 2, 4), text), "shape"),
        (lambda: model(x, torch.randn(2, 3, 7)), "text_hidden_size"),
        (lambda: model(x, None), "reads text"),
        (lambda: model(x, torch.randn(3, 3, 8)), "rows for a batch"),
        (lambda: model.inverse(x, text, guidance_scale=2.0), "negative_encoder_hidden_states"),
        (lambda: model.inverse(x, text, torch.randn(2, 4, 8), guidance_scale=2.0), "same length"),
        (lambda: model.inverse(x, text, torch.randn(2, 3, 8), guidance_scale=0.5), "guidance_scale"),
        (lambda: model.inverse(x, text, sampler="euler"), "sampler"),
        (lambda: model.inverse(x, text, attention_temperature=0.0), "attention_temperature"),
        (
            lambda: model.inverse(x, text, attention_temperature="1"),
            "attention_temperature must be a finite number > 0",
        ),
        (lambda: model.inverse(x, text, torch.randn(2, 3, 8), 2.0, guidance_rule="mean"), "guidance_rule must be"),
        (lambda: model.inverse(x, text, sampler="block_jacobi:block_size=2.5"), "block_size must be an integer >= 1"),
        (lambda: model(torch.randn(0, 2, 4, 4), text[:0]), "empty batch"),
        (lambda: model.inverse(torch.randn(0, 2, 4, 4), text[:0]), "empty batch"),
        (lambda: model.denoise(x, text, noise_std="0.3"), "noise_std must be a finite number"),
        (lambda: model.inverse(x, text, sampler="jacobi:sequential_blocks=-1"), "sequential_blocks must be an integer"),
        (lambda: model.denoise(x, text, noise_std=-1.0), "noise_std"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    unconditional = random_model(small_config(text_hidden_size=0, max_text_length=0))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, text)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 48}, "hidden_size"),
        ({"deep_hidden_size": 40}, "deep_hidden_size"),
        ({"head_dim": 26, "hidden_size": 52, "deep_hidden_size": 52}, "head_dim"),
        ({"head_dim": 16, "hidden_size": 32, "deep_hidden_size": 32}, "head_dim"),
        ({"layers_per_block": [1, 0]}, "layers_per_block"),
        ({"sample_size": 5}, "sample_size"),
        ({"text_hidden_size": 0}, "text_hidden_size"),
        ({"soft_clip": -1.0}, "soft_clip"),
        ({"patch_size": 0}, "patch_size"),
        ({"noise_std": float("inf")}, "noise_std"),
        ({"soft_clip": float("nan")}, "soft_clip"),
        ({"default_guidance_scale": 0.5}, "default_guidance_scale"),
        ({"default_guidance_scale": float("nan")}, "default_guidance_scale"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


# ------------------------------------------------------------------------------------ implementations
@pytest.mark.parametrize("name", CASES)
def test_eager_and_sdpa_agree(name):
    """The two attention implementations compute the same function, to float32 rounding: 1e-6 relative to the
    largest value of each output, since sums reach ~25 (logdet) and samples amplify rounding through the blocks."""
    _, model, expected = reference(name)
    results = {}
    try:
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            assert model.config._attn_implementation == implementation
            out = model(expected["x"], expected["y_cond"])
            sample = model.inverse(
                expected["noise"], expected["y_cond"], expected["y_neg"], guidance_scale=3.0, attention_temperature=0.8
            )
            results[implementation] = (out.latents, out.logdet, sample)
    finally:
        model.set_attn_implementation("sdpa")
    for what, sdpa, eager in zip(("z", "logdet", "sample"), results["sdpa"], results["eager"], strict=True):
        print(f"max |eager - sdpa| {name} {what}: {(sdpa - eager).abs().max().item():.2e}")
        torch.testing.assert_close(sdpa, eager, atol=1e-6 * max(1.0, sdpa.abs().max().item()), rtol=1e-6)


def test_attention_weights_of_every_layer():
    """`output_attentions=True` gives every layer's weights, block by block in forward order (the deep block's over the
    text prefix and the tokens), causal rows that sum to 1, whatever the implementation (the fused one computes them
    with the explicit softmax for the call), and leaves the outputs as they are."""
    model = random_model()
    x, text = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 8)
    plain = model(x, text)
    fused = model(x, text, output_attentions=True)
    assert plain.attentions is None
    torch.testing.assert_close(fused.latents, plain.latents, atol=1e-5, rtol=1e-6)
    # 2x2 tokens of patch 2 on a 4x4 latent; shallow blocks 32 wide (1 head), the deep one 64 (2 heads) + 3 text rows.
    assert [tuple(weights.shape) for weights in fused.attentions] == [(2, 1, 4, 4), (2, 1, 4, 4), (2, 2, 7, 7)]
    for weights in fused.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert weights.triu(1).abs().max() == 0
    model.set_attn_implementation("eager")
    try:
        eager = model(x, text, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for asked, expected in zip(fused.attentions, eager.attentions, strict=True):
        torch.testing.assert_close(asked, expected, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model()
    x, text = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 8)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model.zero_grad()
        model(x, text).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.is_activation_checkpointing
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=0)


def test_initialisation_is_apples():
    model = StarFlowModel(small_config())
    for block in model.blocks:
        assert torch.count_nonzero(block.proj_out.weight) == 0
        assert torch.count_nonzero(block.final_norm.weight) == 0
        assert block.sos_embed.std() > 0.1
    x, text = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 8)
    out = model(x, text)  # a zero output weight: each block shifts by its bias only, scale from softplus(bias)
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------------------ serialisation
def test_save_and_load_round_trip(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    AutoConfig.register(StarFlowConfig.model_type, StarFlowConfig, exist_ok=True)
    AutoModel.register(StarFlowConfig, StarFlowModel, exist_ok=True)
    for loaded in (StarFlowModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, StarFlowModel)
        ignored = {"_name_or_path"}
        saved = {key: value for key, value in model.config.to_dict().items() if key not in ignored}
        assert {key: value for key, value in loaded.config.to_dict().items() if key not in ignored} == saved
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], tensor, atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), StarFlowConfig)
    eager = StarFlowModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    x, text = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 8)
    torch.testing.assert_close(eager(x, text).latents, model(x, text).latents, atol=1e-6, rtol=1e-6)
