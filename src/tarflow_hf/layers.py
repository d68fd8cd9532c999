"""Transformer pieces both flow families share: a key/value cache written in place, one causal attention function
with transformers' two implementations ("eager": explicit softmax, can return the weights; "sdpa": torch's fused
kernel), the MLP, LayerNorm in float32, and Apple's default initialisation.

A flow's inverse runs its transformer over a span of positions after a cached prefix: one position at a time
(sequential sampling) or many (parallel samplers). Both cases are causal and aligned to the last key, so one
function covers the forward pass, a decoding step and a window after the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import initialization as init

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


class KVCache:
    """Keys and values of one attention layer, written in place at absolute positions."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, heads, L, head_dim) keys and values at `position .. position + L - 1` and return everything up
        to there. Writing over a position replaces what was there (parallel samplers recompute a window)."""
        if self.keys is None:
            # Allocated on first use so the cache takes whatever dtype autocast gives the projections.
            batch, heads, _, head_dim = keys.shape
            shape = (batch, heads, self.max_length, head_dim)
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        end = position + keys.shape[2]
        self.keys[:, :, position:end] = keys
        self.values[:, :, position:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


def check_attention_implementation(name: str | None) -> str:
    """The implementation a model runs: `None` means "sdpa" (the fused kernel; same numbers as "eager")."""
    name = name or "sdpa"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    return name


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    implementation: str = "sdpa",
    output_attentions: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of `query` (B, H, L, d) over `key`/`value` (B, H, S, d) with S >= L: the queries are the
    last L positions, so query i sees keys 0 .. S - L + i. `scale` multiplies the logits (default d ** -0.5; an
    attention temperature T is `scale = d ** -0.5 / T`, applied here rather than to the queries so that half
    precision rounds as Apple's code does). Returns (output, attention weights or None); the weights need the
    eager implementation."""
    length, keys = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "sdpa" and not output_attentions:
        mask, is_causal = None, False
        if length > 1 and keys == length:
            is_causal = True
        elif length > 1:  # a window after cached positions: lower-right aligned keeps fused kernels usable on GPU
            mask = causal_lower_right(length, keys)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale)
        return out, None
    scores = (query @ key.transpose(-2, -1)) * scale
    if length > 1:
        allowed = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
        scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax in float32 at least, as the fused kernels do (float64 stays float64 for exact checks).
    weights = (scores if scores.dtype == torch.float64 else scores.float()).softmax(dim=-1).type(query.dtype)
    return weights @ value, weights if output_attentions else None


def layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32 whatever the autocast dtype, as Apple's code computes it (float64 is left alone, for
    exact checks); the affine parameters go up too, so that half-precision weights work on every device."""
    up = x if x.dtype == torch.float64 else x.float()
    weight, bias = norm.weight.to(up.dtype), norm.bias.to(up.dtype)
    return F.layer_norm(up, norm.normalized_shape, weight, bias, norm.eps).type(x.dtype)


class FlowMLP(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear(W, ratio * W), exact GELU, Linear back (Apple's `mlp.main`)."""

    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(layer_norm_fp32(self.norm, hidden))))


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
    "FlowMLP",
    "KVCache",
    "causal_attention",
    "check_attention_implementation",
    "init_torch_defaults",
    "layer_norm_fp32",
]
