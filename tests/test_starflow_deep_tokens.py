"""benchmarks/starflow_deep_tokens.py: our decoder stopped after the deep block's first tokens gives exactly the
first tokens of a whole sequential inverse."""

from __future__ import annotations

import torch
from test_benchmarks import benchmark

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.modeling_starflow import StarFlowModel

full_size = benchmark("starflow_full_size")
deep_tokens = benchmark("starflow_deep_tokens")


def tiny_model_and_inputs(deep_layers: int, tokens: int) -> tuple[StarFlowModel, deep_tokens.DeepInputs]:
    """A random two-block STARFlow (every block moving its tokens) and the deep-token inputs for its first `tokens`."""
    config = StarFlowConfig(sample_size=4, hidden_size=64, layers_per_block=[1, deep_layers], head_dim=32,
                            text_hidden_size=16, max_text_length=8)  # fmt: skip
    torch.manual_seed(0)
    model = StarFlowModel(config).eval()
    full_size.random_output_projections(model.blocks, 64)
    layout = full_size.Layout(width=64, deep_layers=deep_layers, image_size=32)
    noise = full_size.prior_noise(layout, 4)
    return model, deep_tokens.DeepInputs.build(config, noise, words=40, seed=4, tokens=tokens)


def test_the_first_deep_tokens_are_those_of_a_whole_sequential_inverse():
    model, inputs = tiny_model_and_inputs(deep_layers=2, tokens=64)
    tokens, seconds = deep_tokens.our_deep_tokens(model, inputs)
    after_deep_block = []
    model.inverse(inputs.noise, inputs.text, inputs.negative, inputs.guidance_scale,
                  callback=lambda step, latents: after_deep_block.append(latents) if step == 0 else None)  # fmt: skip
    expected = model.patchify(after_deep_block[0]).flatten(1, 2)  # the deep block reads the tokens in raster order
    assert tokens.shape == (1, 16, 4) and seconds > 0
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_compiled_steps_decode_the_same_first_tokens_and_compile_once():
    model, inputs = tiny_model_and_inputs(deep_layers=1, tokens=6)
    eager, _ = deep_tokens.our_deep_tokens(model, inputs)
    sampler = deep_tokens.FirstDeepTokens(6, compile_mode="default", freeze_weights=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = [deep_tokens.our_deep_tokens(model, inputs, sampler)[0] for _ in range(2)]
    assert len(sampler._compiled) == 1  # one graph for the deep block, used by both calls
    for tokens in compiled:
        assert tokens.shape == (1, 6, 4)
        torch.testing.assert_close(tokens, eager, rtol=1e-5, atol=1e-5)
