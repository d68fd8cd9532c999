"""The layers shared by both families: eager and SDPA attention agree, windows after a cache are causal."""

import pytest
import torch
from conftest import random_model

from tarflow_hf import TarFlowModel
from tarflow_hf.layers import causal_attention


@pytest.mark.parametrize(("queries", "keys"), [(7, 7), (3, 10), (1, 5)])
def test_eager_and_sdpa_agree(queries, keys):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=generator) for n in (queries, keys, keys))
    fused, _ = causal_attention(q, k, v, "sdpa")
    eager, weights = causal_attention(q, k, v, "eager", output_attentions=True)
    torch.testing.assert_close(eager, fused, atol=1e-6, rtol=0)
    # Query i sits at position keys - queries + i and sees nothing after it.
    future = torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1)
    assert weights[..., future].abs().max() == 0 if future.any() else True
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, queries))


def test_models_run_eager_attention_when_asked(tmp_path):
    model = random_model(num_blocks=2, layers_per_block=2)
    model.save_pretrained(tmp_path)
    eager = TarFlowModel.from_pretrained(tmp_path, attn_implementation="eager")
    fused = TarFlowModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and fused.config._attn_implementation == "sdpa"
    x, labels = torch.rand(3, 1, 8, 8) * 2 - 1, [0, 1, 2]
    out = eager(x, labels, output_attentions=True)
    torch.testing.assert_close(out.latents, fused(x, labels).latents, atol=1e-6, rtol=0)
    assert len(out.attentions) == 4 and out.attentions[0].shape == (3, 2, 16, 16)
    noise = torch.randn(2, 16, 4)
    torch.testing.assert_close(eager.inverse(noise, [0, 1], 2.0), fused.inverse(noise, [0, 1], 2.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output_attentions=True needs the eager attention implementation"):
        fused(x, labels, output_attentions=True)
    with pytest.raises(ValueError, match="bogus"):
        TarFlowModel.from_pretrained(tmp_path, attn_implementation="bogus")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model(num_blocks=2, layers_per_block=2).train()
    x, labels = torch.rand(2, 1, 8, 8) * 2 - 1, [0, 1]
    model(x, labels).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for block in model.blocks for layer in block.layers)
    model(x, labels).loss.backward()
    for expected, parameter in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected, atol=1e-6, rtol=0)
