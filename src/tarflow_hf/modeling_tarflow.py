"""TarFlow: a normalizing flow of causal-transformer affine blocks over image patches.

Each block reads the patch sequence (in its own order: blocks alternate between the identity and the reversed
order) and maps every patch x_t to z_t = (x_t - b_t) * exp(-a_t), where (a_t, b_t) come from a causal
transformer over the patches before t. The forward direction is one parallel pass per block and gives an exact
log-likelihood; the inverse is autoregressive over patches, done here with a pre-allocated key/value cache.

The arithmetic follows apple/ml-tarflow (`transformer_flow.py`) operation for operation, including where it
computes in float32 under autocast (LayerNorm, exp), so converted checkpoints give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_tarflow import TarFlowConfig

logger = logging.get_logger(__name__)

GuidanceTarget = Literal["both", "scale", "shift"]
GuidanceSchedule = Literal["constant", "linear"]
GUIDANCE_TARGETS = ("both", "scale", "shift")
GUIDANCE_SCHEDULES = ("constant", "linear")
SAMPLERS = ("sequential", "jacobi", "newton")
# Jacobi window while the iteration stagnates: wide enough to catch a stretch that converges at once.
JACOBI_PROBE_WINDOW = 16
JACOBI_STAGNATION_PASSES = 5
# Finite-difference step of the Newton sampler's Jacobian columns (model space, float32).
NEWTON_PROBE_STEP = 1e-3
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
    """

    loss: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    logdet: torch.Tensor | None = None
    log_likelihood: torch.Tensor | None = None
    bits_per_dim: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class JacobiStats:
    """What the sampler did, per flow block in sampling order."""

    iterations: list[int] = field(default_factory=list)
    """Transformer passes of each block run by a parallel sampler (Jacobi or Newton; each pass settles one patch
    or more); 0 for a block run sequentially."""
    sequential_steps: list[int] = field(default_factory=list)
    """One-patch steps: T - 1 for a sequential block; for a Jacobi block, the steps taken after its
    `jacobi_max_iterations` budget ran out (these are included in `iterations`)."""
    residuals: list[float] = field(default_factory=list)
    """Largest movement, in its last pass, of a patch feeding one that a parallel block accepted (at most the
    tolerance; 0.0 where every patch was settled exactly)."""
    rows_computed: list[int] = field(default_factory=list)
    """Transformer rows (patch positions) computed per image and branch: T - 1 for a sequential block; more for a
    parallel one, which recomputes unsettled patches each pass (Newton: on 2 * patch_dim + 1 copies). The compute
    cost, where passes are the latency."""

    def add_block(self, iterations: int, sequential_steps: int, residual: float, rows_computed: int) -> None:
        self.iterations.append(iterations)
        self.sequential_steps.append(sequential_steps)
        self.residuals.append(residual)
        self.rows_computed.append(rows_computed)

    @property
    def sequential_blocks(self) -> list[bool]:
        """Blocks that ran patch by patch from the start."""
        return [iterations == 0 for iterations in self.iterations]

    @property
    def transformer_passes(self) -> int:
        """Transformer evaluations that had to run one after another. The sequential sampler needs
        num_blocks * (T - 1)."""
        pairs = zip(self.iterations, self.sequential_steps, strict=True)
        return sum(steps if iterations == 0 else iterations for iterations, steps in pairs)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Apple computes LayerNorm, exp and the log-determinant in float32 whatever the autocast dtype (we also
    # leave float64 alone, for exact checks).
    return x if x.dtype == torch.float64 else x.float()


def _layer_norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # The affine parameters go up to float32 too, so that half-precision weights work on every device.
    weight, bias = _at_least_fp32(norm.weight), _at_least_fp32(norm.bias)
    return F.layer_norm(_at_least_fp32(x), norm.normalized_shape, weight, bias, norm.eps).type(x.dtype)


def _repeat_rows(rows: torch.Tensor | None, copies: int, branches: int) -> torch.Tensor | None:
    """Per-row tensors (branches * B, ...) for a batch whose every image is repeated `copies` times in a row,
    branch by branch: (branches * B * copies, ...)."""
    if rows is None:
        return None
    grouped = rows.view(branches, rows.shape[0] // branches, *rows.shape[1:])
    return grouped.repeat_interleave(copies, dim=1).flatten(0, 1)


def _accept_patches(
    guesses: torch.Tensor, previous: torch.Tensor, latents: torch.Tensor, bound: torch.Tensor, tolerance: float
) -> tuple[torch.Tensor, int, float, torch.Tensor]:
    """One pass of a parallel sampler over the patches after the settled prefix: `guesses` (B, L, D) computed
    from `previous`, whose first patch is exact (it reads settled patches only). The leading patches are accepted
    up to and including the first one whose input row was fed a patch that moved by more than `tolerance` (it
    was still computed from settled inputs); that is at least one patch, so a block never takes more passes than
    patch by patch. Far from the fixed point, a later guess can overflow, or grow past `bound` and overflow inside
    the transformer, where one non-finite key or value turns every row of the next pass into NaN: such guesses
    count as moving and restart from their latents, unless accepted (an accepted overflow is real, and reported
    when sampling ends). Returns (the patches for the next pass, number accepted, largest movement of an
    accepted patch's inputs, movement per patch)."""
    wild = ~(guesses.abs() <= bound)  # NaN too
    movement = (guesses - previous).abs().amax(dim=(0, 2)).masked_fill(wild.any(dim=2).any(dim=0), math.inf)
    moving = (~(movement <= tolerance)).nonzero()
    accepted = min(int(moving[0]) + 1 if len(moving) else len(movement), len(movement))
    wild[:, :accepted] = False
    residual = movement[: accepted - 1].max().item() if accepted > 1 else 0.0
    return torch.where(wild, latents, guesses), accepted, residual, movement


def _guess_bound(latent_range: torch.Tensor, settled: torch.Tensor) -> torch.Tensor:
    """A generous range for a parallel sampler's guesses: ten times the largest latent (`latent_range`) or settled
    value (a 0-d tensor, so no device sync)."""
    return 10.0 * torch.maximum(latent_range, settled.abs().amax()).clamp(min=1.0)


class KVCache:
    """Keys and values of one attention layer, written in place one position at a time."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
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


class TarFlowAttention(nn.Module):
    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.norm = nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        position: int = 0,
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over `hidden` (B, L, W). With `cache`, `hidden` holds positions
        `position .. position + L - 1`, which also attend to every cached position before them (their own keys
        and values overwrite the cache there). `query_scale` (B, 1, 1, 1) divides the
        attention logits of selected rows by a temperature."""
        batch, length, width = hidden.shape
        qkv = self.qkv(_layer_norm_fp32(self.norm, hidden))
        query, key, value = qkv.view(batch, length, 3 * self.num_heads, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        if query_scale is not None:
            query = query * query_scale.to(query.dtype)
        if cache is not None:
            key, value = cache.update(key, value, position)
        mask = None
        if length > 1 and position > 0:  # a window after cached positions: causal, aligned to the last key
            mask = causal_lower_right(length, position + length)  # keeps the fused kernels usable on GPU
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=length > 1 and position == 0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class TarFlowMLP(nn.Module):
    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_ratio * config.hidden_size)
        self.fc2 = nn.Linear(config.mlp_ratio * config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(_layer_norm_fp32(self.norm, hidden))))


class TarFlowLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.attention = TarFlowAttention(config)
        self.mlp = TarFlowMLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: KVCache | None = None,
        position: int = 0,
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = hidden + self.attention(hidden, cache, position, query_scale)
        return hidden + self.mlp(hidden)


class TarFlowBlock(nn.Module):
    """One autoregressive affine flow step over the patch sequence, read in reversed order when `reverse_order`."""

    def __init__(self, config: TarFlowConfig, reverse_order: bool):
        super().__init__()
        self.reverse_order = reverse_order
        self.nvp = config.nvp
        self.proj_in = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Parameter(torch.empty(config.num_patches, config.hidden_size))
        self.class_embedding = (
            nn.Parameter(torch.empty(config.num_classes, config.hidden_size)) if config.num_classes else None
        )
        self.layers = nn.ModuleList(TarFlowLayer(config) for _ in range(config.layers_per_block))
        self.proj_out = nn.Linear(config.hidden_size, 2 * config.patch_dim if config.nvp else config.patch_dim)

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
        hidden = self.proj_in(patches) + positions
        if condition is not None and condition.shape[0] != hidden.shape[0]:  # guidance: both branches' rows
            hidden = hidden.repeat(condition.shape[0] // hidden.shape[0], 1, 1)
        return hidden if condition is None else hidden + condition

    def transformer(
        self,
        hidden: torch.Tensor,
        caches: Sequence[KVCache] | None = None,
        position: int = 0,
        query_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, None if caches is None else caches[i], position, query_scale)
        return hidden

    def scale_shift(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the output projection into log-scale a and shift b."""
        if self.nvp:
            log_scale, shift = out.chunk(2, dim=-1)
            return log_scale, shift
        return torch.zeros_like(out), out

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) in image order -> (z in image order, log|det| (B,) summed over dimensions)."""
        x = self.permute(x)
        out = self.proj_out(self.transformer(self.embed(x, self.position_table(), condition)))
        # Patch t is transformed by what the transformer read up to t-1; the first patch only by zeros.
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        log_scale, shift = self.scale_shift(out)
        z = (x - shift) * (-_at_least_fp32(log_scale)).exp().type(log_scale.dtype)
        return self.permute(z), -_at_least_fp32(log_scale).sum(dim=(1, 2))


class TarFlowPreTrainedModel(PreTrainedModel):
    config: TarFlowConfig
    config_class = TarFlowConfig
    base_model_prefix = "tarflow"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules: ClassVar[list[str]] = ["TarFlowBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Apple's initialisation: PyTorch's defaults, small Gaussian embeddings, and a zero output projection
        # weight so that every block starts as (nearly) the identity.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, TarFlowBlock):
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
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_images(pixel_values)
        labels = self.prepare_class_labels(class_labels, pixel_values.shape[0])

        x = self.patchify(pixel_values.to(self.prior_variance))  # the model's device and dtype
        logdet = _at_least_fp32(x.new_zeros(x.shape[0]))
        hidden_states = []
        for block in self.blocks:
            x, block_logdet = block(x, block.class_condition(labels, x.shape[0]))
            logdet = logdet + block_logdet
            hidden_states.append(x)

        num_dims = x.shape[1] * x.shape[2]
        loss = 0.5 * x.pow(2).mean() - (logdet / num_dims).mean()
        prior_log_likelihood = -0.5 * _at_least_fp32(x).pow(2).flatten(1).sum(1) - 0.5 * num_dims * LOG_TWO_PI
        log_likelihood = prior_log_likelihood + logdet
        bits_per_dim = (-log_likelihood / num_dims + LOG_PIXEL_SCALE) / math.log(2)
        output = TarFlowOutput(
            loss=loss,
            latents=x,
            logdet=logdet,
            log_likelihood=log_likelihood,
            bits_per_dim=bits_per_dim,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def inverse(
        self,
        latents: torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | None = None,
        guidance_scale: float = 1.0,
        guidance_target: GuidanceTarget = "both",
        guidance_schedule: GuidanceSchedule = "constant",
        attention_temperature: float = 1.0,
        sampler: Literal["sequential", "jacobi", "newton"] = "sequential",
        jacobi_tolerance: float = 1e-4,
        jacobi_window: int | None = None,
        jacobi_max_iterations: int | None = None,
        jacobi_sequential_blocks: int = 0,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, JacobiStats]:
        r"""
        Map prior samples back to images: the flow run backwards, block by block, patch by patch.

        Args:
            latents (`torch.Tensor` of shape `(batch_size, num_patches, patch_dim)`): standard normal samples.
            class_labels: labels (B,) or one label for all; `None`/-1 is the unconditional branch.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance in the diffusers convention,
                `uncond + w * (cond - uncond)`; 1.0 is no guidance. Apple's `guidance=g` is `w = 1 + g`.
            guidance_target (`str`): guide the log-scale (`"scale"`), the shift (`"shift"`) or `"both"`.
            guidance_schedule (`str`): `"constant"`, or `"linear"`: Apple's annealed guidance, whose strength
                grows with the patch index, `w_t = 1 + (w - 1) * (t + 1) / (T - 1)`.
            attention_temperature (`float`): divides the attention logits of the unconditional branch.
            sampler (`str`): `"sequential"` (exact, one patch at a time with a key/value cache) or `"jacobi"`
                (parallel fixed-point iteration over many patches at once, to `jacobi_tolerance`; it never takes
                more sequential transformer passes than `"sequential"`) or `"newton"` (quasi-Newton steps on the
                same fixed point: fewer passes than Jacobi where patches depend strongly on the previous one, for
                about 2 * patch_dim + 1 times Jacobi's compute and memory per pass, e.g. 385x for
                AFHQ-256's 8x8x3 patches; float32).
            jacobi_tolerance (`float`): a patch counts as settled once the patches before it moved by at most
                this in a pass (model space, [-1, 1]). The sequence amplifies what is left, so the images' error is
                a few times this (bundled model: 1e-4 gives about 3e-4 in model space; `benchmarks/sampling.py`).
            jacobi_window (`int`, *optional*): patches iterated together after the settled prefix; default all of
                them (fewest passes). A smaller window (Gauss-Seidel-Jacobi segments) computes less per pass.
            jacobi_max_iterations (`int`, *optional*): passes per block after which the rest of the block goes one
                patch at a time (exact). Default: no limit.
            jacobi_sequential_blocks (`int`): force this many of the first blocks in sampling order to run
                sequentially.
            callback (`Callable[[int, torch.Tensor], None]`, *optional*): called after each block (in sampling
                order) with its index and the current images.
            return_stats (`bool`): also return a [`JacobiStats`].

        Returns:
            `torch.Tensor` of shape `(batch_size, num_channels, image_size, image_size)`: images in model space,
            nominally [-1, 1], not clipped.
        """
        self._check_latents(latents)
        guidance = self._guidance_plan(guidance_scale, guidance_target, guidance_schedule, attention_temperature)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if jacobi_tolerance <= 0:
            raise ValueError(f"jacobi_tolerance must be > 0, got {jacobi_tolerance}")
        if sampler == "newton" and (jacobi_window is not None or jacobi_max_iterations is not None):
            raise ValueError(
                "jacobi_window and jacobi_max_iterations apply to sampler='jacobi' only; 'newton' works on all "
                "patches and never takes more passes than 'sequential'"
            )
        if jacobi_window is not None and jacobi_window < 1:
            raise ValueError(f"jacobi_window must be >= 1 (or None for all patches), got {jacobi_window}")
        if jacobi_max_iterations is not None and jacobi_max_iterations < 1:
            raise ValueError(f"jacobi_max_iterations must be >= 1, got {jacobi_max_iterations}")
        if jacobi_sequential_blocks < 0:
            raise ValueError(f"jacobi_sequential_blocks must be >= 0, got {jacobi_sequential_blocks}")
        num_patches = self.config.num_patches
        batch = latents.shape[0]
        labels = self.prepare_class_labels(class_labels, batch)
        stats = JacobiStats()

        x = latents.to(self.prior_variance) * self.prior_variance.sqrt()  # the model's device and dtype
        for step, block in enumerate(reversed(self.blocks)):
            conditions, query_scale = self._branch_conditions(block, labels, batch, guidance)
            z = block.permute(x)
            if sampler == "sequential" or step < jacobi_sequential_blocks:
                inverted = self._invert_block_sequential(block, z, conditions, query_scale, guidance)
                record = (0, num_patches - 1, 0.0, num_patches - 1)
            elif sampler == "newton":
                inverted, *record = self._invert_block_newton(
                    block, z, conditions, query_scale, guidance, jacobi_tolerance
                )
            else:
                inverted, *record = self._invert_block_jacobi(
                    block, z, conditions, query_scale, guidance, jacobi_tolerance, jacobi_window, jacobi_max_iterations
                )
            stats.add_block(*record)
            x = block.permute(inverted)
            if callback is not None:
                callback(step, self.unpatchify(x))
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                "sampling produced non-finite values (exp overflow of the log-scale); with float16 or bfloat16 "
                "try float32, a lower guidance_scale, or smaller latents"
            )
        images = self.unpatchify(x)
        return (images, stats) if return_stats else images

    def _guidance_plan(
        self, guidance_scale: float, target: str, schedule: str, attention_temperature: float
    ) -> dict | None:
        if target not in GUIDANCE_TARGETS:
            raise ValueError(f"guidance_target must be one of {GUIDANCE_TARGETS}, got {target!r}")
        if schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if not attention_temperature > 0:
            raise ValueError(f"attention_temperature must be > 0, got {attention_temperature}")
        if guidance_scale == 1.0:
            return None
        return {
            "weight": guidance_scale - 1.0,
            "scale": target in ("both", "scale"),
            "shift": target in ("both", "shift"),
            "linear": schedule == "linear",
            "temperature": attention_temperature,
        }

    @staticmethod
    def _branch_conditions(
        block: TarFlowBlock, labels: torch.Tensor | None, batch: int, guidance: dict | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Class conditions (rows, 1, W) for the rows the transformer sees: the batch, or with guidance the batch
        followed by its unconditional twin (one batched pass for both branches). Also the per-row query scale
        (2B, 1, 1, 1) that applies the attention temperature to the unconditional rows only."""
        conditional = block.class_condition(labels, batch)
        if guidance is None:
            return conditional, None
        unconditional = block.class_condition(None, batch)
        if conditional is None:  # unconditional model: the branches differ only by attention temperature
            conditions = block.position_embedding.new_zeros(2 * batch, 1, 1)
        else:
            conditions = torch.cat([conditional, unconditional])
        query_scale = None
        if guidance["temperature"] != 1.0:
            query_scale = torch.ones(2 * batch, 1, 1, 1, device=conditions.device)
            query_scale[batch:] = 1.0 / guidance["temperature"]
        return conditions, query_scale

    @staticmethod
    def _guided_scale_shift(
        block: TarFlowBlock, hidden: torch.Tensor, guidance: dict | None, weight: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) from the last hidden states; with guidance, hidden is [conditional; unconditional] rows and
        the result is cond + weight * (cond - uncond) on the guided parts."""
        log_scale, shift = block.scale_shift(block.proj_out(hidden))
        if guidance is None:
            return log_scale, shift
        a_cond, a_uncond = log_scale.chunk(2)
        b_cond, b_uncond = shift.chunk(2)
        # Combined in the projection's dtype, as Apple does, so that half-precision samples match too.
        if isinstance(weight, torch.Tensor):  # per-row weights of the linear schedule
            weight = weight.to(log_scale.dtype)
        if guidance["scale"]:
            a_cond = a_cond + weight * (a_cond - a_uncond)
        if guidance["shift"]:
            b_cond = b_cond + weight * (b_cond - b_uncond)
        return a_cond, b_cond

    def _invert_block_sequential(
        self,
        block: TarFlowBlock,
        z: torch.Tensor,
        conditions: torch.Tensor | None,
        query_scale: torch.Tensor | None,
        guidance: dict | None,
    ) -> torch.Tensor:
        """Exact inverse of one block, z in the block's order: patch t+1 from patches 0..t, one at a time, each
        step reading the keys and values of the earlier ones from a pre-allocated cache."""
        x = z.clone()
        num_patches = x.shape[1]
        caches = [KVCache(num_patches) for _ in block.layers]
        positions = block.position_table()
        weight = 0.0 if guidance is None else guidance["weight"]
        for t in range(num_patches - 1):
            hidden = block.embed(x[:, t : t + 1], positions[:, t : t + 1], conditions)
            hidden = block.transformer(hidden, caches, t, query_scale)
            if guidance is not None and guidance["linear"]:
                weight = guidance["weight"] * (t + 1) / (num_patches - 1)
            log_scale, shift = self._guided_scale_shift(block, hidden, guidance, weight)
            scale = _at_least_fp32(log_scale).exp().type(log_scale.dtype)
            x[:, t + 1 : t + 2] = torch.addcmul(shift, x[:, t + 1 : t + 2], scale)
        return x

    def _invert_block_jacobi(
        self,
        block: TarFlowBlock,
        z: torch.Tensor,
        conditions: torch.Tensor | None,
        query_scale: torch.Tensor | None,
        guidance: dict | None,
        tolerance: float,
        window: int | None,
        budget: int | None,
    ) -> tuple[torch.Tensor, int, int, float, int]:
        """Inverse of one block by fixed-point iteration x <- z * exp(a(x)) + b(x) on a window of patches after a
        settled prefix: Jacobi inside the window, Gauss-Seidel from one window to the next.

        The settled prefix lives in a key/value cache, so a pass computes only the window. Window row t predicts
        patch t + 1. The first row reads settled patches only, so each pass settles at least one patch exactly;
        it settles the following ones too while the rows before them were fed patches that moved by at most
        `tolerance`. So Jacobi never needs more passes than the sequential sampler. The window starts at `window`
        patches (default: all), doubles whenever a pass settles all of it, and drops to a small probe while the
        iteration stagnates (one patch per pass, the largest movement not shrinking: a stretch of strong
        dependence where a wide window only wastes compute). After `budget` passes, the rest goes one patch at a
        time. Returns (x, passes, of which one-patch passes after the budget, largest accepted movement, rows
        computed)."""
        num_patches = z.shape[1]
        widest = num_patches - 1 if window is None else min(window, num_patches - 1)
        width = widest
        weight = self._guidance_weight(guidance, num_patches, z.device)
        x = z.clone()
        caches = [KVCache(num_patches) for _ in block.layers]
        positions = block.position_table()
        frontier = passes = after_budget = rows_computed = 0  # patches 0..frontier are settled
        residual, movements = 0.0, []
        latent_range = z.abs().amax()
        while frontier < num_patches - 1:
            if budget is not None and passes >= budget:
                width, after_budget = 1, after_budget + 1
            end = min(frontier + width, num_patches - 1)
            hidden = block.embed(x[:, frontier:end], positions[:, frontier:end], conditions)
            hidden = block.transformer(hidden, caches, frontier, query_scale)
            row_weight = weight[:, frontier:end] if isinstance(weight, torch.Tensor) else weight
            log_scale, shift = self._guided_scale_shift(block, hidden, guidance, row_weight)
            scale = _at_least_fp32(log_scale).exp().type(log_scale.dtype)
            if passes == 0:
                self._warn_if_tolerance_below_resolution(tolerance, shift.dtype)
            targets = z[:, frontier + 1 : end + 1]
            guesses = torch.addcmul(shift, targets, scale)
            bound = _guess_bound(latent_range, x[:, : frontier + 1])
            x[:, frontier + 1 : end + 1], settled, accepted_movement, movement = _accept_patches(
                guesses, x[:, frontier + 1 : end + 1], targets, bound, tolerance
            )
            movements.append(movement.max().item())
            passes, rows_computed = passes + 1, rows_computed + end - frontier
            residual = max(residual, accepted_movement)
            whole_window = settled == end - frontier
            frontier += settled
            if whole_window:  # a new stretch starts from the latents: its history says nothing
                width, movements = min(2 * width, widest), []
            elif settled == 1 and self._jacobi_stagnates(movements):
                width, movements = min(width, JACOBI_PROBE_WINDOW), []
        return x, passes, after_budget, residual, rows_computed

    def _invert_block_newton(
        self,
        block: TarFlowBlock,
        z: torch.Tensor,
        conditions: torch.Tensor | None,
        query_scale: torch.Tensor | None,
        guidance: dict | None,
        tolerance: float,
    ) -> tuple[torch.Tensor, int, int, float, int]:
        """Inverse of one block by quasi-Newton steps on the Jacobi fixed point x = F(x), F(x)_t = z_t * exp(a_t(x))
        + b_t(x), with the same settled-prefix bookkeeping as `_invert_block_jacobi` (so, again, never more passes
        than the sequential sampler).

        A Newton step solves (I - J) delta = F(x) - x. J is strictly block lower triangular; in trained models its
        largest blocks are dF_t/dx_{t-1}, so the step keeps just those: delta_t = r_t + dF_t/dx_{t-1} delta_{t-1},
        a recurrence of small matrix products, not transformer passes. Those blocks come from finite differences
        in the same batched pass as F(x): one copy of the batch per patch dimension and parity of the patch index
        (perturbing every other patch keeps dF_t/dx_{t-1} apart from dF_t/dx_{t-2}). A step that would overflow or
        leave the range of the Jacobi values falls back to the Jacobi value for that patch. Returns (x, passes, 0,
        largest accepted movement, rows computed per image and branch)."""
        batch, num_patches, patch_dim = z.shape
        copies = 1 + 2 * patch_dim
        probes = z.new_zeros(copies, num_patches, patch_dim)
        for parity in (0, 1):
            for dim in range(patch_dim):
                probes[1 + parity * patch_dim + dim, parity::2, dim] = NEWTON_PROBE_STEP
        branches = 1 if guidance is None else 2
        probe_conditions = _repeat_rows(conditions, copies, branches)
        probe_query_scale = _repeat_rows(query_scale, copies, branches)
        weight = self._guidance_weight(guidance, num_patches, z.device)
        row_weight = weight[:, :-1] if isinstance(weight, torch.Tensor) else weight
        positions = block.position_table()[:, :-1]
        probe_z = z.repeat_interleave(copies, dim=0)
        x = z.clone()
        frontier = passes = rows_computed = 0
        latent_range = z.abs().amax()
        residual = 0.0
        while frontier < num_patches - 1:
            rows = (x.unsqueeze(1) + probes).flatten(0, 1)[:, :-1]  # (batch * copies, T - 1, D)
            hidden = block.transformer(block.embed(rows, positions, probe_conditions), query_scale=probe_query_scale)
            log_scale, shift = self._guided_scale_shift(block, hidden, guidance, row_weight)
            if passes == 0 and shift.dtype.itemsize < 4:
                logger.warning_once(
                    f"sampler='newton' takes derivatives by finite differences, which {shift.dtype} arithmetic "
                    "cannot resolve: its steps will be noise. Use sampler='jacobi', or sample in float32."
                )
            scale = _at_least_fp32(log_scale).exp().type(log_scale.dtype)
            mapped = torch.cat([probe_z[:, :1], torch.addcmul(shift, probe_z[:, 1:], scale)], dim=1)
            mapped = mapped.view(batch, copies, num_patches, patch_dim)
            jacobi = mapped[:, 0]
            # derivative[b, parity, i, t, o] = dF_t[o] / dx_s[i] summed over patches s of that parity before t
            derivative = ((mapped[:, 1:] - jacobi.unsqueeze(1)) / NEWTON_PROBE_STEP).view(
                batch, 2, patch_dim, num_patches, patch_dim
            )
            step = torch.zeros_like(x)
            step[:, frontier + 1] = jacobi[:, frontier + 1] - x[:, frontier + 1]
            for t in range(frontier + 2, num_patches):
                coupling = derivative[:, (t - 1) % 2, :, t, :]
                step[:, t] = jacobi[:, t] - x[:, t] + torch.einsum("bi,bio->bo", step[:, t - 1], coupling)
            # Far from the fixed point a step can overshoot wildly: such patches take their Jacobi value instead.
            bound = _guess_bound(latent_range, x[:, : frontier + 1])
            proposal = (x + step)[:, frontier + 1 :]
            proposal = torch.where(proposal.abs() <= bound, proposal, jacobi[:, frontier + 1 :])
            proposal[:, 0] = jacobi[:, frontier + 1]  # exact: read settled patches only
            x[:, frontier + 1 :], settled, accepted_movement, _ = _accept_patches(
                proposal, x[:, frontier + 1 :], z[:, frontier + 1 :], bound, tolerance
            )
            passes, rows_computed = passes + 1, rows_computed + copies * (num_patches - 1)
            residual = max(residual, accepted_movement)
            frontier += settled
        return x, passes, 0, residual, rows_computed

    @staticmethod
    def _warn_if_tolerance_below_resolution(tolerance: float, dtype: torch.dtype) -> None:
        # In float32 a tiny tolerance is a legitimate request for the exact result. In half precision, rounding
        # moves every patch by about eps * |value| each pass, so a finer tolerance is never met and Jacobi settles
        # one patch per pass: correct, but slower than the sequential sampler.
        resolution = torch.finfo(dtype).eps
        if dtype.itemsize < 4 and tolerance < resolution:
            logger.warning_once(
                f"jacobi_tolerance={tolerance:g} is below the resolution of {dtype} arithmetic ({resolution:.1e}): "
                "Jacobi will settle about one patch per pass. Use a tolerance near that resolution (the images' "
                "error will be a few times it), or sample in float32."
            )

    @staticmethod
    def _jacobi_stagnates(movements: list[float]) -> bool:
        """The largest movement has not halved over the last `JACOBI_STAGNATION_PASSES` passes."""
        n = JACOBI_STAGNATION_PASSES
        return len(movements) > n and movements[-1] > 0.5 * movements[-1 - n]

    @staticmethod
    def _guidance_weight(guidance: dict | None, num_patches: int, device: torch.device) -> torch.Tensor | float:
        """Guidance weight per transformer row: a number, or (1, T, 1) for the linear schedule, where row t
        (which predicts patch t + 1) gets weight * (t + 1) / (T - 1), as in the sequential loop."""
        if guidance is None:
            return 0.0
        if not guidance["linear"]:
            return guidance["weight"]
        steps = torch.arange(1, num_patches + 1, device=device, dtype=torch.float32)
        return (guidance["weight"] * steps / max(num_patches - 1, 1)).view(1, -1, 1)

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
        if sigma < 0 or not math.isfinite(sigma):
            raise ValueError(f"noise_std must be a finite number >= 0, got {sigma}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_images(images)
        labels = self.prepare_class_labels(class_labels, images.shape[0])
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].detach().clone().requires_grad_(True)
            chunk_labels = None if labels is None else labels[start : start + batch_size]
            with torch.enable_grad():
                log_likelihood = self(chunk, chunk_labels).log_likelihood
                (score,) = torch.autograd.grad(log_likelihood.sum(), chunk)
            outputs.append((chunk + strength * sigma**2 * score).detach())
        return torch.cat(outputs)


__all__ = ["JacobiStats", "TarFlowConfig", "TarFlowModel", "TarFlowOutput", "TarFlowPreTrainedModel"]
