"""Models at the sizes people run them: bf16 weights, int8 and int4 weight-only quantization (torchao, through
transformers' `TorchAoConfig` and diffusers' `PipelineQuantizationConfig`), for both families and every sampler."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import random_model, tiny_config
from diffusers import PipelineQuantizationConfig
from torchao.prototype.int4_opaque_tensor import Int4WeightOnlyOpaqueTensorConfig
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import BitsAndBytesConfig, TorchAoConfig

import tarflow_hf
from tarflow_hf import (
    BlockJacobiSampler,
    JacobiSampler,
    NewtonSampler,
    SequentialSampler,
    StarFlowPipeline,
    TarFlowModel,
    TarFlowPipeline,
    products,
)
from tarflow_hf.classifier import load_classifier
from tarflow_hf.layers import FlowLinear, WeightPacking
from tarflow_hf.products import (
    INT4_KERNEL_MAX_ROWS,
    INT8_KERNEL_MAX_ROWS,
    NARROW_OUTPUT_LAYERS,
    int4_cpu_matrix,
    int8_linear,
    int8_rows,
    is_quantized,
    quantized_matrix,
)

SAMPLERS = [SequentialSampler(), JacobiSampler(tolerance=1e-3), NewtonSampler(tolerance=1e-3), BlockJacobiSampler()]

linear = torch.nn.functional.linear


def int8_config() -> TorchAoConfig:
    return TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2))


def int4_config() -> TorchAoConfig:
    """torchao's int4 weight-only configuration for CPUs (groups of 32 columns), as the README gives it."""
    config = Int4WeightOnlyOpaqueTensorConfig(group_size=32)
    return TorchAoConfig(quant_type=config, modules_to_not_convert=[NARROW_OUTPUT_LAYERS])


def flow_linears(model: torch.nn.Module) -> list[FlowLinear]:
    return [module for module in model.modules() if isinstance(module, FlowLinear)]


# ------------------------------------------------------------------------------------------ the int8 kernel
@pytest.mark.parametrize("version", [1, 2])  # torchao's two layouts (1: AffineQuantizedTensor, 2: Int8Tensor)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_are_torchaos_own_and_the_kernel_computes_their_product(dtype, version):
    layer = torch.nn.Linear(64, 48).to(dtype)
    quantize_(layer, Int8WeightOnlyConfig(version=version))
    values, scale = int8_rows(layer.weight)
    assert values.dtype == torch.int8 and values.shape == (48, 64) and scale.shape == (48,)
    dequantized = layer.weight.dequantize().float()
    torch.testing.assert_close((values.to(scale.dtype) * scale[:, None]).float(), dequantized, rtol=0, atol=0)
    x = torch.randn(5, 3, 64, dtype=dtype, requires_grad=True)
    out = int8_linear(x, (values, scale), layer.bias)
    expected = torch.nn.functional.linear(x.detach().float(), dequantized, layer.bias.float())
    # bfloat16 activations inside the kernel: about 3 significant digits of the largest output
    torch.testing.assert_close(out.float(), expected, atol=1e-2 * expected.abs().max().item(), rtol=0)
    out.sum().backward()  # the score step differentiates through it
    torch.testing.assert_close(x.grad.float(), dequantized.sum(0).expand(5, 3, 64), atol=1e-2, rtol=1e-2)


def test_many_rows_run_as_a_bf16_product_of_the_converted_weight(monkeypatch):
    """A text prefix or the denoising pass (hundreds of rows) runs 2-4x faster as a bf16 product than through ATen's
    int8 kernel, which is built for a decoding step's few rows; both give the product to bf16's precision."""
    layer = torch.nn.Linear(64, 48)
    quantize_(layer, Int8WeightOnlyConfig(version=2))
    values, scale = int8_rows(layer.weight)
    dequantized = layer.weight.dequantize().float()
    kernel, kernel_rows = torch._weight_int8pack_mm, []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, *rest: kernel_rows.append(len(x)) or kernel(x, *rest))
    for rows in (INT8_KERNEL_MAX_ROWS - 1, INT8_KERNEL_MAX_ROWS, 300):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        out = int8_linear(x, (values, scale), layer.bias)
        expected = torch.nn.functional.linear(x.float(), dequantized, layer.bias.float())
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
        torch.testing.assert_close(out.float(), expected, atol=1e-2 * expected.abs().max().item(), rtol=0)
    assert kernel_rows == [INT8_KERNEL_MAX_ROWS - 1]


def test_many_int8_rows_and_their_gradient_multiply_in_float32_without_bf16_instructions(monkeypatch):
    """On a CPU without bf16 instructions the converted weight's bf16 product (a text prefix, the denoising pass)
    and the gradient's product would run ATen's scalar bf16 loop: they run in float32 on the same values."""
    monkeypatch.setattr(products, "_HALF_INSTRUCTIONS", dict.fromkeys(products.HALF_DTYPES, False))
    layer = torch.nn.Linear(64, 48)
    quantize_(layer, Int8WeightOnlyConfig(version=2))
    values, scale = int8_rows(layer.weight)
    dequantized = layer.weight.dequantize().float()
    x = torch.randn(300, 64, dtype=torch.bfloat16, requires_grad=True)
    dtypes = []
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda a, b, *rest: dtypes.append(a.dtype) or linear(a, b, *rest)
    )
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: dtypes.append(a.dtype) or matmul(a, b))
    out = int8_linear(x, (values, scale), layer.bias)
    out.float().sum().backward()
    assert dtypes == [torch.float32, torch.float32]  # the product, then the gradient's
    expected = linear(x.detach().float(), dequantized, layer.bias.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2 * expected.abs().max().item(), rtol=0)
    torch.testing.assert_close(x.grad.float(), dequantized.sum(0).expand(300, 64), atol=1e-2, rtol=1e-2)


def test_widths_the_kernel_cannot_take_stay_with_torchao():
    """ATen's kernel reads the inner dimension in blocks of 16; a 24-wide weight would come out wrong there."""
    layer = torch.nn.Linear(24, 32)
    quantize_(layer, Int8WeightOnlyConfig(version=2))
    assert int8_rows(layer.weight) is None
    assert int8_rows(torch.nn.Linear(32, 8).weight) is None  # a plain weight


# ------------------------------------------------------------------------------------------- int4 weights
def int4_layer(columns: int = 128, rows: int = 96) -> FlowLinear:
    layer = FlowLinear(columns, rows).bfloat16()
    quantize_(layer, Int4WeightOnlyOpaqueTensorConfig(group_size=32))
    assert is_quantized(layer.weight)
    return layer


def kernel_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The matrix ATen's int4 kernel multiplies by: its product with the identity (bf16, as the kernel gives it)."""
    return linear(torch.eye(weight.shape[1], dtype=torch.bfloat16), weight).T


def test_the_unpacked_int4_matrix_is_the_kernels_own():
    layer = int4_layer()
    matrix = int4_cpu_matrix(layer.weight)
    assert matrix.dtype == torch.float32 and matrix.shape == (96, 128)
    assert torch.equal(matrix.bfloat16(), kernel_matrix(layer.weight))
    assert int4_cpu_matrix(torch.nn.Linear(128, 96).weight) is None  # a plain weight


def test_an_int4_layout_it_cannot_read_back_is_never_misread(monkeypatch):
    """Only a block width whose repacking gives the stored bytes back is used; failing all, the gradient's matrix
    comes from the kernel itself (its product with the identity), still the same matrix."""
    layer = int4_layer()
    monkeypatch.setattr(products, "INT4_CPU_BLOCK_ROWS", (16,))  # not this machine's layout (64 or 32 rows)
    assert int4_cpu_matrix(layer.weight) is None
    assert torch.equal(quantized_matrix(layer.weight).bfloat16(), kernel_matrix(layer.weight))


def test_int4_products_and_their_gradient_for_the_input():
    """ATen's int4 kernel has no derivative; the score-denoising step takes one for the input, from the matrix."""
    layer = int4_layer()
    matrix = int4_cpu_matrix(layer.weight)
    for rows in (3, INT4_KERNEL_MAX_ROWS):  # the kernel, then the unpacked matrix in float32
        x = torch.randn(rows, 128, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        expected = linear(x.detach().float(), matrix, layer.bias.float())
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
        torch.testing.assert_close(out.float(), expected, atol=1e-2 * expected.abs().max().item(), rtol=0)
        out.float().sum().backward()
        torch.testing.assert_close(x.grad.float(), matrix.sum(0).expand(rows, 128), atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------- loading and sampling
@pytest.fixture(scope="module")
def tarflow_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quantization") / "tarflow"
    TarFlowPipeline(transformer=random_model(seed=4, hidden_size=64, head_dim=16)).save_pretrained(folder)
    return folder


def test_an_int8_model_loads_every_weight_from_the_file_and_samples(tarflow_folder):
    plain = TarFlowModel.from_pretrained(tarflow_folder, subfolder="transformer")
    model = TarFlowModel.from_pretrained(tarflow_folder, subfolder="transformer", quantization_config=int8_config())
    by_hand = copy.deepcopy(plain)
    quantize_(by_hand, Int8WeightOnlyConfig(version=2), filter_fn=lambda module, name: isinstance(module, FlowLinear))
    for (name, mine), theirs in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        if hasattr(mine, "dequantize"):  # every weight came from the file, quantized as torchao does it
            torch.testing.assert_close(mine.dequantize(), theirs.dequantize(), rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    quantized = [layer for layer in flow_linears(model) if hasattr(layer.weight, "dequantize")]
    assert len(quantized) >= len(flow_linears(model)) - 1  # all but the first block's input projection
    assert not WeightPacking(model).layers  # packing steps aside for quantized weights
    noise = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0))
    for sampler in SAMPLERS:
        exact = plain.inverse(noise, [0, 1, 2, 0], guidance_scale=2.0, sampler=sampler)
        images = model.inverse(noise, [0, 1, 2, 0], guidance_scale=2.0, sampler=sampler)
        assert torch.isfinite(images).all() and (images - exact).abs().mean() < 0.05, sampler


def test_an_int4_model_loads_every_weight_from_the_file_samples_and_denoises(tarflow_folder):
    """torchao's CPU int4 layout through transformers' `TorchAoConfig`: every weight torchao's own quantization of the
    file's, every sampler near the float32 samples, and the score-denoising step's gradient through the kernel."""
    plain = TarFlowModel.from_pretrained(tarflow_folder, subfolder="transformer")
    options = dict(subfolder="transformer", dtype=torch.bfloat16)  # the int4 kernel's fast path: bf16 activations
    model = TarFlowModel.from_pretrained(tarflow_folder, **options, quantization_config=int4_config())
    by_hand = TarFlowModel.from_pretrained(tarflow_folder, **options)
    narrow = re.compile(NARROW_OUTPUT_LAYERS)
    quantize_(by_hand, Int4WeightOnlyOpaqueTensorConfig(group_size=32),
              filter_fn=lambda module, name: isinstance(module, FlowLinear) and not narrow.match(name))  # fmt: skip
    for (name, mine), theirs in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        if is_quantized(mine):
            assert torch.equal(int4_cpu_matrix(mine), int4_cpu_matrix(theirs)), name
        else:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    int4 = [
        name for name, layer in model.named_modules() if isinstance(layer, FlowLinear) and is_quantized(layer.weight)
    ]
    assert len(int4) == 4 * model.config.num_blocks * model.config.layers_per_block  # qkv, proj, fc1, fc2 of each
    noise = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(0))
    for sampler in SAMPLERS:
        exact = plain.inverse(noise, [0, 1, 2, 0], guidance_scale=2.0, sampler=sampler)
        images = model.inverse(noise, [0, 1, 2, 0], guidance_scale=2.0, sampler=sampler)
        assert torch.isfinite(images).all() and (images - exact).abs().mean() < 0.1, sampler
    denoised = model.denoise(exact, [0, 1, 2, 0])
    expected = plain.denoise(exact, [0, 1, 2, 0])
    step = (expected - exact).abs().mean()
    assert step > 0 and (denoised - expected).abs().mean() < 0.2 * step


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_stay_half_and_every_sampler_runs(tarflow_folder, dtype):
    pipe = TarFlowPipeline.from_pretrained(tarflow_folder, dtype=dtype)
    reference = TarFlowPipeline.from_pretrained(tarflow_folder)
    assert {parameter.dtype for parameter in pipe.transformer.parameters()} == {dtype}
    noise = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(1))
    for sampler in SAMPLERS:
        kwargs = dict(class_labels=[0, 1, 2, 0], latents=noise, guidance_scale=2.0, sampler=sampler)
        raw = pipe(**kwargs, output_type="latent").images
        assert raw.dtype == torch.float32  # the trajectory and the guidance stay in float32
        error = (raw - reference(**kwargs, output_type="latent").images).abs().mean()
        assert error < 0.05, (sampler, error)


def test_pipeline_quantization_configs_quantize_the_transformer(tarflow_folder):
    config = PipelineQuantizationConfig(quant_mapping={"transformer": int8_config()})
    pipe = TarFlowPipeline.from_pretrained(tarflow_folder, quantization_config=config)
    assert sum(int8_rows(layer.weight) is not None for layer in flow_linears(pipe.transformer)) >= 8
    assert pipe(class_labels=[1], output_type="pt").images.isfinite().all()
    config = PipelineQuantizationConfig(quant_mapping={"transformer": int4_config()})
    pipe = TarFlowPipeline.from_pretrained(tarflow_folder, quantization_config=config, dtype=torch.bfloat16)
    assert sum(int4_cpu_matrix(layer.weight) is not None for layer in flow_linears(pipe.transformer)) >= 8
    assert pipe(class_labels=[1], output_type="pt").images.isfinite().all()  # denoised: a gradient through int4


def test_starflow_samples_with_bf16_int8_int4_and_bitsandbytes_weights():
    from test_pipeline_starflow import make_pipe, reference

    _, _, expected = reference()
    arguments = dict(prompt_embeds=expected["y_cond"], negative_prompt_embeds=expected["y_neg"],
                     latents=expected["noise"], guidance_scale=3.0, output_type="latent")  # fmt: skip
    exact = make_pipe()(**arguments).images
    with tempfile.TemporaryDirectory() as folder:
        make_pipe().save_pretrained(folder)
        int8, int4 = (
            PipelineQuantizationConfig(quant_mapping={"transformer": c()}) for c in (int8_config, int4_config)
        )
        bnb = PipelineQuantizationConfig(quant_mapping={"transformer": BitsAndBytesConfig(load_in_8bit=True)})
        for quantization in (None, int8, int4, bnb):
            options = dict(dtype=torch.bfloat16, quantization_config=quantization)
            pipe = StarFlowPipeline.from_pretrained(folder, **options)
            pipe.set_progress_bar_config(disable=True)
            unpacked = [int4_cpu_matrix(layer.weight) is not None for layer in flow_linears(pipe.transformer)]
            assert any(unpacked) == (quantization is int4)
            for sampler in (SequentialSampler(), JacobiSampler(tolerance=1e-2, sequential_blocks=1)):
                latents = pipe(**arguments, sampler=sampler).images
                assert (latents - exact).abs().max() < 0.1 * exact.abs().max(), (options, sampler)


def test_the_bundled_model_draws_recognisable_digits_in_bf16_int8_int4_and_bitsandbytes():
    """The bundled model's digits judged by the independent classifier: bf16, int8, int4 and bitsandbytes weights as
    good as float32 on the same 100 seeds (the benchmark's 1,000-sample figures: docs/benchmarks.md)."""
    classifier = load_classifier(tarflow_hf.BUNDLED_CLASSIFIER)
    labels = torch.arange(10).repeat_interleave(10)

    def accuracy(pipe: TarFlowPipeline) -> float:
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(seed) for seed in range(len(labels))]
        images = pipe(class_labels=labels.tolist(), generator=generators, output_type="pt").images
        return (classifier.predict((images * 255).round() / 127.5 - 1) == labels).float().mean().item()

    float32 = accuracy(TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL))
    bf16 = torch.bfloat16
    bfloat16 = accuracy(TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL, dtype=bf16))
    config = PipelineQuantizationConfig(quant_mapping={"transformer": int8_config()})
    int8 = accuracy(TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL, quantization_config=config))
    config = PipelineQuantizationConfig(quant_mapping={"transformer": int4_config()})
    int4 = accuracy(TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL, quantization_config=config, dtype=bf16))
    formats = dict(bfloat16=bfloat16, int8=int8, int4=int4)
    for name, bnb_config in bitsandbytes_configs().items():  # bitsandbytes' own layers (its CPU backend)
        config = PipelineQuantizationConfig(quant_mapping={"transformer": bnb_config})
        pipe = TarFlowPipeline.from_pretrained(tarflow_hf.BUNDLED_MODEL, quantization_config=config)
        layers = [module for module in pipe.transformer.modules() if isinstance(module, torch.nn.Linear)]
        replaced = [module for module in layers if type(module).__module__.startswith("bitsandbytes")]
        assert len(replaced) >= len(layers) - 1, name  # all but the one transformers keeps (the last)
        formats[name] = accuracy(pipe)
    assert float32 >= 0.97 and min(formats.values()) >= float32 - 0.02, (float32, formats)


def bitsandbytes_configs() -> dict[str, BitsAndBytesConfig]:
    return {
        "bitsandbytes_int8": BitsAndBytesConfig(load_in_8bit=True),
        "bitsandbytes_fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    }


def test_bitsandbytes_replaces_the_flow_layers_and_the_score_step_differentiates(tarflow_folder):
    """bitsandbytes' transformers integration replaces only layers whose type is exactly `nn.Linear`; the models
    build theirs so under its config (else every weight loaded unquantized, silently), and the inputs go to them in
    the compute dtype (not the int8 weight's)."""
    plain = TarFlowModel.from_pretrained(tarflow_folder, subfolder="transformer")
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(2))
    exact = plain.inverse(noise, [0, 1], guidance_scale=2.0)
    for name, config in bitsandbytes_configs().items():
        model = TarFlowModel.from_pretrained(tarflow_folder, subfolder="transformer", quantization_config=config)
        assert not any(isinstance(module, FlowLinear) for module in model.modules()), name
        images = model.inverse(noise, [0, 1], guidance_scale=2.0)
        assert (images - exact).abs().mean() < 0.1, name
        step = (plain.denoise(exact, [0, 1]) - exact).abs().mean()
        assert (model.denoise(exact, [0, 1]) - plain.denoise(exact, [0, 1])).abs().mean() < 0.3 * step, name
    assert any(isinstance(module, FlowLinear) for module in TarFlowModel(plain.config).modules())  # outside loading


MEMORY_PROBE = """
import sys, threading, time, torch
from tarflow_hf import TarFlowModel, TarFlowPipeline

def anonymous_mb():  # the process's own memory; pages of the memory-mapped file are the page cache's
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))

peak, done = [anonymous_mb()], threading.Event()
def watch():
    while not done.is_set():
        peak.append(anonymous_mb())
        time.sleep(0.001)

baseline = anonymous_mb()
watcher = threading.Thread(target=watch)
watcher.start()
how, folder = sys.argv[1], sys.argv[2]
if how == "model":
    model = TarFlowModel.from_pretrained(folder + "/transformer", dtype=torch.bfloat16)
elif how == "pipeline":
    model = TarFlowPipeline.from_pretrained(folder, dtype=torch.bfloat16).transformer
else:
    model = TarFlowPipeline.from_pretrained(folder).to(torch.bfloat16).transformer
done.set()
watcher.join()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
dtypes = {str(p.dtype) for p in model.parameters()}
print(weights, max(peak) - baseline, *dtypes)
"""


@pytest.mark.parametrize("how", ["model", "pipeline", "pipeline.to"])
def test_bf16_loading_never_holds_the_weights_in_float32(tmp_path, how):
    """A float32 folder loaded as bf16 (`dtype=` to `from_pretrained`, or `pipe.to(torch.bfloat16)` after a float32
    load) peaks at the bf16 weights' size in the process's own memory, not the float32 copy's twice that size: the
    float32 file is memory-mapped (page cache) and converted tensor by tensor. Measured in a fresh process."""
    import subprocess
    import sys

    config = tiny_config(image_size=32, num_channels=3, patch_size=4, hidden_size=512, num_blocks=4, layers_per_block=3)
    TarFlowPipeline(transformer=TarFlowModel(config)).save_pretrained(tmp_path / "pipe")
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, how, str(tmp_path / "pipe")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    weights, peak, dtype = done.stdout.split()
    assert dtype == "torch.bfloat16" and float(weights) > 30
    assert float(peak) <= 1.2 * float(weights) + 8, f"peak {peak} MB for {weights} MB of bf16 weights"
