"""Transformer pieces both flow families share: a key/value cache written in place, one causal attention function
with transformers' two implementations ("eager": explicit softmax, can return the weights; "sdpa": torch's fused
kernel), the MLP, LayerNorm and RMSNorm in float32, Apple's default initialisation, the linear layer every flow layer
uses (`FlowLinear`), which a `WeightPacking` context runs on packed weights while a sampler decodes, and what both
models' `PreTrainedModel` classes do alike (`FlowModelMixin`).

A flow's inverse runs its transformer over a span of positions after a cached prefix: one position at a time
(sequential sampling) or many (parallel samplers). Both cases are causal and aligned to the last key, so one
function covers the forward pass, a decoding step and a window after the cache.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .products import (
    HALF_DTYPES,
    INT8_KERNEL_BLOCK,
    bf16_packing_available,
    half_linear_in_float32,
    half_products_native,
    int8_linear,
    int8_rows,
    is_quantized,
    products_in_float32,
    quantized_linear,
    weight_packing_available,
)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
# Packed copies of the weights a sampler may hold at once (MKL's packed layout takes about 3x the weight's bytes);
# set it to 0 to sample with plain `addmm`.
PACKING_BUDGET_BYTES = 1 << 30


# The packing serving this thread's (this context's) sampling call: calls running at once in other threads use their
# own, so that concurrent calls compute exactly what they compute one after another.
_ACTIVE_PACKING: ContextVar[WeightPacking | None] = ContextVar("tarflow_hf_weight_packing", default=None)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 left alone (for exact checks): Apple computes LayerNorm, exp and the
    log-determinant in float32 whatever the autocast dtype."""
    return x if x.dtype == torch.float64 else x.float()


def active_packing() -> WeightPacking | None:
    """The weight packing serving this thread's sampling call, if one is open."""
    return _ACTIVE_PACKING.get()


# --------------------------------------------------------------------------------------------- linear layers
def input_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype a linear layer takes its input in: its weight's, or where the weight is stored as integers
    (bitsandbytes' int8 and 4-bit layers) its compute dtype, else its bias's, else float32."""
    if layer.weight.dtype.is_floating_point:
        return layer.weight.dtype
    compute = getattr(layer, "compute_dtype", None)
    return compute or (torch.float32 if layer.bias is None else layer.bias.dtype)


# While set, `FlowLinear(...)` builds a plain `nn.Linear` (see `FlowModelMixin.from_pretrained`).
_PLAIN_LINEAR: ContextVar[bool] = ContextVar("tarflow_hf_plain_linear", default=False)


class FlowLinear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoints) that a `WeightPacking` context can run on packed weights, and
    that runs int8 weight-only quantized weights (torchao's) with ATen's int8 kernel on CPU."""

    def __new__(cls, *args: Any, **kwargs: Any) -> nn.Linear:
        if _PLAIN_LINEAR.get():
            return nn.Linear(*args, **kwargs)  # not a FlowLinear: Python then leaves it as built
        return super().__new__(cls)

    _int8: tuple[int, tuple[torch.Tensor, torch.Tensor] | None] | None = None  # (id of the weight read, its rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled step: the compiler's own kernels, no packing
            weight = self.weight
            narrow = weight.shape[1] % INT8_KERNEL_BLOCK or weight.shape[0] < INT8_KERNEL_BLOCK
            if type(weight) not in (nn.Parameter, torch.Tensor) and narrow:
                # inductor would hand a quantized weight (even dequantized, in its dtype) to int8 kernels that
                # crash on STARFlow's 4-channel input and 8-wide output layers, so such narrow layers run in float32
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), weight.dequantize().float(), bias).to(x.dtype)
            return F.linear(x, weight, self.bias)
        if x.is_cpu and (rows := self._int8_rows()) is not None:
            return int8_linear(x, rows, self.bias)
        if is_quantized(self.weight):  # any other quantized weight: its own product, a gradient for x from its matrix
            return quantized_linear(x, self.weight, self.bias)
        if type(self.weight) is nn.Parameter and x.dtype == self.weight.dtype and products_in_float32(x):
            return half_linear_in_float32(x, self.weight, self.bias)
        packing = _ACTIVE_PACKING.get()
        # Autocast rounds F.linear's operands; the packed product would not.
        plain = packing is None or self not in packing.layers or x.dtype != self.weight.dtype or not x.is_cpu
        if plain or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        return packing.linear(self, x)

    def _int8_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`int8_rows` of the current weight, read once per weight (quantizing replaces the weight object)."""
        if self._int8 is None or self._int8[0] != id(self.weight):
            self._int8 = (id(self.weight), int8_rows(self.weight))
        return self._int8[1]


class WeightPacking:
    """While active (`with WeightPacking(block):`), the float32 and bfloat16 CPU `FlowLinear` layers of a module
    compute inference (no gradients) from pre-packed copies of their weights: MKL's for float32, oneDNN's for
    bfloat16 (the same products as `addmm`'s, bit for bit).

    A decoding step multiplies a handful of rows (images x guidance branches) by every weight matrix, which is
    bound by reading the weights: plain `addmm` streams them at about half the memory bandwidth, MKL's pre-packed
    float32 product 1.2-2.5x faster on a 2-core Xeon, oneDNN's bfloat16 one about 2x (`benchmarks.weight_formats`).
    A packing serves one row count, so it is made the second time a layer sees that count (one-off shapes such as a
    prompt prefix are not worth it), within `budget_bytes` for all layers together (default: `PACKING_BUDGET_BYTES`,
    1 GiB), and dropped on exit.
    Everything else (gradients, autocast, other dtypes or devices, torch without MKL, layers under accelerate's
    offload hooks) runs as `nn.Linear` does. float32 results differ from `addmm`'s by rounding (relative 1e-6).

    A packing belongs to the thread (the context) that entered it: calls sampling the same model at once each pack
    for themselves, so a call's products do not depend on what runs beside it."""

    def __init__(self, module: nn.Module, budget_bytes: int | None = None):
        self.layers = {
            layer
            for layer in module.modules()
            if isinstance(layer, FlowLinear)
            and type(layer.weight) is nn.Parameter  # not a quantized tensor
            and layer.weight.dtype in packable_dtypes()
            and layer.weight.is_cpu
            and not hasattr(layer, "_hf_hook")
        }
        self.budget_bytes = PACKING_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.packed_bytes = 0
        self.packed: dict[tuple[FlowLinear, int], torch.Tensor] = {}
        self.seen: set[tuple[FlowLinear, int]] = set()
        self._token = None

    def __enter__(self) -> WeightPacking:
        if self.layers:
            self._token = _ACTIVE_PACKING.set(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _ACTIVE_PACKING.reset(self._token)
            self._token = None
        self.packed.clear()
        self.seen.clear()
        self.packed_bytes = 0

    def _pack(self, layer: FlowLinear, rows: int) -> torch.Tensor | None:
        """The packing of `layer` for `rows` rows, made on the second request; None while not worth it or over
        budget (MKL's packed layout takes about 3x the weight's bytes: 4x is the bound checked)."""
        key = (layer, rows)
        if key not in self.seen or rows == 0:
            self.seen.add(key)
            return None
        weight = layer.weight
        if self.packed_bytes + 4 * weight.numel() * weight.element_size() > self.budget_bytes:
            return None
        if weight.dtype == torch.bfloat16:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        else:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        self.packed[key] = packed
        self.packed_bytes += packed.numel() * packed.element_size()
        return packed

    def linear(self, layer: FlowLinear, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // layer.in_features
        packed = self.packed.get((layer, rows))
        if packed is None and (packed := self._pack(layer, rows)) is None:
            return F.linear(x, layer.weight, layer.bias)
        if packed.dtype == torch.bfloat16:
            return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, packed, layer.weight, layer.bias, rows)


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes `WeightPacking` packs on this machine."""
    return (torch.float32,) * weight_packing_available() + (torch.bfloat16,) * bf16_packing_available()


# ------------------------------------------------------------------------------------------------- attention


class KVCache:
    """Keys and values of one attention layer, written in place at absolute positions.

    `static`: buffers of the full length from the first write, positions given as 0-d tensors and everything
    returned at full length with a mask (`visible`), so that a sampling step keeps its shapes from token to token
    and never reads a position on the host: what `torch.compile` needs to capture it as one CUDA graph."""

    def __init__(self, max_length: int, static: bool = False):
        self.max_length = max_length
        self.static = static
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, position: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, heads, L, head_dim) keys and values at `position .. position + L - 1` and return everything up
        to there (static: the whole buffers). Writing over a position replaces what was there (parallel samplers
        recompute a window)."""
        if self.keys is None:
            # Allocated on first use so the cache takes whatever dtype autocast gives the projections; a static
            # cache is zeroed, since its unwritten positions are read (with zero weight: NaN would still spread).
            batch, heads, _, head_dim = keys.shape
            shape = (batch, heads, self.max_length, head_dim)
            allocate = keys.new_zeros if self.static else keys.new_empty
            self.keys, self.values = allocate(shape), allocate(shape)
        if self.static:
            index = position + torch.arange(keys.shape[2], device=keys.device)
            self.keys.index_copy_(2, index, keys)
            self.values.index_copy_(2, index, values)
            return self.keys, self.values
        end = position + keys.shape[2]
        self.keys[:, :, position:end] = keys
        self.values[:, :, position:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def visible(self, position: int | torch.Tensor, length: int) -> torch.Tensor | None:
        """A static cache's attention mask (length, max_length) for queries at `position ..`: True where a query
        may look (its own position and those before); None for a growing cache, whose causal mask is implied."""
        if not self.static:
            return None
        device = self.keys.device
        last = position + torch.arange(length, device=device)
        return torch.arange(self.max_length, device=device) <= last[:, None]


def rows_at(table: torch.Tensor, start: int | torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """`length` rows of `table` along `dim` from `start`, a Python int (a slice) or a 0-d tensor (read on the
    device, for a static sampling step)."""
    if isinstance(start, torch.Tensor):
        return table.index_select(dim, start + torch.arange(length, device=table.device))
    return table.narrow(dim, start, length)


def check_attention_implementation(name: str | None) -> str:
    """The implementation a model runs: `None` means "sdpa" (the fused kernel; same numbers as "eager")."""
    name = name or "sdpa"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    return name


def grouped_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    temperatures: tuple[float, ...] = (1.0,),
    implementation: str = "sdpa",
    output_attentions: bool = False,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`causal_attention` over rows that come in equal groups (the guidance branches), group i with its attention
    logits divided by `temperatures[i]`: one call when all are equal, else one per group (the temperature goes
    into the kernel's scale, as in Apple's separate passes)."""
    head_scale = query.shape[-1] ** -0.5
    if len(set(temperatures)) == 1:
        scale = head_scale / temperatures[0]
        return causal_attention(query, key, value, implementation, output_attentions, scale, visible)
    groups = zip(*(part.chunk(len(temperatures)) for part in (query, key, value)), strict=True)
    parts = [
        causal_attention(q, k, v, implementation, output_attentions, head_scale / temperature, visible)
        for (q, k, v), temperature in zip(groups, temperatures, strict=True)
    ]
    weights = torch.cat([part[1] for part in parts]) if output_attentions else None
    return torch.cat([part[0] for part in parts]), weights


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    implementation: str = "sdpa",
    output_attentions: bool = False,
    scale: float | None = None,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of `query` (B, H, L, d) over `key`/`value` (B, H, S, d) with S >= L: the queries are the
    last L positions, so query i sees keys 0 .. S - L + i; or, given `visible` (L, S), the keys it marks (a static
    cache). `scale` multiplies the logits (default d ** -0.5; an attention temperature T is `scale = d ** -0.5 /
    T`, applied here rather than to the queries so that half precision rounds as Apple's code does). Returns
    (output, attention weights or None); the weights need the eager implementation."""
    length, keys = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if length > 1 and products_in_float32(query):  # half-precision attention's backward takes several times longer
        out, weights = causal_attention(*(t.float() for t in (query, key, value)), implementation, output_attentions,
                                        scale, visible)  # fmt: skip
        return out.to(query.dtype), None if weights is None else weights.to(query.dtype)
    if implementation == "sdpa" and not output_attentions and _half_decoding_step_on_cpu(query):
        return _half_decoding_attention(query, key, value, scale, visible), None
    if implementation == "sdpa" and not output_attentions:
        mask, is_causal = visible, False
        if visible is None and length > 1 and keys == length:
            is_causal = True
        elif visible is None and length > 1:  # a window after cached positions: lower-right aligned keeps fused
            mask = causal_lower_right(length, keys)  # kernels usable on GPU
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale)
        return out, None
    scores = (query @ key.transpose(-2, -1)) * scale
    if visible is not None or length > 1:
        allowed = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
        scores = scores.masked_fill(~(allowed if visible is None else visible), float("-inf"))
    # Softmax in float32 at least, as the fused kernels do (float64 stays float64 for exact checks).
    weights = (scores if scores.dtype == torch.float64 else scores.float()).softmax(dim=-1).type(query.dtype)
    return weights @ value, weights if output_attentions else None


def _half_decoding_step_on_cpu(query: torch.Tensor) -> bool:
    """One query row per sequence in bf16 or fp16 on a CPU, where the fused kernel takes several times the time of
    `_half_decoding_attention`: a decoding step with half-precision weights spent half its time in it (profiled at
    the AFHQ-256 width; `benchmarks.weight_formats` times the whole steps). Not under autocast, which keeps Apple's
    own kernels and so its bf16 samples."""
    half = query.dtype in HALF_DTYPES and half_products_native(query.dtype)  # else the fused kernel is faster
    return query.shape[2] == 1 and query.is_cpu and half and not torch.is_autocast_enabled("cpu")


def _half_decoding_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, visible: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query row over cached keys as two plain products, softmax in float32. The logits come
    from keys @ query, which reads a slice of the cache as it lies (query @ keys.T copies it first in bf16)."""
    scores = (key @ query.transpose(-2, -1)).transpose(-2, -1) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.float().softmax(dim=-1).type(query.dtype) @ value


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct rows of `rows` along dim 0, in order of first appearance; the index of each row's distinct row).
    Plain row-by-row comparisons, which every device runs (`torch.unique(dim=0)` would sort); a batch has few
    rows."""
    firsts: list[int] = []
    row_of = []
    for i, row in enumerate(rows):
        match = next((k for k, j in enumerate(firsts) if torch.equal(row, rows[j])), None)
        if match is None:
            match = len(firsts)
            firsts.append(i)
        row_of.append(match)
    return rows[firsts], torch.tensor(row_of, device=rows.device)


def layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32 whatever the autocast dtype, as Apple's code computes it (float64 is left alone, for
    exact checks); the affine parameters go up too, so that half-precision weights work on every device."""
    if x.dtype == norm.weight.dtype == torch.float32:  # the common case, without the conversions' overhead
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    up = x if x.dtype == torch.float64 else x.float()
    weight, bias = norm.weight.to(up.dtype), norm.bias.to(up.dtype)
    return F.layer_norm(up, norm.normalized_shape, weight, bias, norm.eps).type(x.dtype)


class RMSNormFp32(nn.Module):
    """RMSNorm in float32 (float64 left alone, for exact checks), scaled by (1 + weight): a zero weight is the plain
    normalisation (STARFlow's final norm, as Apple computes it)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden if hidden.dtype == torch.float64 else hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1 + self.weight.to(x.dtype))).type_as(hidden)


class FlowMLP(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear(W, ratio * W), exact GELU, Linear back (Apple's `mlp.main`)."""

    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = FlowLinear(width, ratio * width)
        self.fc2 = FlowLinear(ratio * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(layer_norm_fp32(self.norm, hidden))))


class FlowModelMixin:
    """What both flows' `PreTrainedModel` classes do alike where transformers' defaults do not fit a flow (it goes
    before `PreTrainedModel` in their bases)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' `from_pretrained`. With a bitsandbytes `quantization_config` the model's linear layers are
        built as plain `nn.Linear`s: its transformers integration replaces only layers of exactly that type, and
        would otherwise load every weight unquantized without a word."""
        quantization = kwargs.get("quantization_config")
        token = _PLAIN_LINEAR.set(getattr(quantization, "quant_method", None) == "bitsandbytes")
        try:
            return super().from_pretrained(*args, **kwargs)
        finally:
            _PLAIN_LINEAR.reset(token)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # The attention layers read `config._attn_implementation` at every call, so `set_attn_implementation`
        # takes effect at once (transformers' source heuristic looks for its AttentionInterface and would say no).
        return True

    def get_input_embeddings(self) -> nn.Module:
        """The first block's input projection (a patch -> the transformer's width, an `nn.Linear`): where data enters
        the flow's transformers, as a vision model's patch embedding, and what PEFT and gradient checkpointing hook
        (`enable_input_require_grads`). Flows read continuous values: there is no token embedding."""
        return self.blocks[0].proj_in

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.blocks[0].proj_in = value

    @staticmethod
    def checked_denoised(images: torch.Tensor) -> torch.Tensor:
        """The score step's result, refused when not finite (NaN would reach the saved images as grey)."""
        if not torch.isfinite(images).all():
            raise FloatingPointError(
                "the denoising step produced non-finite values: the samples lie where the log-likelihood overflows "
                "(often a high guidance_scale, or half-precision weights); pass denoise=False, a lower "
                "guidance_scale, or float32 weights"
            )
        return images

    def output_options(
        self, output_hidden_states: bool | None, return_dict: bool | None, output_attentions: bool | None
    ) -> tuple[bool, bool, bool]:
        """`forward`'s output switches, the config's where not given. Attention weights need the explicit softmax:
        asked for, they are computed that way for the call whatever `attn_implementation` is (as transformers falls
        back to eager), the outputs being the same."""
        config = self.config
        return (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            config.return_dict if return_dict is None else return_dict,
            config.output_attentions if output_attentions is None else output_attentions,
        )


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[None]:
    """Meanwhile a backward pass through `model` recomputes each transformer layer instead of keeping its activations
    (transformers' gradient checkpointing, switched on for the layers alone, the model staying in eval mode): the
    denoising step's score, an inference-time gradient, held about 10 GB of the released STARFlow's attention
    activations, more than its bf16 weights. The recomputed layer is the same computation: the same gradient."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    names = ("gradient_checkpointing", "_gradient_checkpointing_func")
    saved = [(*(vars(layer).get(name) for name in names), layer.training) for layer in layers]
    recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    try:
        for layer in layers:  # `training` of the layer object only: its submodules stay as they are
            layer.gradient_checkpointing, layer._gradient_checkpointing_func, layer.training = True, recompute, True
        yield
    finally:
        for layer, (enabled, function, training) in zip(layers, saved, strict=True):
            layer.training = training
            for name, value in zip(names, (enabled, function), strict=True):
                if value is None:
                    vars(layer).pop(name, None)
                else:
                    setattr(layer, name, value)


def init_torch_defaults(module: nn.Module) -> bool:
    """PyTorch's own initialisation of Linear and LayerNorm layers, which Apple's models keep; True if `module`
    was one of them."""
    if isinstance(module, nn.Linear):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        init.uniform_(module.bias, -1 / math.sqrt(module.in_features), 1 / math.sqrt(module.in_features))
        return True
    if isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        return True
    return False


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "FlowLinear",
    "FlowMLP",
    "FlowModelMixin",
    "KVCache",
    "RMSNormFp32",
    "WeightPacking",
    "active_packing",
    "at_least_fp32",
    "causal_attention",
    "check_attention_implementation",
    "distinct_rows",
    "grouped_causal_attention",
    "init_torch_defaults",
    "input_dtype",
    "layer_norm_fp32",
    "rows_at",
]
