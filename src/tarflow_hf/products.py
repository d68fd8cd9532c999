"""How a linear layer's matrix product runs on this machine: which packed products the CPU has, half-precision
weights on CPUs without half-precision instructions (their products computed in float32), and quantized weights
(torchao's int8 weight-only rows through ATen's int8 kernel; any quantized weight, such as torchao's CPU int4 layout,
with a gradient for its input, which the score-denoising step takes). `layers.FlowLinear` routes through these.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def weight_packing_available() -> bool:
    """MKL's packed matrix product is in torch builds with MKL (x86 Linux and Windows wheels), not on Apple
    silicon."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def bf16_packing_available() -> bool:
    """oneDNN's pre-packed bfloat16 product: x86 CPUs with bfloat16 instructions (AVX-512 BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


HALF_DTYPES = (torch.bfloat16, torch.float16)
# Rows up to which a half-precision product stays on ATen's own kernel on a CPU that `half_products_native` says
# lacks the instructions: that kernel reads the weight in its own dtype (the fastest for a decoding step's few
# rows) but computes in a scalar loop, so from about 24 rows on, converting to float32 wins (3.7x at 160 rows, 6.7x at
# 1152, 167x for a gradient's product with the weight on 32 rows: a 3072-wide layer, 2-core AVX2 EPYC,
# `benchmarks.half_products`).
NATIVE_HALF_MAX_ROWS = 16


def _half_instructions() -> dict[torch.dtype, bool]:
    fp16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return {torch.bfloat16: bool(bf16_packing_available()), torch.float16: bool(fp16)}


# Read once (compiled code reads the table, which its tracer cannot call the checks to make).
_HALF_INSTRUCTIONS = _half_instructions()


def half_products_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices with instructions made for them (oneDNN: AVX-512 for bfloat16,
    AVX-512 FP16 or AMX for float16); always True for float32 and float64."""
    return _HALF_INSTRUCTIONS.get(dtype, True)


def products_in_float32(x: torch.Tensor) -> bool:
    """Half-precision CPU tensors on a CPU without half-precision products (not under autocast, which keeps its own
    arithmetic: Apple's): their matrix products are computed in float32 and rounded back, the same numbers a
    native half-precision product gives (it accumulates in float32) up to the order of the sums."""
    return (
        x.dtype in HALF_DTYPES
        and x.is_cpu
        and not half_products_native(x.dtype)
        and not torch.is_autocast_enabled("cpu")
    )


def _half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias on a CPU without half-precision products: ATen's kernel for a few rows, float32 above."""
    if x.numel() // max(x.shape[-1], 1) <= NATIVE_HALF_MAX_ROWS:
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


class _HalfLinearInFloat32(torch.autograd.Function):
    """`_half_linear` with its gradients computed in float32 too (a gradient's product with the weight has as many
    rows as the forward's); it saves the half-precision tensors, so a backward never keeps a float32 weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return _half_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (flat @ weight.float()).to(grad.dtype).reshape(*grad.shape[:-1], weight.shape[1])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (flat.T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        grad_bias = flat.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def half_linear_in_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for half-precision tensors on a CPU where `products_in_float32` holds."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors):
        return _HalfLinearInFloat32.apply(x, weight, bias)
    return _half_linear(x, weight, bias)


# ATen's CPU int8 weight-only kernel (`torch._weight_int8pack_mm`) needs the inner dimension in multiples of this.
INT8_KERNEL_BLOCK = 16
# Rows from which the int8 product runs as a bfloat16 matrix product on the weight converted to bfloat16 (scaled
# after): the kernel is built for a few rows (a decoding step's) and its time grows with the rows, about 2.4x the
# converted product's at 256 rows (a text prefix) and 3.6x at 1152 (the denoising step's pass), while the conversion
# costs one pass over the weight, which the kernel beats below about 64 rows (3072-wide layers, 2-core EPYC).
INT8_KERNEL_MAX_ROWS = 64


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 matrix, per-row scales) of a weight quantized to int8 per output row (torchao's int8 weight-only
    configuration), or None for any other weight. Read from the tensor's own storage, without a copy, and checked
    against its `dequantize()`, so a layout this code does not know is simply not used."""
    if not is_quantized(weight) or not hasattr(weight, "dequantize"):
        return None
    if weight.dim() != 2 or weight.shape[1] % INT8_KERNEL_BLOCK:
        return None  # the kernel reads the inner dimension in blocks of 16: other widths give wrong results
    for holder in (weight, getattr(weight, "tensor_impl", None)):
        values = next((getattr(holder, name) for name in ("qdata", "int_data") if hasattr(holder, name)), None)
        scale = getattr(holder, "scale", None)
        if values is None or scale is None or values.dtype != torch.int8 or values.shape != weight.shape:
            continue
        scale = scale.reshape(-1)
        dequantized = values.to(scale.dtype) * scale[:, None]
        if scale.numel() == weight.shape[0] and torch.equal(dequantized, weight.dequantize()):
            return values, scale
    return None


class _Int8WeightLinear(torch.autograd.Function):
    """x @ (int8 * scale).T with ATen's int8 weight-only kernel (from `INT8_KERNEL_MAX_ROWS` rows on, as a bfloat16
    product with the converted weight); its gradient for x (the score-denoising step takes one) from the dequantized
    weight. The weight itself is frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, scale)
        # The kernel's fast path on CPU takes bfloat16 activations (float32 ones run about 20x slower).
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if flat.shape[0] < INT8_KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(flat, values, scale.to(torch.bfloat16))
        elif products_in_float32(flat):  # (x @ int8.T) * scale: each output column has its row's scale
            out = F.linear(flat.float(), values.float()) * scale.to(torch.bfloat16).float()
        else:
            out = F.linear(flat, values.to(torch.bfloat16)) * scale.to(torch.bfloat16)
        return out.to(x.dtype).reshape(*x.shape[:-1], values.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        values, scale = ctx.saved_tensors
        if products_in_float32(grad):
            return (grad.float() @ (values.float() * scale[:, None].float())).to(grad.dtype), None, None
        return grad @ (values.to(grad.dtype) * scale[:, None].to(grad.dtype)), None, None


def int8_linear(x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (int8 * scale).T + bias, through ATen's int8 weight-only kernel."""
    out = _Int8WeightLinear.apply(x, *rows)
    return out if bias is None else out + bias.to(out.dtype)


# ------------------------------------------------------------------------------------- other quantized weights
# Output rows that ATen's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`, torchao's `Int4OpaqueTensor`)
# interleaves, two 4-bit values a byte: it depends on the CPU's vector width (32 with AVX2), so each is tried.
INT4_CPU_BLOCK_ROWS = (64, 32, 16)
# Rows from which a CPU int4 weight's product runs on its unpacked matrix in float32: ATen's int4 kernel is built for
# a decoding step's few rows and its time grows with them (1.7x the unpacked product's at 1152 rows, the denoising
# pass; 0.4x at 64: a 3072-wide layer, 2-core AVX2 EPYC).
INT4_KERNEL_MAX_ROWS = 256
INT4_MIDPOINT = 8  # tinygemm's 4-bit values are unsigned: weight = (value - 8) * scale + zero, per group of columns
# The layers that layout cannot hold (it takes output widths in multiples of 16): the flows' output projections,
# 8 wide in STARFlow and in small TarFlows. For `TorchAoConfig(..., modules_to_not_convert=[NARROW_OUTPUT_LAYERS])`.
NARROW_OUTPUT_LAYERS = r"blocks\.\d+\.proj_out"


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight held as a tensor subclass (torchao's quantized tensors), not a plain tensor or parameter."""
    return type(weight) not in (nn.Parameter, torch.Tensor)


def int4_cpu_matrix(weight: torch.Tensor) -> torch.Tensor | None:
    """The float32 (out, in) matrix of a weight in ATen's CPU int4 layout, unpacked from the tensor's own bytes, or
    None for any other weight. The layout is accepted only where repacking its first block of rows gives the stored
    bytes back (packing is one-to-one), so a layout this code does not know is never misread."""
    qdata, scale_and_zero = getattr(weight, "qdata", None), getattr(weight, "scale_and_zero", None)
    rows, columns = weight.shape if weight.dim() == 2 else (0, 0)
    if qdata is None or scale_and_zero is None or qdata.dtype != torch.uint8 or qdata.shape != (rows, columns // 2):
        return None
    groups = scale_and_zero.shape[0]  # (groups, rows, 2): each group's scale and zero, per output row
    if scale_and_zero.shape != (groups, rows, 2) or columns % groups:
        return None
    packed = qdata.reshape(-1)
    for block in INT4_CPU_BLOCK_ROWS:
        if rows % block:
            continue
        # (row blocks, columns, block / 2) bytes: low nibbles hold a block's first half of rows, high ones the rest
        nibbles = packed.reshape(rows // block, columns, block // 2)
        values = torch.cat([nibbles & 15, nibbles >> 4], dim=2).transpose(1, 2).reshape(rows, columns)
        repacked = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values[:block].to(torch.int32), 1)
        if torch.equal(repacked.reshape(-1), packed[: block * columns // 2]):
            scale, zero = (scale_and_zero[..., i].T.float().repeat_interleave(columns // groups, 1) for i in (0, 1))
            return (values.float() - INT4_MIDPOINT) * scale + zero
    return None


def quantized_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix a quantized weight stands for: unpacked (`int4_cpu_matrix`), torchao's `dequantize()`,
    or, for a layout with neither, the weight's own product with the identity (exact, but a product of as many rows
    as the weight has columns)."""
    if (matrix := int4_cpu_matrix(weight)) is not None:
        return matrix
    with contextlib.suppress(NotImplementedError):
        return weight.dequantize()
    identity = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    return F.linear(identity, weight).T


class _QuantizedWeightLinear(torch.autograd.Function):
    """x @ W.T through the quantized weight's own product, with the gradient for x from `quantized_matrix`: kernels
    such as ATen's CPU int4 one have no derivative. The weight is frozen; the matrix exists during the backward
    only (one layer's at a time)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        matrix = quantized_matrix(ctx.weight)
        if products_in_float32(grad):
            return (grad.float() @ matrix.float()).to(grad.dtype), None
        return grad @ matrix.to(grad.dtype), None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias for a quantized weight (`is_quantized`), differentiable for x whatever its kernel. From
    `INT4_KERNEL_MAX_ROWS` rows on, a CPU int4 weight's product runs in float32 on its unpacked matrix."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows >= INT4_KERNEL_MAX_ROWS and x.is_cpu and (matrix := int4_cpu_matrix(weight)) is not None:
        return F.linear(x.float(), matrix, None if bias is None else bias.float()).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        out = _QuantizedWeightLinear.apply(x, weight)
        return out if bias is None else out + bias.to(out.dtype)
    return F.linear(x, weight, bias)


__all__ = [
    "HALF_DTYPES",
    "INT4_KERNEL_MAX_ROWS",
    "INT8_KERNEL_MAX_ROWS",
    "NARROW_OUTPUT_LAYERS",
    "bf16_packing_available",
    "half_linear_in_float32",
    "half_products_native",
    "int4_cpu_matrix",
    "int8_linear",
    "int8_rows",
    "is_quantized",
    "products_in_float32",
    "quantized_linear",
    "quantized_matrix",
    "weight_packing_available",
]
