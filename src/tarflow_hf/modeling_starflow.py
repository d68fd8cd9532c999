"""STARFlow: a latent normalizing flow of causal-transformer affine blocks, the deepest of which reads text.

The flow maps a (noisy) VAE latent x (B, C, H, W) to z of the same shape. The latent is cut into patches (tokens);
each block reads the tokens in its own order (even blocks reversed, odd blocks as they are), starting from a
learnt start-of-sequence token, and maps token s_t to z_t = (s_t - b_t) / scale_t, where (a_t, b_t) come from a
causal transformer over the tokens before t and scale_t = softplus(a_t + log(e - 1)) after a soft clip. The last,
"deep" block is wider and deeper and reads the text embeddings as a causal prefix. Positions enter only through a
3-axis rotary embedding (`rotary_starflow.py`). The arithmetic follows apple/ml-starflow (`transformer_flow.py`)
operation for operation, so converted checkpoints give Apple's numbers (`tests/fixtures/starflow/README.md`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_starflow import StarFlowConfig
from .guidance import Guidance, GuidanceRule, check_positive_number, guide
from .layers import (
    FlowLinear,
    FlowMLP,
    FlowModelMixin,
    KVCache,
    RMSNormFp32,
    check_attention_implementation,
    checkpointed_layers,
    distinct_rows,
    grouped_causal_attention,
    init_torch_defaults,
    input_dtype,
    layer_norm_fp32,
)
from .products import is_quantized  # noqa: F401 (the layers' import: diffusers copies direct imports only)
from .rotary_starflow import RotaryTable, apply_rope
from .samplers import FlowSampler, SamplingStats, get_sampler

# Apple's INV_SOFTPLUS_1 = log(e - 1): softplus(0 + INV_SOFTPLUS_1) = 1, so a zero output is the identity map.
INV_SOFTPLUS_1 = 0.541324854612918
LOG_TWO_PI = math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------ outputs
@dataclass
class StarFlowOutput(ModelOutput):
    r"""
    Output of [`StarFlowModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Apple's training loss (`train.py`): the negative log-likelihood per dimension in nats without the
            constant `0.5 * log(2 pi)`, averaged over the batch, plus `config.latent_norm_regularization` times
            `latent_norm`.
        latents (`torch.FloatTensor` of shape `(batch_size, in_channels, height, width)`):
            The flow's output z, in the input's layout.
        logdet (`torch.FloatTensor` of shape `(batch_size,)`):
            The exact log |det dz/dx|, summed over all dimensions and blocks.
        log_likelihood (`torch.FloatTensor` of shape `(batch_size,)`):
            log p(x) in nats under the standard normal prior, summed over all dimensions.
        bits_per_dim (`torch.FloatTensor` of shape `(batch_size,)`):
            Negative log-likelihood in bits per latent dimension (a continuous density: no dequantisation).
        latent_norm (`torch.FloatTensor` of shape `()`):
            Apple's latent-norm regulariser: the sum over the input and every shallow block's output (not the
            deep block's) of the batch mean of the squared values.
        block_logdets (`tuple(torch.FloatTensor)`):
            log |det| of each block, (batch_size,) each, in forward order; they sum to `logdet`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Returned when `output_hidden_states=True`: the patch grid `(batch_size, height / p, width / p, p * p *
            in_channels)` (Apple's `patchify` layout, tokens in raster order) of the input followed by the output
            of every block: `num_blocks + 1` entries, Apple's `outputs`.
        text_hidden_states (`torch.FloatTensor` of shape `(batch_size, text_length, deep_hidden_size)`, *optional*):
            Returned when `output_hidden_states=True` for a text model: the deep block's text-token states after
            its final norm (nothing uses them; they help to debug the text path).
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Returned when `output_attentions=True`: every layer's attention weights (batch_size, heads, L, L), block by
            block in forward order, over the block's sequence (its token order; the deep block's text prefix first).
    """

    loss: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    logdet: torch.Tensor | None = None
    log_likelihood: torch.Tensor | None = None
    bits_per_dim: torch.Tensor | None = None
    latent_norm: torch.Tensor | None = None
    block_logdets: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    text_hidden_states: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------- KV cache
class StarFlowBlockCache:
    """The key/value caches of every layer of a block (`attention.KVCache`: keys stored already rotated, since a
    key's rotation depends only on its own position; rewriting a position overwrites it, so a parallel sampler's
    rewind is implicit). `offset` is the length of the text prefix: image sequence position t lives at
    `offset + t`."""

    def __init__(self, num_layers: int, max_length: int, offset: int = 0, static: bool = False):
        self.offset = offset
        self.layers = [KVCache(max_length, static) for _ in range(num_layers)]


# -------------------------------------------------------------------------------------------- layers
class StarFlowAttention(nn.Module):
    """Pre-norm causal self-attention with 3-axis RoPE on queries and keys."""

    def __init__(self, config: StarFlowConfig, width: int):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = width // config.head_dim
        self.norm = nn.LayerNorm(width)
        self.qkv = FlowLinear(width, 3 * width)
        self.proj = FlowLinear(width, width)

    def forward(
        self,
        hidden: torch.Tensor,
        rotation: torch.Tensor,
        cache: KVCache | None = None,
        position: int | torch.Tensor = 0,
        temperatures: tuple[float, ...] = (1.0,),
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden` (B, n, W) holds sequence positions `position .. position + n - 1` with rotary `rotation`
        (n, head_dim / 2; `apply_rope`); with `cache` they also attend to every cached position before them. The
        rows come in equal groups (the guidance branches), group i with its attention logits divided by
        `temperatures[i]` (Apple's `attn_temp`). Returns the output and, with `output_attentions`, the weights."""
        batch, length, width = hidden.shape
        qkv = self.qkv(layer_norm_fp32(self.norm, hidden))
        heads = qkv.view(batch, length, 3 * self.num_heads, self.head_dim).transpose(1, 2)
        # Queries and keys rotate together: one call, half the small operations of a decoding step.
        query, key = apply_rope(heads[:, : 2 * self.num_heads], rotation).chunk(2, dim=1)
        value = heads[:, 2 * self.num_heads :]
        if cache is not None:
            key, value = cache.update(key, value, position)
        visible = None if cache is None else cache.visible(position, length)
        implementation = check_attention_implementation(self.config._attn_implementation)
        out, weights = grouped_causal_attention(
            query, key, value, temperatures, implementation, output_attentions, visible
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, width)), weights


class StarFlowLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer; checkpointed in training when gradient checkpointing is enabled."""

    def __init__(self, config: StarFlowConfig, width: int):
        super().__init__()
        self.attention = StarFlowAttention(config, width)
        self.mlp = FlowMLP(width, config.mlp_ratio)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention then MLP, each added to its input; the other arguments are [`StarFlowAttention.forward`]'s
        (the rotary `rotation`, then `cache`, `position`, `temperatures`, `output_attentions`), and so are the
        attention weights returned."""
        attended, weights = self.attention(hidden, *args, **kwargs)
        hidden = hidden + attended
        return hidden + self.mlp(hidden), weights


# ------------------------------------------------------------------------------------------- condition
@dataclass
class StarFlowCondition:
    """Everything a block needs besides its tokens: the text rows the transformer reads (B rows, or
    [conditional; unconditional] 2B rows when guided), the guidance (None: unguided), the attention temperature of
    each branch's rows, and the rotary table of the latent's grid."""

    text: torch.Tensor | None
    rope: RotaryTable
    num_tokens: int
    guidance: Guidance | None = None
    temperatures: tuple[float, ...] = (1.0,)

    @property
    def branches(self) -> int:
        return len(self.temperatures)

    @property
    def text_length(self) -> int:
        return 0 if self.text is None else self.text.shape[1]

    def repeat_interleave(self, copies: int) -> StarFlowCondition:
        """The condition of a batch whose every row is repeated `copies` times in a row (branch by branch)."""
        text = self.text
        if text is not None:
            grouped = text.view(self.branches, text.shape[0] // self.branches, *text.shape[1:])
            text = grouped.repeat_interleave(copies, dim=1).flatten(0, 1)
        return StarFlowCondition(text, self.rope, self.num_tokens, self.guidance, self.temperatures)


# ----------------------------------------------------------------------------------------------- block
class StarFlowBlock(nn.Module):
    """One autoregressive affine flow step over the token sequence, read reversed when `reverse_order`. The deep
    block of a text model (`reads_text`) runs its layers on [text prefix; image tokens]."""

    def __init__(self, config: StarFlowConfig, width: int, num_layers: int, reverse_order: bool, deep: bool):
        super().__init__()
        self.config = config
        self.reverse_order = reverse_order
        self.soft_clip = config.soft_clip
        patch_dim = config.patch_dim
        self.sos_embed = nn.Parameter(torch.empty(1, 1, patch_dim))
        self.proj_in = FlowLinear(patch_dim, width)
        self.proj_txt = FlowLinear(config.text_hidden_size, width) if deep and config.has_text else None
        self.layers = nn.ModuleList(StarFlowLayer(config, width) for _ in range(num_layers))
        self.decode_sequentially = deep  # compute-bound passes: parallel samplers decode it exactly by default
        self.final_norm = RMSNormFp32(width)  # Apple's final norm
        self.proj_out = FlowLinear(width, 2 * patch_dim)

    @property
    def reads_text(self) -> bool:
        return self.proj_txt is not None

    def permute(self, sequence: torch.Tensor) -> torch.Tensor:
        """Into (and, being an involution, out of) this block's token order along dim 1."""
        return sequence.flip(1) if self.reverse_order else sequence

    # -------------------------------------------------------------------------------------- transformer
    def transformer(
        self,
        hidden: torch.Tensor,
        rope: RotaryTable,
        start: int | torch.Tensor,
        cache: StarFlowBlockCache | None = None,
        temperatures: tuple[float, ...] = (1.0,),
        attentions: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """All layers on rows at sequence positions `start ..` (text prefix included), then the final norm; the
        rows' branch groups have the attention `temperatures`. With `attentions`, each layer's attention weights are
        appended to it."""
        rotation = rope.rows(start, hidden.shape[1])
        for i, layer in enumerate(self.layers):
            if cache is None and temperatures == (1.0,):  # the training path: checkpointed when enabled
                hidden, weights = layer(hidden, rotation, output_attentions=attentions is not None)
            else:
                layer_cache = None if cache is None else cache.layers[i]
                hidden, weights = layer(hidden, rotation, cache=layer_cache, position=start, temperatures=temperatures)
            if attentions is not None:
                attentions.append(weights)
        return self.final_norm(hidden)

    def affine(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) in float32 from final hidden states: soft clip, then scale = softplus(a + log(e - 1))."""
        out = self.proj_out(hidden)
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        log_scale_logit, shift = out.chunk(2, dim=-1)
        up = torch.float64 if out.dtype == torch.float64 else torch.float32
        return F.softplus(log_scale_logit.to(up) + INV_SOFTPLUS_1), shift.to(up)

    def sequence_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer inputs of a whole block: [sos, s_0, ..., s_{T-2}] for tokens s in block order."""
        sos = self.sos_embed.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([sos, tokens[:, :-1]], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor | None,
        rope: RotaryTable,
        attentions: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) tokens in raster order -> (z in raster order, -log scale (B, T, D) in this block's order,
        the text states after the final norm or None). `rope` covers [text; image] positions; with `attentions`,
        each layer's attention weights are appended to it."""
        s = self.permute(x)
        hidden = self.proj_in(self.sequence_inputs(s))
        text_length = 0
        if self.reads_text:
            text_length = text.shape[1]
            hidden = torch.cat([self.proj_txt(text.to(hidden.dtype)), hidden], dim=1)
        hidden = self.transformer(hidden, rope, 0, attentions=attentions)
        text_states, hidden = hidden[:, :text_length], hidden[:, text_length:]
        scale, shift = self.affine(hidden)
        up = scale.dtype
        z = ((s.to(up) - shift) / scale).to(x.dtype)
        return self.permute(z), -torch.log(scale), text_states if self.reads_text else None

    # --------------------------------------------------------------------------------- sampler interface
    def new_cache(
        self, condition: StarFlowCondition, batch_size: int, num_tokens: int, static: bool = False
    ) -> StarFlowBlockCache:
        """A key/value cache for `num_tokens` sequence positions of one inverse of this block; the deep block's
        text prefix is run into it first (with the attention temperature, as Apple's sequential decoder does), so
        sequence position t sits at L + t.

        The prefix runs once per distinct text row (of a branch, when the branches' temperatures differ): one prompt
        for several images repeats its rows, and so does the negative prompt, and the prefix pass is compute-bound
        (every text token of every row through the deep block), so a batch of N images of one prompt computes 2 rows
        instead of 2N."""
        text_length = condition.text_length if self.reads_text else 0
        cache = StarFlowBlockCache(len(self.layers), text_length + num_tokens, text_length, static)
        if text_length:
            temperatures = condition.temperatures
            groups = [(condition.text, temperatures[0])]
            if len(set(temperatures)) > 1:
                groups = list(zip(condition.text.chunk(len(temperatures)), temperatures, strict=True))
            parts = [self._prefix_states(rows, self._rope(condition), temperature) for rows, temperature in groups]
            for i, layer in enumerate(cache.layers):
                keys, values = (torch.cat([part[i][j] for part in parts]) for j in (0, 1))
                layer.update(keys, values, 0)
        return cache

    def _prefix_states(
        self, text: torch.Tensor, rope: RotaryTable, temperature: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) of the text prefix for every row of `text`, computed once per distinct row."""
        distinct, row_of = distinct_rows(text)
        prefix = StarFlowBlockCache(len(self.layers), text.shape[1])
        self.transformer(self.proj_txt(distinct.to(input_dtype(self.proj_txt))), rope, 0, prefix, (temperature,))
        return [(layer.keys[row_of], layer.values[row_of]) for layer in prefix.layers]

    def _rope(self, condition: StarFlowCondition) -> RotaryTable:
        """The rotary table over this block's sequence: shallow blocks see image positions only."""
        return condition.rope if self.reads_text else condition.rope.tail(condition.num_tokens)

    def affine_span(
        self,
        tokens: torch.Tensor,
        position: int | torch.Tensor,
        cache: StarFlowBlockCache | None,
        condition: StarFlowCondition,
        weight: torch.Tensor | float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_scale, shift), each (B, n, D), predicting the tokens that follow `tokens` (B, n, D), which sit at
        sequence positions `position .. position + n - 1` of [sos; z] (block order): the output at row t gives
        x_{t+1} = z_{t+1} * exp(log_scale) + shift, with log_scale = log(scale) of Apple's soft-clipped softplus
        scale. With guidance the rows are duplicated to [cond; uncond] internally and combined by the guidance's
        rule (STARFlow: the Gaussian product) with `weight`."""
        branches = condition.branches
        if branches > 1:
            tokens = tokens.repeat(branches, 1, 1)
        hidden = self.proj_in(tokens.to(input_dtype(self.proj_in)))
        rope = self._rope(condition)
        offset = condition.text_length if self.reads_text else 0
        if cache is None and position != 0:
            raise ValueError("affine_span without a cache must start at position 0 (it cannot see earlier tokens)")
        if cache is None and offset:
            # The text prefix through a throwaway cache: once per distinct text row (`new_cache`), where running it
            # with the tokens would repeat it for every row (a Newton pass has 2 * token_dim + 1 copies of each).
            cache = self.new_cache(condition, len(tokens) // branches, tokens.shape[1])
        start = 0 if cache is None else cache.offset + position
        hidden = self.transformer(hidden, rope, start, cache, condition.temperatures)
        scale, shift = self.affine(hidden)
        return guide(condition.guidance, torch.log(scale), shift, weight)


# ------------------------------------------------------------------------------------------------ inputs
def check_latents(config: StarFlowConfig, latents: Any, name: str) -> None:
    """Latents (B, C, H, W), floating point, on the patch grid; a one-line `ValueError` naming `name` otherwise."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != config.in_channels:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{name} must have shape (batch, {config.in_channels}, height, width), got {got}")
    height, width = latents.shape[2:]
    p = config.patch_size
    if height < p or width < p or height % p or width % p:
        raise ValueError(
            f"{name} is {height}x{width}, which is not on the patch grid: height and width must be positive "
            f"multiples of patch_size={p}"
        )
    if not latents.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {latents.dtype}")
    if latents.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(latents.shape)}); pass at least one latent")


def check_text(config: StarFlowConfig, text: Any, batch: int, name: str) -> torch.Tensor | None:
    """Text embeddings (B, L, text_hidden_size), None for an unconditional model; one row is broadcast to the
    batch."""
    if not config.has_text:
        if text is not None:
            raise ValueError(f"this model is unconditional (text_hidden_size=0); pass {name}=None")
        return None
    if text is None:
        raise ValueError(
            f"this model reads text: pass {name} of shape (batch, text_length, {config.text_hidden_size}), the "
            "text encoder's masked last hidden state (for the unconditional branch, the empty prompt's)"
        )
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[-1] != config.text_hidden_size:
        got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(
            f"{name} must have shape (batch, text_length, {config.text_hidden_size}) (text_hidden_size), got {got}"
        )
    if text.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one text token, got length 0")
    if text.shape[0] == 1 and batch != 1:
        text = text.expand(batch, -1, -1)
    if text.shape[0] != batch:
        raise ValueError(f"{name} has {text.shape[0]} rows for a batch of {batch}")
    return text


# ---------------------------------------------------------------------------------------------- models
class StarFlowPreTrainedModel(FlowModelMixin, PreTrainedModel):
    config: StarFlowConfig
    config_class = StarFlowConfig
    base_model_prefix = "starflow"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["StarFlowBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Apple's initialisation: PyTorch's defaults, a standard normal start token, a zero output projection
        # weight (every block starts as the identity map) and a zero RMSNorm weight (used as 1 + weight).
        if init_torch_defaults(module):
            return
        if isinstance(module, RMSNormFp32):
            init.zeros_(module.weight)
        elif isinstance(module, StarFlowBlock):
            init.normal_(module.sos_embed, std=1.0)
            init.zeros_(module.proj_out.weight)


class StarFlowModel(StarFlowPreTrainedModel):
    r"""
    STARFlow latent normalizing flow. `forward` maps (noisy) VAE latents to z with the exact log-likelihood;
    `inverse` maps prior samples back to latents, with STARFlow's Gaussian-product classifier-free guidance in the
    deep block; `denoise` takes the score step Apple applies to samples.

    Example:

    ```python
    >>> import torch
    >>> from tarflow_hf.configuration_starflow import StarFlowConfig
    >>> from tarflow_hf.modeling_starflow import StarFlowModel
    >>> config = StarFlowConfig(sample_size=8, hidden_size=64, layers_per_block=[1, 2], head_dim=32,
    ...                         text_hidden_size=32, max_text_length=16)
    >>> model = StarFlowModel(config)
    >>> text = torch.randn(2, 16, 32)
    >>> out = model(torch.randn(2, 4, 8, 8), text)  # .latents (2, 4, 8, 8), .logdet, .loss, .bits_per_dim
    >>> latents = model.inverse(torch.randn(2, 4, 8, 8), text, negative_encoder_hidden_states=torch.zeros(2, 16, 32),
    ...                         guidance_scale=4.6)
    ```
    """

    def __init__(self, config: StarFlowConfig):
        super().__init__(config)
        blocks = []
        for i in range(config.num_blocks):
            deep = i == config.num_blocks - 1
            width = config.deep_hidden_size if deep else config.hidden_size
            # Apple's seq_order L2R: even blocks read the tokens reversed, odd blocks as they are.
            layers = config.layers_per_block[i]
            blocks.append(StarFlowBlock(config, width, layers, reverse_order=i % 2 == 0, deep=deep))
        self.blocks = nn.ModuleList(blocks)
        self.post_init()

    @classmethod
    def from_single_file(cls, checkpoint: str, **kwargs: Any) -> StarFlowModel:
        """Apple's `.pth` as a model, without converting it (`config=` Apple's yaml): `tarflow_hf.single_file`."""
        return importlib.import_module("tarflow_hf.single_file").load_model(cls, checkpoint, **kwargs)

    # ------------------------------------------------------------------------------------- shapes & inputs
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch grid (B, H/p, W/p, p*p*C): Apple's `'b c (h p1) (w p2) -> b h w (p1 p2 c)'`,
        channel fastest inside a patch."""
        b, c, h, w = latents.shape
        p = self.config.patch_size
        grid = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return grid.reshape(b, h // p, w // p, p * p * c)

    def unpatchify(self, grid: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`."""
        b, h, w, _ = grid.shape
        p, c = self.config.patch_size, self.config.in_channels
        return grid.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)

    def _text(self, text: Any, batch: int, name: str) -> torch.Tensor | None:
        text = check_text(self.config, text, batch, name)
        return None if text is None else text.to(self.device)

    def _rope_table(self, height: int, width: int, text_length: int, dtype: torch.dtype) -> RotaryTable:
        p = self.config.patch_size
        return RotaryTable.build(self.config, height // p, width // p, text_length, self.device, dtype)

    # --------------------------------------------------------------------------------------------- density
    def forward(
        self,
        pixel_values: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> StarFlowOutput | tuple:
        r"""
        Map latents to z with the exact log-likelihood.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                VAE latents (scaled by the VAE's scaling factor, plus the training noise); height and width are
                multiples of `patch_size`, not necessarily `sample_size` and not necessarily equal.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_length, text_hidden_size)`):
                Text embeddings with padding rows zeroed (the flow itself takes no mask). Required for a text model.
            output_hidden_states (`bool`, *optional*): return the patch grid after every block.
            return_dict (`bool`, *optional*): return a [`StarFlowOutput`] rather than a tuple.
            output_attentions (`bool`, *optional*): return every layer's attention weights (computed with the
                explicit softmax for the call, whatever `attn_implementation` is).
        """
        output_hidden_states, return_dict, output_attentions = self.output_options(
            output_hidden_states, return_dict, output_attentions
        )
        check_latents(self.config, pixel_values, "pixel_values")
        batch, _, height, width = pixel_values.shape
        text = self._text(encoder_hidden_states, batch, "encoder_hidden_states")
        dtype = input_dtype(self.blocks[0].proj_in)
        grid = self.patchify(pixel_values.to(device=self.device, dtype=dtype))
        grid_h, grid_w = grid.shape[1:3]
        rope = self._rope_table(height, width, 0 if text is None else text.shape[1], torch.float32)

        x = grid.flatten(1, 2)
        outputs, block_logdets, text_states, attentions = [grid], [], None, [] if output_attentions else None
        for block in self.blocks:
            block_rope = rope if block.reads_text else rope.tail(grid_h * grid_w)
            x, logdet_tokens, block_text = block(x, text if block.reads_text else None, block_rope, attentions)
            block_logdets.append(logdet_tokens.sum(dim=(1, 2)))
            outputs.append(x.unflatten(1, (grid_h, grid_w)))
            text_states = block_text if block_text is not None else text_states

        latents = self.unpatchify(outputs[-1])
        num_dims = latents[0].numel()
        logdet = torch.stack(block_logdets).sum(0)
        z = latents.to(logdet.dtype)
        squared = z.pow(2).flatten(1).sum(1)
        nll_per_dim = 0.5 * squared / num_dims - logdet / num_dims  # Apple's get_loss, per sample
        latent_norm = sum(output.pow(2).mean() for output in outputs[:-1])
        loss = nll_per_dim.mean() + self.config.latent_norm_regularization * latent_norm
        log_likelihood = -0.5 * squared - 0.5 * num_dims * LOG_TWO_PI + logdet
        output = StarFlowOutput(
            loss=loss,
            latents=latents,
            logdet=logdet,
            log_likelihood=log_likelihood,
            bits_per_dim=-log_likelihood / (num_dims * math.log(2)),
            latent_norm=latent_norm,
            block_logdets=tuple(block_logdets),
            hidden_states=tuple(outputs) if output_hidden_states else None,
            text_hidden_states=text_states if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    # -------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def inverse(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        guidance_scale: float | Callable[[int], float] = 1.0,
        guidance_rule: GuidanceRule | str | None = None,
        attention_temperature: float = 1.0,
        sampler: FlowSampler | str | None = None,
        callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, SamplingStats]:
        r"""
        Map prior samples back to latents: the flow run backwards, deep block first, token by token.

        Args:
            latents (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): standard normal samples
                (Apple's `sample.py` draws them without temperature); any size on the patch grid.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_length, text_hidden_size)`): the
                prompts' embeddings (padding rows zeroed); one row is used for the whole batch.
            negative_encoder_hidden_states (`torch.Tensor`, same shape): the unconditional branch's embeddings,
                needed when guiding; Apple uses the empty prompt's encoding.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance in the diffusers convention (1.0 is
                none; Apple's `--cfg g` is `1 + g`), applied in the deep block only, as Apple does; the shallow
                blocks never see text. At least 1 with the Gaussian-product rule. A callable is asked for the scale
                (of step 0, the deep block).
            guidance_rule (`GuidanceRule` or `str`, *optional*): how the branches combine (`tarflow_hf.guidance`);
                the config's `default_guidance_rule` (STARFlow's `"gaussian_product"`) when None.
            attention_temperature (`float`, defaults to 1.0): divides the attention logits of every layer of every
                block, both guidance branches and the text prefix (Apple's `attn_temp`). Unlike Apple's Jacobi
                decoder, which ignores it, every sampler here applies it.
            sampler (`FlowSampler` or `str`, *optional*): how each block is inverted (`tarflow_hf.samplers`); the
                exact `SequentialSampler` when None. The parallel samplers keep the deep block exact by default
                and iterates the shallow ones: the fastest parallel setting on a CPU.
            callback (`Callable[[int, torch.Tensor], torch.Tensor | None]`, *optional*): called after each block (in
                sampling order: step 0 is the deep block) with its step index and the current latents (B, C, H, W);
                latents it returns replace them.
            return_stats (`bool`): also return the [`~samplers.SamplingStats`] (`chunk_iterations` holds the
                block-Jacobi iterations of every chunk, deep block first, as Apple's `jacobi_iters`).

        Returns:
            `torch.Tensor` of shape `(batch_size, in_channels, height, width)`: latents x (raw: neither clipped nor
            denoised), and the statistics when `return_stats`.
        """
        check_latents(self.config, latents, "latents")
        batch, _, height, width = latents.shape
        scale = guidance_scale(0) if callable(guidance_scale) else guidance_scale  # the deep block is step 0
        guidance = Guidance(scale, GuidanceRule.parse(guidance_rule, self.config.default_guidance_rule))
        temperature = check_positive_number("attention_temperature", attention_temperature)
        sampler = get_sampler(sampler)
        text = self._guided_text(encoder_hidden_states, negative_encoder_hidden_states, guidance, batch)
        dtype = input_dtype(self.blocks[0].proj_in)
        grid = self.patchify(latents.to(device=self.device, dtype=torch.float32))
        grid_h, grid_w = grid.shape[1:3]
        rope = self._rope_table(height, width, 0 if text is None else text.shape[1], torch.float32)
        stats = SamplingStats()
        tokens = grid.flatten(1, 2)
        for step, block in enumerate(reversed(self.blocks)):
            # Guidance in the deep block only (Apple's cond_top_only): the shallow blocks never read text.
            guided = block.reads_text and guidance.active
            condition = StarFlowCondition(
                text=text.to(dtype) if block.reads_text else None,
                rope=rope,
                num_tokens=grid_h * grid_w,
                guidance=guidance if guided else None,
                temperatures=guidance.branch_temperatures(temperature) if guided else (temperature,),
            )
            sequence = torch.cat([block.sos_embed.float().expand(batch, -1, -1), block.permute(tokens)], dim=1)
            inverted, record = sampler.invert_block(block, sequence, condition, step)
            stats.add_block(record)
            tokens = block.permute(inverted[:, 1:])
            replaced = (
                None if callback is None else callback(step, self.unpatchify(tokens.unflatten(1, (grid_h, grid_w))))
            )
            if replaced is not None:
                check_latents(self.config, replaced, "latents returned by the callback")
                tokens = self.patchify(replaced.to(tokens)).flatten(1, 2)
        if not torch.isfinite(tokens).all():
            raise FloatingPointError(
                "sampling produced non-finite values; with float16 or bfloat16 weights try float32, or a lower "
                "guidance_scale"
            )
        result = self.unpatchify(tokens.unflatten(1, (grid_h, grid_w)))
        return (result, stats) if return_stats else result

    def _guided_text(
        self, text: torch.Tensor | None, negative: torch.Tensor | None, guidance: Guidance, batch: int
    ) -> torch.Tensor | None:
        """The deep block's text rows: the prompts' (B rows), or with guidance [prompts; negative prompts] (2B)."""
        text = self._text(text, batch, "encoder_hidden_states")
        if not guidance.active:
            if negative is not None:
                raise ValueError("negative_encoder_hidden_states is only used with guidance_scale != 1")
            return text
        if not self.config.has_text:
            raise ValueError("guidance_scale != 1 needs a text model: this one is unconditional (text_hidden_size=0)")
        if negative is None:
            raise ValueError(
                "guidance_scale != 1 needs negative_encoder_hidden_states (Apple's: the text encoder's embedding of "
                "the empty prompt)"
            )
        negative = self._text(negative, batch, "negative_encoder_hidden_states")
        if negative.shape[1] != text.shape[1]:
            raise ValueError(
                f"negative_encoder_hidden_states has {negative.shape[1]} text tokens but encoder_hidden_states "
                f"{text.shape[1]}; both branches run as one batch, so pad them to the same length"
            )
        return torch.cat([text, negative.to(text.dtype)])

    # ------------------------------------------------------------------------------------------- denoising
    def denoise(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        noise_std: float | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        r"""
        One Tweedie score step `x + strength * sigma**2 * grad_x log p(x)` with the model's own likelihood and sigma
        = `config.noise_std` (Apple's `self_denoise`, step size 1): samples of a model trained on noisy latents carry
        that noise, and this removes it. Computed one latent at a time, as Apple does, with the conditional text
        embeddings only.
        """
        sigma = self.config.noise_std if noise_std is None else noise_std
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {sigma!r}")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        check_latents(self.config, latents, "latents")
        text = self._text(encoder_hidden_states, latents.shape[0], "encoder_hidden_states")
        outputs = []
        for i in range(latents.shape[0]):
            # Inference mode (a caller's `torch.inference_mode()`) would make the step's gradient impossible.
            with torch.inference_mode(False), torch.enable_grad(), checkpointed_layers(self):
                x = latents[i : i + 1].clone().detach().requires_grad_(True)
                log_likelihood = self(x, None if text is None else text[i : i + 1].clone()).log_likelihood
                (score,) = torch.autograd.grad(log_likelihood.sum(), x)
            outputs.append((x + strength * sigma**2 * score).detach())
        return self.checked_denoised(torch.cat(outputs))


__all__ = ["StarFlowConfig", "StarFlowModel", "StarFlowOutput", "StarFlowPreTrainedModel"]
