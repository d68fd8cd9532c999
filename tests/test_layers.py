"""The layers shared by both families: eager and SDPA attention agree, windows after a cache are causal, packed
weights give plain `nn.Linear` results and only where they should."""

import contextlib
import threading

import pytest
import torch
from conftest import random_model
from torch.utils._python_dispatch import TorchDispatchMode

from tarflow_hf import TarFlowModel, layers
from tarflow_hf import products as routes
from tarflow_hf.layers import (
    FlowLinear,
    WeightPacking,
    causal_attention,
)
from tarflow_hf.products import NATIVE_HALF_MAX_ROWS, weight_packing_available


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
    # Asked for the weights, the SDPA model computes them with the explicit softmax for the call, as transformers
    # falls back to eager: the same weights; and it switches for good with `set_attn_implementation`.
    for asked, expected in zip(fused(x, labels, output_attentions=True).attentions, out.attentions, strict=True):
        torch.testing.assert_close(asked, expected, atol=1e-6, rtol=0)
    assert fused(x, labels).attentions is None and fused.config._attn_implementation == "sdpa"
    fused.set_attn_implementation("eager")
    assert fused.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="bogus"):
        TarFlowModel.from_pretrained(tmp_path, attn_implementation="bogus")


def set_checkpointing(model: torch.nn.Module, on: bool = True) -> None:
    """transformers' switch under its current name, the old one where the installed release predates it."""
    action = "enable" if on else "disable"
    switch = getattr(model, f"activation_checkpointing_{action}", None)
    (switch or getattr(model, f"gradient_checkpointing_{action}"))()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model(num_blocks=2, layers_per_block=2).train()
    x, labels = torch.rand(2, 1, 8, 8) * 2 - 1, [0, 1]
    model(x, labels).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    set_checkpointing(model)
    assert all(layer.gradient_checkpointing for block in model.blocks for layer in block.layers)
    model(x, labels).loss.backward()
    for expected, parameter in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- weight packing
def packing_layer(in_features: int = 96, out_features: int = 160) -> FlowLinear:
    torch.manual_seed(0)
    return FlowLinear(in_features, out_features)


def test_packed_linear_agrees_with_nn_linear_and_packs_on_the_second_call():
    layer, x = packing_layer(), torch.randn(8, 1, 96)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad(), WeightPacking(layer) as packing:
        first = layer(x)
        assert not packing.packed  # a row count seen once is not worth packing
        second, third = layer(x), layer(x)
        assert len(packing.packed) == (1 if weight_packing_available() else 0)
        assert packing.packed_bytes >= (layer.weight.numel() * 4 if weight_packing_available() else 0)
        layer(torch.randn(3, 96))  # another row count: seen once, not packed
        assert len(packing.packed) == (1 if weight_packing_available() else 0)
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    torch.testing.assert_close(second, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(third, second, atol=0, rtol=0)
    assert second.shape == (8, 1, 160)
    # Leaving the context drops the packings and restores plain layers.
    assert layers.active_packing() is None and not packing.packed and packing.packed_bytes == 0


def test_bf16_weights_are_packed_by_onednn_with_the_same_products():
    """bfloat16 weights take oneDNN's pre-packed product where the CPU has bfloat16 instructions (this machine and
    CI's do): the very numbers `addmm` gives, from the second call on."""
    layer, x = packing_layer().to(torch.bfloat16), torch.randn(2, 1, 96, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad(), WeightPacking(layer) as packing:
        outs = [layer(x) for _ in range(3)]
        assert len(packing.packed) == (1 if routes.bf16_packing_available() else 0)
        assert all(packed.is_mkldnn for packed in packing.packed.values())
    for out in outs:
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert routes.bf16_packing_available() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_torch_here_has_mkl_packing():
    """The speed-up needs MKL (x86 Linux/Windows wheels); the CI machine's torch has it, so the packed path above is
    really exercised there. Elsewhere (Apple silicon) the layers stay plain, which the test above also covers."""
    assert weight_packing_available() == (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear"))
    if torch.backends.mkl.is_available():
        assert weight_packing_available()


def test_packing_leaves_training_autocast_and_other_dtypes_alone():
    layer, x = packing_layer(), torch.randn(4, 96)
    with WeightPacking(layer) as packing:
        for _ in range(3):
            out = layer(x)  # gradients enabled: the training path
        assert out.requires_grad and not packing.packed
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):
                out = layer(x)
        assert out.dtype == torch.bfloat16 and not packing.packed
    double = packing_layer().double()
    with torch.no_grad(), WeightPacking(double) as packing:
        for _ in range(3):
            double(x.double())
        assert not packing.layers and not packing.packed


def test_packing_respects_its_budget_and_nests():
    layer, x = packing_layer(), torch.randn(8, 96)
    with torch.no_grad(), WeightPacking(layer, budget_bytes=0) as packing:
        outs = [layer(x) for _ in range(3)]
        assert not packing.packed and packing.packed_bytes == 0
    torch.testing.assert_close(outs[-1], torch.nn.functional.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    # A nested packing serves its own block while it is open, and its exit gives the thread back the outer one.
    with torch.no_grad(), WeightPacking(layer) as outer:
        with WeightPacking(layer) as inner:
            assert layers.active_packing() is (inner if weight_packing_available() else None)
        assert layers.active_packing() is (outer if weight_packing_available() else None)
    assert layers.active_packing() is None


def test_samplers_run_on_packed_weights_and_give_the_same_samples(monkeypatch):
    """`invert_block` packs each block's weights while it decodes; the samples agree with plain `addmm` (budget 0,
    the documented switch) to float32 rounding, and no layer stays packed afterwards."""
    model = random_model(num_blocks=2, layers_per_block=2).eval()
    packed_counts = []
    model.blocks[0].layers[0].attention.qkv.register_forward_pre_hook(
        lambda module, args: packed_counts.append(len(layers.active_packing().packed) if layers.active_packing() else 0)
    )
    noise, labels = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0)), [0, 1, 2]
    with torch.no_grad():
        packed = model.inverse(noise, labels, 2.0)
        assert (max(packed_counts) > 0) == weight_packing_available()
        packed_counts.clear()
        monkeypatch.setattr(layers, "PACKING_BUDGET_BYTES", 0)
        plain = model.inverse(noise, labels, 2.0)
        assert packed_counts and max(packed_counts) == 0
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert layers.active_packing() is None


def test_concurrent_samplers_compute_exactly_what_they_compute_alone():
    """Four threads sampling from one model at once (a Space serving several visitors): each gets, bit for bit,
    the samples it gets alone, whatever the others do meanwhile (each call packs for itself: a shared packing made
    a call's products depend on which row counts the other calls had packed), and no packing is left behind."""
    model = random_model(num_blocks=2, layers_per_block=2, hidden_size=64).eval()
    noises = [torch.randn(2 + i, 16, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        alone = [model.inverse(noise, [0] * len(noise), 2.0) for noise in noises]
    together = [[] for _ in noises]
    start = threading.Barrier(len(noises))

    def sample(i: int) -> None:
        start.wait()
        with torch.no_grad():
            for _ in range(4):
                together[i].append(model.inverse(noises[i], [0] * len(noises[i]), 2.0))

    threads = [threading.Thread(target=sample, args=(i,)) for i in range(len(noises))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, solo in zip(together, alone, strict=True):
        for sample_ in mine:
            torch.testing.assert_close(sample_, solo, atol=0, rtol=0)
    assert layers.active_packing() is None


# ------------------------------------------------------------------------------------------ checkpointed layers
def saved_bytes_of_denoising(
    model: torch.nn.Module, images: torch.Tensor, labels: list[int]
) -> tuple[int, torch.Tensor]:
    """(bytes autograd keeps for the denoising step's backward, the denoised images)."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        denoised = model.denoise(images, labels)
    return sum(saved), denoised


def test_the_denoising_step_recomputes_each_layer_instead_of_keeping_its_activations(monkeypatch):
    """The score step's backward recomputes each transformer layer (the released STARFlow's attention activations
    took more memory than its bf16 weights): far fewer bytes kept, the same gradient, and the layers' own
    checkpointing settings (a user's, for training) as they were."""
    model = random_model(num_blocks=2, layers_per_block=3)
    set_checkpointing(model)  # a user's setting for training, which the step must leave as it was
    images = torch.rand(2, 1, 8, 8)
    kept, denoised = saved_bytes_of_denoising(model, images, [0, 1])
    layer = model.blocks[0].layers[0]
    assert layer.gradient_checkpointing and not layer.training and layer._gradient_checkpointing_func is not None
    monkeypatch.setattr("tarflow_hf.modeling_tarflow.checkpointed_layers", lambda model: contextlib.nullcontext())
    set_checkpointing(model, on=False)
    kept_without, denoised_without = saved_bytes_of_denoising(model, images, [0, 1])
    assert kept < kept_without / 3
    torch.testing.assert_close(denoised, denoised_without, rtol=0, atol=0)


def test_a_half_precision_decoding_step_attends_as_the_fused_kernel_does(monkeypatch):
    """One bf16 query row over cached keys (a slice of a longer cache, as the sampler reads it) runs as two plain
    products on a CPU with bf16 instructions: the fused kernel's result to bf16's rounding, a visibility mask
    honoured, and under autocast the fused kernel itself (Apple's bf16 samples). Without them the fused kernel is the
    faster and stays."""
    monkeypatch.setattr(
        routes, "_HALF_INSTRUCTIONS", dict.fromkeys(routes.HALF_DTYPES, True)
    )  # where the two products are taken
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 1, 16, generator=generator).bfloat16()
    cache = torch.randn(2, 2, 4, 32, 16, generator=generator).bfloat16()
    key, value = cache[0, :, :, :20], cache[1, :, :, :20]
    fused = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float())
    out, _ = causal_attention(query, key, value)
    torch.testing.assert_close(out.float(), fused, atol=2e-2, rtol=0)
    visible = torch.arange(32) <= 19  # a static cache: the first 20 positions of 32
    masked, _ = causal_attention(query, cache[0], cache[1], visible=visible[None])
    torch.testing.assert_close(masked, out, atol=1e-2, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = causal_attention(query, key, value)
    assert torch.equal(autocast, torch.nn.functional.scaled_dot_product_attention(query, key, value))


# ----------------------------------------------------------------------- half precision without its instructions
class Products(TorchDispatchMode):
    """The matrix products that run (backward ones too): (operator, operand dtypes, rows of the first operand)."""

    NAMES = ("mm", "addmm", "bmm", "baddbmm", "_weight_int8pack_mm")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.NAMES or "scaled_dot_product" in name:
            tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
            self.seen.append((name, tuple(tensor.dtype for tensor in tensors), tensors[-2].shape[-2]))
        return func(*args, **(kwargs or {}))


def without_half_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "_HALF_INSTRUCTIONS", dict.fromkeys(routes.HALF_DTYPES, False))


def test_half_precision_products_run_in_float32_on_a_cpu_without_half_instructions(monkeypatch):
    """A CPU without bf16 instructions (AVX2 only) runs ATen's bf16 product as a scalar loop: 6x float32's time at
    1152 rows, 300x for a gradient's product. There, past a decoding step's few rows and in every backward, the
    products run in float32 on the same bf16 values (the numbers a bf16 product gives, which accumulates in float32),
    and the backward keeps only the bf16 tensors."""
    without_half_instructions(monkeypatch)
    layer = FlowLinear(64, 48).bfloat16()
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with Products() as products:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x)
        out.float().square().sum().backward()
    assert products.seen and all(set(dtypes) == {torch.float32} for _, dtypes, _ in products.seen), products.seen
    assert saved and all(tensor.dtype == torch.bfloat16 for tensor in saved)  # no float32 copy of the weight kept
    weight, bias = (p.detach().double() for p in (layer.weight, layer.bias))
    expected = torch.nn.functional.linear(x.detach().double(), weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=2**-8)  # within bf16's rounding of the result
    upstream = 2 * out.detach().double()
    torch.testing.assert_close(x.grad.double(), upstream @ weight, atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(layer.weight.grad.double(), upstream.T @ x.detach().double(), atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(layer.bias.grad.double(), upstream.sum(0), atol=1e-2, rtol=2**-7)
    with Products() as few, torch.no_grad():  # a decoding step: ATen's kernel reads the weight as it lies
        layer(x[:NATIVE_HALF_MAX_ROWS])
    assert [dtypes for _, dtypes, _ in few.seen] == [(torch.bfloat16,) * 3]


def test_a_cpu_with_half_instructions_keeps_half_products(monkeypatch):
    monkeypatch.setattr(routes, "_HALF_INSTRUCTIONS", dict.fromkeys(routes.HALF_DTYPES, True))
    layer = FlowLinear(64, 48).bfloat16()
    with Products() as products:
        layer(torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    assert products.seen and all(set(dtypes) == {torch.bfloat16} for _, dtypes, _ in products.seen)


def test_a_bf16_denoising_step_without_half_instructions_multiplies_in_float32(monkeypatch):
    """The score step of a bf16 model (forward, recomputation and backward over every position) on such a CPU: no
    bf16 product of more than a decoding step's rows, attention included, and the step's result as with bf16
    products, to bf16's precision."""
    model = random_model(num_blocks=2, layers_per_block=2).to(torch.bfloat16)
    images, labels = torch.rand(2, 1, 8, 8), [0, 1]
    native = model.denoise(images, labels)
    without_half_instructions(monkeypatch)
    with Products() as products:
        denoised = model.denoise(images, labels)
    half = [(name, rows) for name, dtypes, rows in products.seen if torch.bfloat16 in dtypes]
    assert not [entry for entry in half if entry[1] > NATIVE_HALF_MAX_ROWS], half
    assert any("scaled_dot_product" in name for name, _, _ in products.seen)
    torch.testing.assert_close(denoised.float(), native.float(), atol=3e-2, rtol=0)
