"""TarFlow: a normalizing flow of causal-transformer affine blocks over image patches.

Each block reads the patch sequence (in its own order: blocks alternate between the identity and the reversed
order) and maps every patch x_t to z_t = (x_t - b_t) * exp(-a_t), where (a_t, b_t) come from a causal
transformer over the patches before t. The forward direction is one parallel pass per block and gives an exact
log-likelihood; the inverse is autoregressive over patches, run by the samplers in `sampling.py`.

The arithmetic follows apple/ml-tarflow (`transformer_flow.py`) operation for operation, including where it
computes in float32 under autocast (LayerNorm, exp), so converted checkpoints give the same numbers.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_tarflow import TarFlowConfig
from .guidance import Guidance, GuidanceRule, check_positive_number, guide
from .layers import (
    FlowLinear,
    FlowMLP,
    FlowModelMixin,
    KVCache,
    at_least_fp32,
    check_attention_implementation,
    checkpointed_layers,
    grouped_causal_attention,
    init_torch_defaults,
    input_dtype,
    layer_norm_fp32,
    rows_at,
)
from .products import is_quantized  # noqa: F401 (the layers' import: diffusers copies direct imports only)
from .samplers import FlowSampler, SamplingStats, get_sampler

# Apple's evaluate_bpd.py: pixels in [-1, 1] are 256 levels of width 2/256, so p(level) = p(x) / 128 per dim.
LOG_PIXEL_SCALE = math.log(128.0)
LOG_TWO_PI = math.log(2 * math.pi)


@dataclass
class TarFlowOutput(ModelOutput):
    r"""
    Output of [`TarFlowModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Apple's training objective `0.5 * mean(z**2) - mean(logdet / (T * D))`.
        latents (`torch.FloatTensor` of shape `(batch_size, num_patches, patch_dim)`):
            The flow's output `z`, as a patch sequence.
        logdet (`torch.FloatTensor` of shape `(batch_size,)`):
            The exact log |det dz/dx|, summed over all dimensions.
        log_likelihood (`torch.FloatTensor` of shape `(batch_size,)`):
            log p(x) in nats under the standard normal prior, summed over all dimensions.
        bits_per_dim (`torch.FloatTensor` of shape `(batch_size,)`):
            Negative log-likelihood in bits per dimension of 8-bit images scaled to [-1, 1], as Apple's
            `evaluate_bpd.py` computes it (dequantize the input beforehand for a proper discrete likelihood).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The patch sequence after each flow block, returned when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Attention weights (batch, heads, T, T) of every layer, block by block, each in its block's patch
            order; returned when `output_attentions=True`.
    """

    loss: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    logdet: torch.Tensor | None = None
    log_likelihood: torch.Tensor | None = None
    bits_per_dim: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _repeat_rows(rows: torch.Tensor | None, copies: int, branches: int) -> torch.Tensor | None:
    """Per-row tensors (branches * B, ...) for a batch whose every image is repeated `copies` times in a row,
    branch by branch: (branches * B * copies, ...)."""
    if rows is None:
        return None
    grouped = rows.view(branches, rows.shape[0] // branches, *rows.shape[1:])
    return grouped.repeat_interleave(copies, dim=1).flatten(0, 1)


class TarFlowAttention(nn.Module):
    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.norm = nn.LayerNorm(config.hidden_size)
        self.qkv = FlowLinear(config.hidden_size, 3 * config.hidden_size)
        self.proj = FlowLinear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        position: int | torch.Tensor = 0,
        temperatures: tuple[float, ...] = (1.0,),
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal self-attention over `hidden` (B, L, W). With `cache`, `hidden` holds positions
        `position .. position + L - 1`, which also attend to every cached position before them (their own keys
        and values overwrite the cache there). The rows come in equal groups (the guidance branches), group i with
        its attention logits divided by `temperatures[i]`."""
        batch, length, width = hidden.shape
        qkv = self.qkv(layer_norm_fp32(self.norm, hidden))
        query, key, value = qkv.view(batch, length, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        if cache is not None:
            key, value = cache.update(key, value, position)
        visible = None if cache is None else cache.visible(position, length)
        implementation = check_attention_implementation(self.config._attn_implementation)
        out, weights = grouped_causal_attention(
            query, key, value, temperatures, implementation, output_attentions, visible
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, width)), weights


class TarFlowLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer."""

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.attention = TarFlowAttention(config)
        self.mlp = FlowMLP(config.hidden_size, config.mlp_ratio)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention then MLP, each added to its input; the other arguments are [`TarFlowAttention.forward`]'s
        (`cache`, `position`, `temperatures`, `output_attentions`), and so are the attention weights returned."""
        attended, weights = self.attention(hidden, *args, **kwargs)
        hidden = hidden + attended
        return hidden + self.mlp(hidden), weights


@dataclass
class TarFlowCondition:
    """A block's condition while sampling: class embeddings of the rows the transformer sees (the batch, or with
    guidance the batch followed by its unconditional twin, run as one batch), the guidance (None: unguided) and
    the attention temperature of each branch's rows."""

    class_rows: torch.Tensor | None
    guidance: Guidance | None
    temperatures: tuple[float, ...] = (1.0,)

    @property
    def branches(self) -> int:
        return len(self.temperatures)

    def repeat_interleave(self, copies: int) -> TarFlowCondition:
        rows = _repeat_rows(self.class_rows, copies, self.branches)
        return TarFlowCondition(rows, self.guidance, self.temperatures)


class TarFlowBlock(nn.Module):
    """One autoregressive affine flow step over the patch sequence, read in reversed order when `reverse_order`.
    `forward` maps data to latents in one parallel pass; `new_cache` and `affine_span` are the inverse's interface
    (`sampling.AffineBlock`): the samplers run them one patch, or a window of patches, at a time."""

    def __init__(self, config: TarFlowConfig, reverse_order: bool):
        super().__init__()
        self.reverse_order = reverse_order
        self.nvp = config.nvp
        self.proj_in = FlowLinear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.empty(config.num_patches, config.hidden_size))
        self.class_embedding = (
            nn.Parameter(torch.empty(config.num_classes, config.hidden_size)) if config.num_classes else None
        )
        self.layers = nn.ModuleList(TarFlowLayer(config) for _ in range(config.layers_per_block))
        self.proj_out = FlowLinear(config.hidden_size, 2 * config.patch_dim if config.nvp else config.patch_dim)

    def permute(self, sequence: torch.Tensor) -> torch.Tensor:
        """Into (and, being an involution, out of) this block's patch order along dim 1."""
        return sequence.flip(1) if self.reverse_order else sequence

    def class_condition(self, class_labels: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """(B, 1, W) class embedding; label -1 (or no labels) takes the mean embedding, the unconditional branch."""
        if self.class_embedding is None:
            return None
        mean = self.class_embedding.mean(dim=0)
        if class_labels is None:
            return mean.expand(batch_size, 1, -1)
        dropped = (class_labels < 0).view(-1, 1)
        embedding = torch.where(dropped, mean, self.class_embedding[class_labels.clamp(min=0)])
        return embedding.unsqueeze(1)

    def position_table(self) -> torch.Tensor:
        """Position embeddings (1, T, W) in this block's order."""
        return self.permute(self.position_embedding.unsqueeze(0))

    def embed(self, patches: torch.Tensor, positions: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """Transformer input for `patches` (B, L, D) with their rows of the position table (1, L, W). The additions
        run in Apple's order (projection + position, then + class), so half-precision results match too."""
        hidden = self.proj_in(patches.to(input_dtype(self.proj_in))) + positions
        if condition is not None and condition.shape[0] != hidden.shape[0]:  # guidance: both branches' rows
            hidden = hidden.repeat(condition.shape[0] // hidden.shape[0], 1, 1)
        return hidden if condition is None else hidden + condition

    def transformer(
        self,
        hidden: torch.Tensor,
        caches: Sequence[KVCache] | None = None,
        position: int | torch.Tensor = 0,
        temperatures: tuple[float, ...] = (1.0,),
        attentions: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layers; with `attentions`, each layer's attention weights are appended to it."""
        for i, layer in enumerate(self.layers):
            hidden, weights = layer(
                hidden, None if caches is None else caches[i], position, temperatures, attentions is not None
            )
            if attentions is not None:
                attentions.append(weights)
        return hidden

    def scale_shift(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the output projection into log-scale a and shift b."""
        if self.nvp:
            log_scale, shift = out.chunk(2, dim=-1)
            return log_scale, shift
        return torch.zeros_like(out), out

    def forward(
        self, x: torch.Tensor, condition: torch.Tensor | None, attentions: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) in image order -> (z in image order, log|det| (B,) summed over dimensions)."""
        x = self.permute(x)
        out = self.proj_out(self.transformer(self.embed(x, self.position_table(), condition), attentions=attentions))
        # Patch t is transformed by what the transformer read up to t-1; the first patch only by zeros.
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        log_scale, shift = self.scale_shift(out)
        z = (x - shift) * (-at_least_fp32(log_scale)).exp().type(log_scale.dtype)
        return self.permute(z), -at_least_fp32(log_scale).sum(dim=(1, 2))

    # The inverse, as the samplers drive it (patches in this block's order, patch 0 given).
    def sampling_condition(
        self, labels: torch.Tensor | None, batch: int, guidance: Guidance, attention_temperature: float = 1.0
    ) -> TarFlowCondition:
        """Class rows for the transformer: the batch, or with guidance the batch and its unconditional twin; an
        unconditional model's branches differ only by the attention temperature (the rule's
        `unconditional_temperature`)."""
        conditional = self.class_condition(labels, batch)
        temperatures = guidance.branch_temperatures(attention_temperature)
        if not guidance.active:
            return TarFlowCondition(conditional, None, temperatures)
        if conditional is None:
            rows = self.position_embedding.new_zeros(2 * batch, 1, 1)
        else:
            rows = torch.cat([conditional, self.class_condition(None, batch)])
        return TarFlowCondition(rows, guidance, temperatures)

    def new_cache(
        self, condition: TarFlowCondition, batch_size: int, num_tokens: int, static: bool = False
    ) -> list[KVCache]:
        return [KVCache(num_tokens, static) for _ in self.layers]

    def affine_span(
        self,
        tokens: torch.Tensor,
        position: int | torch.Tensor,
        cache: list[KVCache] | None,
        condition: TarFlowCondition,
        weight: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided (a, b) for patches `position + 1 ..` from patches `position ..` (B, n, D) and the cache."""
        positions = rows_at(self.position_table(), position, tokens.shape[1])
        hidden = self.embed(tokens, positions, condition.class_rows)
        hidden = self.transformer(hidden, cache, position, condition.temperatures)
        log_scale, shift = self.scale_shift(self.proj_out(hidden))
        return guide(condition.guidance, log_scale, shift, weight)


class TarFlowPreTrainedModel(FlowModelMixin, PreTrainedModel):
    config: TarFlowConfig
    config_class = TarFlowConfig
    base_model_prefix = "tarflow"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules: ClassVar[list[str]] = ["TarFlowBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Apple's initialisation: PyTorch's defaults, small Gaussian embeddings, and a zero output projection
        # weight so that every block starts as (nearly) the identity.
        if init_torch_defaults(module):
            return
        if isinstance(module, TarFlowBlock):
            init.normal_(module.position_embedding, std=0.01)
            if module.class_embedding is not None:
                init.normal_(module.class_embedding, std=0.01)
            init.zeros_(module.proj_out.weight)
        elif isinstance(module, TarFlowModel):
            init.ones_(module.prior_variance)


class TarFlowModel(TarFlowPreTrainedModel):
    r"""
    TarFlow normalizing flow. `forward` maps images to latents with an exact log-likelihood; `inverse` maps
    latents back to images (sampling), with classifier-free guidance.

    Example:

    ```python
    >>> import torch
    >>> from tarflow_hf import TarFlowConfig, TarFlowModel
    >>> model = TarFlowModel(TarFlowConfig(image_size=16, num_channels=1, patch_size=4, hidden_size=64))
    >>> out = model(torch.rand(2, 1, 16, 16) * 2 - 1)
    >>> out.bits_per_dim.shape
    torch.Size([2])
    >>> images = model.inverse(torch.randn(2, 16, 16))  # (2, 1, 16, 16), model space [-1, 1]
    ```
    """

    prior_variance: torch.Tensor

    def __init__(self, config: TarFlowConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(TarFlowBlock(config, reverse_order=i % 2 == 1) for i in range(config.num_blocks))
        # Variance of the Gaussian prior per latent dimension; all ones for nvp models (Apple's `var`).
        self.register_buffer("prior_variance", torch.ones(config.num_patches, config.patch_dim))
        self.post_init()

    @classmethod
    def from_single_file(cls, checkpoint: str, **kwargs: Any) -> TarFlowModel:
        """Apple's `.pth` as a model, without converting it (`noise_std=`, ...): `tarflow_hf.single_file`."""
        return importlib.import_module("tarflow_hf.single_file").load_model(cls, checkpoint, **kwargs)

    # ----------------------------------------------------------------------------------------- shapes & inputs
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T, C * p * p), patches in row-major order, channel-major within a patch
        (the layout of `torch.nn.functional.unfold`)."""
        b, c, h, w = images.shape
        p = self.config.patch_size
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`."""
        b = patches.shape[0]
        c, p, side = self.config.num_channels, self.config.patch_size, self.config.image_size // self.config.patch_size
        images = patches.reshape(b, side, side, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return images.reshape(b, c, side * p, side * p)

    def _check_images(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1:] != expected:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), got {got}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        expected = (self.config.num_patches, self.config.patch_dim)
        if not isinstance(latents, torch.Tensor) or latents.dim() != 3 or latents.shape[1:] != expected:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape (batch, {expected[0]}, {expected[1]}), got {got}")

    def prepare_class_labels(
        self, class_labels: torch.Tensor | Sequence[int] | int | None, batch_size: int
    ) -> torch.Tensor | None:
        """Check labels and return a (B,) long tensor on the model's device, or None for the mean class."""
        num_classes = self.config.num_classes
        if class_labels is None:
            return None
        if num_classes == 0:
            raise ValueError("this model is unconditional (num_classes=0); pass class_labels=None")
        labels = torch.as_tensor(class_labels, device=self.device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1 and batch_size != 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for a batch of {batch_size}")
        bad = labels[(labels < -1) | (labels >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"class label {bad[0].item()} is out of range; allowed are 0..{num_classes - 1}, or -1 for the "
                "unconditional (mean-class) branch"
            )
        return labels

    # ---------------------------------------------------------------------------------------------- density
    def forward(
        self,
        pixel_values: torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> TarFlowOutput | tuple:
        r"""
        Map images to latents with the exact log-likelihood.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                Images in model space, [-1, 1] (plus whatever noise the model was trained with).
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class per image; -1 or `None` selects the unconditional (mean class embedding) branch.
            output_hidden_states (`bool`, *optional*): return the patch sequence after every block.
            return_dict (`bool`, *optional*): return a [`TarFlowOutput`] rather than a tuple.
            output_attentions (`bool`, *optional*): return every layer's attention weights (computed with the
                explicit softmax for the call, whatever `attn_implementation` is).
        """
        output_hidden_states, return_dict, output_attentions = self.output_options(
            output_hidden_states, return_dict, output_attentions
        )
        self._check_images(pixel_values)
        labels = self.prepare_class_labels(class_labels, pixel_values.shape[0])

        x = self.patchify(pixel_values.to(self.prior_variance))  # the model's device and dtype
        logdet = at_least_fp32(x.new_zeros(x.shape[0]))
        hidden_states, attentions = [], [] if output_attentions else None
        for block in self.blocks:
            x, block_logdet = block(x, block.class_condition(labels, x.shape[0]), attentions)
            logdet = logdet + block_logdet
            hidden_states.append(x)

        num_dims = x.shape[1] * x.shape[2]
        loss = 0.5 * x.pow(2).mean() - (logdet / num_dims).mean()
        prior_log_likelihood = -0.5 * at_least_fp32(x).pow(2).flatten(1).sum(1) - 0.5 * num_dims * LOG_TWO_PI
        log_likelihood = prior_log_likelihood + logdet
        bits_per_dim = (-log_likelihood / num_dims + LOG_PIXEL_SCALE) / math.log(2)
        output = TarFlowOutput(
            loss=loss,
            latents=x,
            logdet=logdet,
            log_likelihood=log_likelihood,
            bits_per_dim=bits_per_dim,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def inverse(
        self,
        latents: torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | None = None,
        guidance_scale: float | Callable[[int], float] = 1.0,
        guidance_rule: GuidanceRule | str | None = None,
        attention_temperature: float = 1.0,
        sampler: FlowSampler | str | None = None,
        callback: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, SamplingStats]:
        r"""
        Map prior samples back to images: the flow run backwards, block by block, patch by patch.

        Args:
            latents (`torch.Tensor` of shape `(batch_size, num_patches, patch_dim)`): standard normal samples.
            class_labels: labels (B,) or one label for all; `None`/-1 is the unconditional branch.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance in the diffusers convention; 1.0 is
                no guidance. Apple's `guidance=g` is `1 + g`. A callable is asked for each block's scale (by its
                step in sampling order), so that a callback can change the guidance of the blocks still to run.
            guidance_rule (`GuidanceRule` or `str`, *optional*): how the branches combine (`tarflow_hf.guidance`):
                the config's `default_guidance_rule` (TarFlow's `"extrapolate"`) when None. Apple's `guide_what`
                is the rule's `target`, `annealed_guidance` its `schedule="linear"`, `attn_temp` its
                `unconditional_temperature`.
            attention_temperature (`float`, defaults to 1.0): divides the attention logits of every layer, in every
                branch.
            sampler (`FlowSampler` or `str`, *optional*): how each block is inverted (`tarflow_hf.samplers`); the
                exact `SequentialSampler` when None.
            callback (`Callable[[int, torch.Tensor], torch.Tensor | None]`, *optional*): called after each block
                (in sampling order) with its index and the current images; images it returns replace them.
            return_stats (`bool`): also return a [`SamplingStats`].

        Returns:
            `torch.Tensor` of shape `(batch_size, num_channels, image_size, image_size)`: images in model space,
            nominally [-1, 1], not clipped; float32 whatever the weights' precision (float64 for a float64 model).
        """
        self._check_latents(latents)
        rule = GuidanceRule.parse(guidance_rule, self.config.default_guidance_rule)
        scale_at = guidance_scale if callable(guidance_scale) else lambda step: guidance_scale
        temperature = check_positive_number("attention_temperature", attention_temperature)
        sampler = get_sampler(sampler)
        batch = latents.shape[0]
        labels = self.prepare_class_labels(class_labels, batch)
        stats = SamplingStats()
        # The trajectory stays in float32 whatever the weights (float64 for a float64 model): half-precision weights
        # round each block's prediction, not the sample carried from block to block.
        precision = torch.float64 if self.prior_variance.dtype == torch.float64 else torch.float32
        x = latents.to(self.device, precision) * self.prior_variance.to(precision).sqrt()
        for step, block in enumerate(reversed(self.blocks)):
            condition = block.sampling_condition(labels, batch, Guidance(scale_at(step), rule), temperature)
            inverted, record = sampler.invert_block(block, block.permute(x), condition, step)
            stats.add_block(record)
            x = block.permute(inverted)
            replaced = None if callback is None else callback(step, self.unpatchify(x))
            if replaced is not None:
                self._check_images(replaced)
                x = self.patchify(replaced.to(x))
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                "sampling produced non-finite values (NaN or inf): NaN latents or weights give NaN samples; "
                "otherwise the log-scale overflowed: with float16 or bfloat16 try float32, a lower guidance_scale, "
                "or smaller latents"
            )
        images = self.unpatchify(x)
        return (images, stats) if return_stats else images

    # ------------------------------------------------------------------------------------------- denoising
    def denoise(
        self,
        images: torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | None = None,
        noise_std: float | None = None,
        strength: float = 1.0,
        batch_size: int = 16,
    ) -> torch.Tensor:
        r"""
        One Tweedie score step `x + strength * sigma**2 * grad_x log p(x)`, with the model's own likelihood.

        Samples of a model trained on noisy images carry that noise; this removes it. Computed image by image
        (the gradient of a sum of per-image log-likelihoods), in chunks of `batch_size` to bound memory, so the
        result does not depend on how images are batched.
        """
        sigma = self.config.noise_std if noise_std is None else noise_std
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {sigma!r}")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self._check_images(images)
        labels = self.prepare_class_labels(class_labels, images.shape[0])
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            # Inference mode (a caller's `torch.inference_mode()`) would make the step's gradient impossible, and
            # tensors made in it cannot enter autograd: clones made outside it can.
            with torch.inference_mode(False), torch.enable_grad(), checkpointed_layers(self):
                chunk = images[start : start + batch_size].clone().detach().requires_grad_(True)
                chunk_labels = None if labels is None else labels[start : start + batch_size].clone()
                log_likelihood = self(chunk, chunk_labels).log_likelihood
                (score,) = torch.autograd.grad(log_likelihood.sum(), chunk)
            outputs.append((chunk + strength * sigma**2 * score).detach())
        return self.checked_denoised(torch.cat(outputs))


__all__ = ["TarFlowConfig", "TarFlowModel", "TarFlowOutput", "TarFlowPreTrainedModel"]
