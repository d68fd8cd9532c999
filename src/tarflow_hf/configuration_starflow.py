"""STARFlow model configuration."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .guidance import GuidanceRule

# RoPE channel pairs Apple reserves for the text axis when the model reads text (`misc/pe.py`: dim_split [d - 8, 8]).
ROPE_TEXT_FREQUENCIES = 8


@strict(accept_kwargs=True)
class StarFlowConfig(PreTrainedConfig):
    r"""
    Configuration of a [`StarFlowModel`]: STARFlow's latent normalizing flow ("STARFlow: Scaling Latent Normalizing
    Flows for High-resolution Image Synthesis", Gu et al. 2025), a stack of causal-transformer affine flow blocks
    over VAE latent patches whose last ("deep") block reads a text prefix.

    The defaults are Apple's released `configs/starflow_3B_t2i_256x256.yaml` (3.86 B parameters).

    Args:
        sample_size (`int`, defaults to 32): side of the (square) latent grid the model was trained on (Apple's
            `img_size / 8`). RoPE positions are scaled to it, so other, also non-square, latent sizes work.
        in_channels (`int`, defaults to 4): latent channels.
        patch_size (`int`, defaults to 1): side of the square latent patches.
        hidden_size (`int`, defaults to 3072): width of the shallow blocks (Apple's `channels`).
        deep_hidden_size (`int`, *optional*): width of the deep block (Apple's `top_block_channels`); defaults to
            `hidden_size`.
        layers_per_block (`list[int]`, defaults to `[2, 2, 2, 2, 2, 24]`): transformer layers of each flow block,
            in forward order; the last entry is the deep block.
        head_dim (`int`, defaults to 64): width of one attention head, in every block.
        mlp_ratio (`int`, defaults to 4): MLP expansion factor.
        soft_clip (`float`, defaults to 4.0): bound of the soft clip `c * tanh(x / c)` on the output projection;
            0 disables it.
        noise_std (`float`, defaults to 0.3): std of the Gaussian noise added to the latents in training; the
            denoising step uses it.
        text_hidden_size (`int`, defaults to 2048): width of the text embeddings (Apple's `txt_dim`; flan-t5-xl's
            2048). 0 makes an unconditional model.
        max_text_length (`int`, defaults to 128): text length the model was trained with (Apple's `txt_size`).
        latent_norm_regularization (`float`, defaults to 1e-4): weight of the latent-norm regulariser in the
            training loss.
        default_guidance_scale (`float`, defaults to 4.6): guidance scale a pipeline uses when none is given
            (diffusers convention, 1.0 is no guidance; Apple's `--cfg 3.6` of its README and scripts).
        rope_theta (`float`, defaults to 10000.0): base of the rotary frequencies.
        default_guidance_rule (`str`, defaults to `"gaussian_product"`): guidance rule used when none is given,
            STARFlow's Gaussian product; a rule name or `NAME:key=value,...` (see `tarflow_hf.guidance`).

    Example:

    ```python
    >>> from tarflow_hf.configuration_starflow import StarFlowConfig
    >>> from tarflow_hf.modeling_starflow import StarFlowModel
    >>> config = StarFlowConfig(sample_size=8, hidden_size=64, layers_per_block=[1, 2], head_dim=32,
    ...                         text_hidden_size=32, max_text_length=16)
    >>> model = StarFlowModel(config)
    ```"""

    model_type = "starflow"

    sample_size: int = 32
    in_channels: int = 4
    patch_size: int = 1
    hidden_size: int = 3072
    deep_hidden_size: int | None = None
    layers_per_block: list[int] | tuple[int, ...] = (2, 2, 2, 2, 2, 24)
    head_dim: int = 64
    mlp_ratio: int = 4
    soft_clip: float = 4.0
    noise_std: float = 0.3
    text_hidden_size: int = 2048
    max_text_length: int = 128
    latent_norm_regularization: float = 1e-4
    default_guidance_scale: float = 4.6
    rope_theta: float = 10000.0
    default_guidance_rule: str = "gaussian_product"

    def __post_init__(self, **kwargs):
        for name in ("soft_clip", "noise_std", "latent_norm_regularization", "default_guidance_scale", "rope_theta"):
            if isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool):
                setattr(self, name, float(getattr(self, name)))
        self.layers_per_block = [int(layers) for layers in self.layers_per_block]
        if self.deep_hidden_size is None:
            self.deep_hidden_size = self.hidden_size
        self._check_sizes()
        GuidanceRule.parse(self.default_guidance_rule)  # a bad one names itself
        super().__post_init__(**kwargs)

    def _check_numbers(self) -> None:
        for name in ("soft_clip", "noise_std", "latent_norm_regularization"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 1 <= self.default_guidance_scale < math.inf:
            raise ValueError(
                f"default_guidance_scale must be a finite number >= 1 (1 is no guidance; Apple's cfg g is 1 + g), "
                f"got {self.default_guidance_scale}"
            )
        if not 0 < self.rope_theta < math.inf:
            raise ValueError(f"rope_theta must be a finite number > 0, got {self.rope_theta}")

    def _check_sizes(self) -> None:
        # Plain ValueError (rather than a `validate_*` hook, which `@strict` wraps) so callers can catch it.
        sizes = ("sample_size", "in_channels", "patch_size", "hidden_size", "deep_hidden_size", "head_dim", "mlp_ratio")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.layers_per_block or any(layers < 1 for layers in self.layers_per_block):
            raise ValueError(
                f"layers_per_block must list at least one block, each with >= 1 layers, got {self.layers_per_block}"
            )
        self._check_numbers()
        if self.text_hidden_size < 0 or self.max_text_length < 0:
            raise ValueError(
                f"text_hidden_size and max_text_length must be >= 0, got {self.text_hidden_size} and "
                f"{self.max_text_length}"
            )
        if (self.text_hidden_size > 0) != (self.max_text_length > 0):
            raise ValueError(
                f"text_hidden_size={self.text_hidden_size} and max_text_length={self.max_text_length}: both must be "
                "positive (text-conditional) or both 0 (unconditional)"
            )
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"sample_size={self.sample_size} is not divisible by patch_size={self.patch_size}; the latent grid "
                "must be a whole number of patches"
            )
        for name in ("hidden_size", "deep_hidden_size"):
            if getattr(self, name) % self.head_dim:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not divisible by head_dim={self.head_dim}; the width must be "
                    "a whole number of attention heads"
                )
        if self.has_text:
            spatial = self.head_dim // 2 - ROPE_TEXT_FREQUENCIES
            if self.head_dim % 2 or spatial <= 0 or spatial % 2:
                raise ValueError(
                    f"head_dim={self.head_dim} does not fit STARFlow's 3-axis RoPE: head_dim / 2 - "
                    f"{ROPE_TEXT_FREQUENCIES} (the rotary pairs left for the two image axes) must be even and > 0, "
                    "e.g. head_dim 32 or 64"
                )
        elif self.head_dim % 4:
            raise ValueError(
                f"head_dim={self.head_dim} must be divisible by 4: RoPE splits head_dim / 2 pairs over two image axes"
            )

    @property
    def has_text(self) -> bool:
        return self.text_hidden_size > 0

    @property
    def num_blocks(self) -> int:
        """Number of flow blocks; the last one is the deep block."""
        return len(self.layers_per_block)

    @property
    def grid_size(self) -> int:
        """Side of the training patch grid, P (Apple's `pt_seq_len`): RoPE positions are scaled to it."""
        return self.sample_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens of a training-size latent, T = P**2."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values per token, D = in_channels * patch_size**2."""
        return self.in_channels * self.patch_size**2

    @property
    def num_heads(self) -> int:
        """Attention heads of a shallow block."""
        return self.hidden_size // self.head_dim

    @property
    def num_attention_heads(self) -> int:
        """Attention heads of a shallow block (transformers' name; `num_heads`); the deep block has
        `deep_num_heads`."""
        return self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        """Transformer layers of the whole flow, all blocks together (transformers' name)."""
        return sum(self.layers_per_block)

    @property
    def deep_num_heads(self) -> int:
        """Attention heads of the deep block."""
        return self.deep_hidden_size // self.head_dim

    @property
    def rope_spatial_frequencies(self) -> int:
        """Rotary frequencies per image axis (rows and columns share them)."""
        text = ROPE_TEXT_FREQUENCIES if self.has_text else 0
        return (self.head_dim // 2 - text) // 2

    @property
    def rope_text_frequencies(self) -> int:
        """Rotary frequencies of the text axis (0 for an unconditional model)."""
        return ROPE_TEXT_FREQUENCIES if self.has_text else 0


__all__ = ["StarFlowConfig"]
