"""StarFlowPipeline: text-to-image sampling, exact likelihoods and zero-shot captioning with a STARFlow latent flow.

STARFlow ("STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis", Gu et al. 2025) is a
normalizing flow over the latents of a VAE, conditioned on T5 text embeddings. The pipeline reproduces Apple's
`sample.py` (apple/ml-starflow): the prompt is encoded with `utils.encode_text` (padded to the model's text length,
padding rows zeroed), the prior noise is mapped back through the flow (deep block first, with STARFlow's
Gaussian-product classifier-free guidance against the empty prompt's encoding), the sample takes one score
("Tweedie") denoising step with the conditional likelihood, and the VAE decodes `latents / scaling_factor`.

A saved folder (see `tarflow_hf.hub`) carries this file, the shared `pipeline_utils.py` and `images.py` it imports
relatively, and the transformer's own code in `transformer/`; the text encoder, tokenizer and VAE are standard
transformers/diffusers components. So the file imports nothing from `tarflow_hf` by name (and imports every sibling
it needs directly: diffusers copies a local folder's *direct* relative imports only), and the folder loads with
`StarFlowPipeline.from_pretrained(folder)` (the installed classes) and, without tarflow-hf, with
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. The transformer is used only through its
methods (`forward`, `inverse`, `denoise`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import PreTrainedModel, PreTrainedTokenizerBase, T5EncoderModel

from .guidance import GuidanceRule
from .images import ImageInput, to_tensor
from .layers import WeightPacking  # noqa: F401 (the samplers' import: diffusers copies direct imports only)
from .lora import LoraMixin
from .pipeline_utils import (
    PACKAGED,
    FlowPipelineMixin,
    Generator,
    callback_inputs,
    check_count,
    check_denoise,
    check_guidance_scale,
    check_latents,
    check_output_type,
    device_memory_bytes,
    normal_noise,
    run_in_chunks,
)
from .products import is_quantized  # noqa: F401 (the layers' import: diffusers copies direct imports only)
from .samplers import FlowSampler, SamplingStats, SequentialSampler

OUTPUT_TYPES = ("latent", "pil", "np", "pt")
# The text length of prompts encoded without a transformer to ask (Apple's `txt_size` of the released model).
DEFAULT_TEXT_LENGTH = 128
PromptInput = str | Sequence[str] | None

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from tarflow_hf import JacobiSampler, StarFlowPipeline

        >>> pipe = StarFlowPipeline.from_pretrained("path/or/repo-id").to("cuda")
        >>> prompt = "a watercolor painting of a fox in the snow"
        >>> image = pipe(prompt, guidance_scale=4.6, generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.save("fox.png")

        >>> # On a CPU the fastest parallel setting: the deep block exact, the shallow blocks iterated together.
        >>> pipe.sampler = JacobiSampler(tolerance=1e-2, sequential_blocks=1)
        >>> image = pipe(prompt).images[0]

        >>> # Exact likelihood of the image's VAE latent under a caption, and zero-shot captioning by Bayes' rule.
        >>> pipe.bits_per_dim([image], prompt)
        >>> pipe.classify([image], ["a fox in the snow", "a cat on a sofa", "a city at night"])  # (1, 3)
        ```
"""


@dataclass
class StarFlowPipelineOutput(BaseOutput):
    """
    Output of [`StarFlowPipeline.__call__`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The samples: PIL images, a float32 array (batch, height, width, 3) in [0, 1], a float32 tensor (batch, 3,
            height, width) in [0, 1], or with `output_type="latent"` the flow's latents (batch, channels,
            height / 8, width / 8), scaled by the VAE's scaling factor as the flow sees them.
        stats (`SamplingStats`, *optional*):
            What the sampler did per block (for block Jacobi, the iterations of every chunk, deep block first, as
            Apple's `jacobi_iters`).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SamplingStats | None = None


def fit_text_length(embeds: torch.Tensor, length: int | None) -> torch.Tensor:
    """`embeds` (batch, tokens, hidden) at `length` text tokens, the length the flow was trained to read (None: as
    they are): shorter ones get zero rows (the padding, as encoding zeroes it), longer ones lose trailing rows that are
    all padding; text past `length` is kept. So prompts encoded to another length (without a transformer,
    `encode_prompt` pads to 128) give the flow what encoding at its own length gives."""
    if length is None or embeds.shape[1] == length:
        return embeds
    if embeds.shape[1] < length:
        return torch.cat([embeds, embeds.new_zeros(embeds.shape[0], length - embeds.shape[1], embeds.shape[2])], 1)
    return embeds if embeds[:, length:].any() else embeds[:, :length]


class PromptMixin:
    """Text conditioning of a STARFlow pipeline: prompts -> the T5 embeddings the flow reads (Apple's
    `utils.encode_text`), their checks, and one embedding row per image for the likelihood tools."""

    def _encode(self, prompt: list[str], device: torch.device, max_length: int) -> torch.Tensor:
        """Apple's `encode_text`: T5 tokens padded to `max_length` (truncated, `</s>` kept), the encoder's last
        hidden state times the attention mask (padding rows zeroed; the flow itself never sees a mask)."""
        for index, text in enumerate(prompt):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer can read it
                raise ValueError(
                    f"prompt {index} holds {text[error.start]!r} at position {error.start}, which is not a Unicode "
                    "character (a lone surrogate, left by broken decoding); remove it"
                ) from None
        tokens = self.tokenizer(
            prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        input_ids = tokens.input_ids.to(device)
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: PromptInput,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: PromptInput = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        Encode prompts as the flow reads them, exactly as Apple's `utils.encode_text`.

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompts (or pass `prompt_embeds`).
            device (`torch.device`, *optional*): where the embeddings go; the pipeline's execution device by default.
            num_images_per_prompt (`int`): each prompt's embedding is repeated this many times (consecutively).
            do_classifier_free_guidance (`bool`): also return the negative (unconditional) embeddings.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch's prompts; the empty prompt
                `""` by default (as Apple's `sample.py`).
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` of shape `(batch, text_length, hidden)`,
                *optional*): precomputed embeddings (padding rows zeroed), used instead of encoding.
            max_sequence_length (`int`, *optional*): the text length; the transformer's `max_text_length` by
                default (128 without a transformer; the negative prompt is padded to the length of `prompt_embeds`
                when those are given). Without it, embeddings of another length (given, or encoded without a
                transformer) are fitted to the transformer's (`fit_text_length`).

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, each `(batch * num_images_per_prompt, text_length, hidden)` in
            the transformer's dtype; `negative_prompt_embeds` is `None` without guidance.
        """
        device = device or self._execution_device
        transformer = getattr(self, "transformer", None)  # prompts encode without it (text encoder and tokenizer)
        dtype = (transformer or self.text_encoder).dtype
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt (a string or a list of strings) or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            default_length = DEFAULT_TEXT_LENGTH if transformer is None else transformer.config.max_text_length
            prompt_embeds = self._encode(prompts, device, max_sequence_length or default_length)
        text_length = None if transformer is None or max_sequence_length else transformer.config.max_text_length
        prompt_embeds = fit_text_length(prompt_embeds, text_length)
        batch_size, length = prompt_embeds.shape[:2]
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

        if not do_classifier_free_guidance:
            negative_prompt_embeds = None
        else:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self._encode_negative(negative_prompt, batch_size, device, length)
            negative_prompt_embeds = fit_text_length(negative_prompt_embeds, text_length).to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        # One return of both (diffusers reads the names `encode_prompt` returns, as `__call__`'s arguments).
        return prompt_embeds, negative_prompt_embeds

    def _encode_negative(
        self, negative_prompt: PromptInput, batch_size: int, device: torch.device, length: int
    ) -> torch.Tensor:
        """The negative prompts' embeddings, one per prompt (the empty prompt by default), `length` tokens long."""
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch_size:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries for {batch_size} prompts; pass one or one per prompt"
            )
        return self._encode(negatives, device, length)

    def check_prompt_inputs(
        self,
        prompt: PromptInput,
        negative_prompt: PromptInput,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> None:
        """The prompt arguments of `__call__`: one-line `ValueError`s naming the argument."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt (a string or a list of strings) or prompt_embeds")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise ValueError("prompt is an empty list")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        hidden = self.transformer.config.text_hidden_size
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (
                not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != hidden
            ):
                got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"{name} must have shape (batch, text_length, {hidden}), got {got}")
        if negative_prompt_embeds is not None:
            if prompt_embeds is None:
                raise ValueError("negative_prompt_embeds needs prompt_embeds (or pass negative_prompt with prompt)")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds must have the shape of prompt_embeds, got "
                    f"{tuple(negative_prompt_embeds.shape)} and {tuple(prompt_embeds.shape)}"
                )

    def _text_rows(
        self, prompt: PromptInput, prompt_embeds: torch.Tensor | None, batch: int, name: str = "prompt"
    ) -> torch.Tensor:
        """Embeddings of one prompt (broadcast) or one per image, (batch, text_length, hidden)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(f"pass either {name} or prompt_embeds (exactly one)")
        embeds, _ = self.encode_prompt(prompt, prompt_embeds=prompt_embeds, do_classifier_free_guidance=False)
        if embeds.shape[0] == 1:
            embeds = embeds.expand(batch, -1, -1)
        if embeds.shape[0] != batch:
            raise ValueError(f"got {embeds.shape[0]} prompts for {batch} images; pass one prompt, or one per image")
        return embeds


class StarFlowPipeline(LoraMixin, FlowPipelineMixin, PromptMixin, DiffusionPipeline):
    r"""
    Pipeline for text-to-image generation with STARFlow, and what only a normalizing flow can do: the exact
    log-likelihood of an image's latent under a caption, and zero-shot captioning by Bayes' rule over candidate
    captions.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    (downloading, saving, running on a device, CPU offload).

    Parameters:
        transformer ([`StarFlowModel`]):
            The latent normalizing flow (a transformers `PreTrainedModel`); its config gives the text length
            (`max_text_length`), the default guidance scale and the training noise (`noise_std`, the denoising step).
        text_encoder ([`T5EncoderModel`]):
            The text encoder (Apple: `google/flan-t5-xl`'s encoder, run in float32).
        tokenizer ([`PreTrainedTokenizerBase`]):
            Its tokenizer (T5's: appends `</s>`, pads with `<pad>`).
        vae ([`AutoencoderKL`]):
            The latent autoencoder (Apple: `stabilityai/sd-vae-ft-ema`, scaling factor 0.18215, downsampling 8).
        sampler ([`~samplers.FlowSampler`], *optional*):
            How each flow block is inverted (`tarflow_hf.samplers`); the exact `SequentialSampler` by default. Swap it
            as a diffusers scheduler: `pipe.sampler = JacobiSampler(sequential_blocks=1)`; saved with the pipeline.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _transformer_module, _transformer_class = "modeling_starflow", "StarFlowModel"
    _optional_components = ["sampler"]  # noqa: RUF012 (diffusers reads these class attributes as lists)
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]  # noqa: RUF012

    def __init__(
        self,
        transformer: PreTrainedModel,
        text_encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        vae: AutoencoderKL,
        sampler: SchedulerMixin | None = None,  # a FlowSampler; typed by its diffusers base, which remote code shares
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            sampler=sampler or SequentialSampler(),
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_resize=False, do_normalize=True, do_convert_rgb=True
        )

    @classmethod
    def from_single_file(cls, checkpoint: str, **kwargs: Any) -> StarFlowPipeline:
        """Apple's `.pth` (and `config=` its yaml) as a pipeline, no conversion step: `tarflow_hf.single_file`."""
        return importlib.import_module("tarflow_hf.single_file").load_pipeline(cls, checkpoint, **kwargs)

    # ------------------------------------------------------------------------------------------------- checks
    def check_inputs(
        self,
        height: int,
        width: int,
        num_images_per_prompt: int,
        guidance_scale: float,
        denoise: bool | float,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """Validate the arguments other than the prompts (see `check_prompt_inputs`) before the (long) sampling loop
        starts: one-line `ValueError`s naming the argument."""
        check_count("num_images_per_prompt", num_images_per_prompt)
        self.check_image_size(height, width)
        check_guidance_scale(guidance_scale)
        check_denoise(denoise)
        check_output_type(output_type, OUTPUT_TYPES)
        callback_inputs(None, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

    def bytes_per_token(self) -> int:
        """Memory one latent token of one image takes while sampling, at least: its keys and values in every layer
        of the deep block for both guidance branches (the largest cache), and its pixels decoded in float32."""
        config = self.transformer.config
        element = torch.finfo(self.transformer.dtype).bits // 8
        cache = 2 * 2 * config.layers_per_block[-1] * config.deep_hidden_size * element
        return cache + 3 * (self.vae_scale_factor * config.patch_size) ** 2 * 4

    def check_image_size(self, height: Any, width: Any) -> None:
        """Refuse, before anything runs, an image size off the latent grid or whose sampling cannot fit in the
        device's memory, naming the limit."""
        grid = self.vae_scale_factor * self.transformer.config.patch_size
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, int) or size < grid or size % grid:
                raise ValueError(
                    f"{name} must be a positive multiple of {grid} pixels (vae_scale_factor {self.vae_scale_factor} "
                    f"x patch_size {self.transformer.config.patch_size}), got {size!r}"
                )
        available = device_memory_bytes(self._execution_device)
        tokens = (height // grid) * (width // grid)
        if available is None or tokens * self.bytes_per_token() <= available:
            return
        side = int(math.sqrt(available / self.bytes_per_token())) * grid
        raise ValueError(
            f"{height}x{width} pixels is {tokens:,} latent tokens, whose sampling needs more than the "
            f"{available / 2**30:.0f} GiB of this {self._execution_device.type} memory (at least "
            f"{self.bytes_per_token():,} bytes a token); the largest square image that fits is about {side}x{side}"
        )

    # ---------------------------------------------------------------------------------------------- latents
    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: Generator,
        latents: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Prior noise (batch, channels, height / vae_scale_factor, width / vae_scale_factor) in float32: the given
        latents (checked, moved to `device`), or standard normal noise drawn with diffusers' `randn_tensor` (on the
        generator's device; with a list, one generator per image, so a seed gives the same image in any batch)."""
        channels = self.transformer.config.in_channels
        shape = (batch_size, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            latents = check_latents(latents, shape, f"{shape} (batch, channels, height / 8, width / 8)")
            return latents.to(device=device, dtype=torch.float32)
        return normal_noise(shape, generator, device)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil") -> Any:
        """Flow latents (scaled) -> images: `vae.decode(latents / scaling_factor + shift_factor)`, mapped from
        [-1, 1] to [0, 1] (clipped) as PIL images, a NumPy array or a tensor."""
        check_output_type(output_type, OUTPUT_TYPES)
        if output_type == "latent":
            return latents
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        latents = latents / config.scaling_factor + shift
        images = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(images.detach().float(), output_type=output_type)

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: PromptInput = None,
        negative_prompt: PromptInput = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        guidance_rule: GuidanceRule | str | None = None,
        attention_temperature: float = 1.0,
        sampler: FlowSampler | str | None = None,
        denoise: bool | float = True,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., Any] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> StarFlowPipelineOutput | tuple:
        r"""
        Generate images from text: encode the prompts, draw prior noise, run the flow backwards block by block
        (classifier-free guidance in the deep block), take one score denoising step, decode with the VAE.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompts. Pass `prompt_embeds` instead to skip the text encoder.
            negative_prompt (`str` or `list[str]`, *optional*):
                The unconditional branch of the guidance; the empty prompt `""` by default (Apple's choice).
            prompt_embeds (`torch.Tensor` of shape `(batch, text_length, text_hidden_size)`, *optional*):
                Precomputed text embeddings with padding rows zeroed (see [`~StarFlowPipeline.encode_prompt`]).
            negative_prompt_embeds (`torch.Tensor`, same shape as `prompt_embeds`, *optional*):
                Precomputed unconditional embeddings; the empty prompt's encoding when not given.
            height (`int`, *optional*), width (`int`, *optional*):
                Image size in pixels, multiples of `vae_scale_factor * patch_size` (not necessarily square); by default
                the size of the given `latents`, else `transformer.config.sample_size * vae_scale_factor` (the training
                size).
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt (consecutive in the output).
            guidance_scale (`float`, *optional*):
                Classifier-free guidance in the diffusers convention, > 0 (1 is none): with STARFlow's rule the deep
                block's Gaussians become `p_cond^w / p_uncond^(w - 1)` (w >= 1). Apple's `--cfg g` is `1 + g`;
                defaults to `transformer.config.default_guidance_scale`.
            guidance_rule (`GuidanceRule` or `str`, *optional*):
                How the branches combine (`tarflow_hf.guidance`): a rule or its name, `"gaussian_product"`
                (STARFlow's, the default) or `"extrapolate"` (TarFlow's); the rule also holds the `schedule`
                (`"linear"`: weight growing with the token index) and the unconditional branch's attention
                temperature.
            attention_temperature (`float`, defaults to 1.0):
                Divides the attention logits of every layer, in every branch (Apple's `attn_temp`).
            sampler (`FlowSampler` or `str`, *optional*):
                How each block is inverted for this call (`tarflow_hf.samplers`: a sampler, or a name such as
                `"jacobi"`); the pipeline's `sampler` component (exact, sequential by default) when None.
            denoise (`bool` or `float`, defaults to `True`):
                Apple's score denoising step `x + strength * noise_std**2 * grad_x log p(x | prompt)` (the model was
                trained on latents with noise of std `transformer.config.noise_std`), one sample at a time,
                conditional embeddings only. `True` is strength 1, `False` none, a number the strength.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic; with one generator per image, a seed gives the same image in any batch
                (and whatever runs at the same time).
            latents (`torch.Tensor` of shape `(batch * num_images_per_prompt, channels, height / 8, width / 8)`,
                *optional*): prior noise (standard normal) to use instead of drawing it.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (float32 (batch, height, width, 3) in [0, 1]), `"pt"` (float32 (batch, 3, height,
                width) in [0, 1]) or `"latent"` (the flow's latents, denoised when `denoise`, not decoded).
            return_dict (`bool`, defaults to `True`):
                Return a [`StarFlowPipelineOutput`] (with the sampler's statistics) rather than a tuple `(images,)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each flow block as `callback_on_step_end(pipe, step, block_index, callback_kwargs)`:
                `step` counts from 0 in sampling order, `block_index` is the block just inverted (it counts down from
                the deep block, as diffusion timesteps do), `callback_kwargs["latents"]` holds the current latents
                (batch, channels, height / 8, width / 8). Latents it returns replace them.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`: `"latents"`, `"prompt_embeds"`, `"negative_prompt_embeds"`.

        Examples:

        Returns:
            [`StarFlowPipelineOutput`] or `tuple`: with `return_dict=False`, `(images,)`.
        """
        callback_on_step_end_tensor_inputs = callback_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        config = self.transformer.config
        guidance_scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
        height, width = self._image_size(height, width, latents)

        # 1. Check the inputs.
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        self.check_inputs(
            height,
            width,
            num_images_per_prompt,
            guidance_scale,
            denoise,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # 2. Encode the prompts (and the negative prompts when guiding).
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        batch_size = prompt_embeds.shape[0]

        # 3. Prior noise, one draw per image.
        latents = self.prepare_latents(batch_size, height, width, generator, latents, device)

        # 4. Invert the flow, one progress step per block (and one for denoising).
        strength = float(denoise)
        tensors = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        progress = self._block_progress(
            strength != 0, callback_on_step_end, callback_on_step_end_tensor_inputs, tensors
        )
        with progress as (on_block, denoised):
            latents, stats = self.transformer.inverse(
                latents,
                encoder_hidden_states=prompt_embeds,
                negative_encoder_hidden_states=negative_prompt_embeds if self.do_classifier_free_guidance else None,
                guidance_scale=self._scale_for_block,
                guidance_rule=guidance_rule,
                attention_temperature=attention_temperature,
                sampler=self.sampler if sampler is None else sampler,
                callback=on_block,
                return_stats=True,
            )

            # 5. Score denoising with the conditional likelihood (no guidance), one sample at a time.
            if strength != 0:
                latents = self.transformer.denoise(latents, tensors["prompt_embeds"], strength=strength)
                denoised()

        # 6. Decode.
        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StarFlowPipelineOutput(images=images, stats=stats)

    def _image_size(self, height: int | None, width: int | None, latents: Any) -> tuple[Any, Any]:
        """Height and width as given, else the given latents' size, else the training size."""
        if isinstance(latents, torch.Tensor) and latents.dim() == 4:
            default_height, default_width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        else:
            default_height = default_width = self.transformer.config.sample_size * self.vae_scale_factor
        return default_height if height is None else height, default_width if width is None else width

    # --------------------------------------------------------------------------------------------- likelihood
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images (PIL, channels-last NumPy (batch, height, width, 3) or tensors (batch, 3, height, width), values in
        [0, 1]; transparency flattened onto white, see `tarflow_hf.images`) -> the VAE's input, float32 (batch, 3,
        height, width) in [-1, 1] (no resizing: height and width must be multiples of `vae_scale_factor *
        patch_size`)."""
        pixels = to_tensor(images, self.vae.config.in_channels)
        grid = self.vae_scale_factor * self.transformer.config.patch_size
        height, width = pixels.shape[-2:]
        if height % grid or width % grid:
            raise ValueError(f"images are {height}x{width} pixels; height and width must be multiples of {grid}")
        return VaeImageProcessor.normalize(pixels)

    @torch.no_grad()
    def encode_images(
        self, images: ImageInput, generator: Generator = None, sample_posterior: bool = False
    ) -> torch.Tensor:
        r"""
        Images -> the scaled VAE latents the flow models: `(z - shift_factor) * scaling_factor` with `z` the mode of
        the VAE posterior, or with `sample_posterior=True` a sample from it (as Apple encodes training images;
        `generator`, one per image if a list, makes it deterministic).

        Returns:
            `torch.Tensor` of shape `(batch, channels, height / 8, width / 8)`, float32.
        """
        pixels = self.preprocess(images).to(device=self._execution_device, dtype=self.vae.dtype)
        distribution = self.vae.encode(pixels).latent_dist
        z = distribution.sample(generator) if sample_posterior else distribution.mode()
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((z - shift) * config.scaling_factor).float()

    def _log_likelihood(self, latents: torch.Tensor, embeds: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The flow's forward pass in chunks: (log_likelihood, bits_per_dim), float32."""

        def forward(chunk: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.transformer(chunk.to(self.transformer.dtype), text)
            return out.log_likelihood.float(), out.bits_per_dim.float()

        return run_in_chunks(forward, batch_size, latents, embeds)

    @torch.no_grad()
    def log_likelihood(
        self,
        images: ImageInput,
        prompt: PromptInput = None,
        prompt_embeds: torch.Tensor | None = None,
        generator: Generator = None,
        sample_posterior: bool = False,
        batch_size: int = 16,
    ) -> torch.Tensor:
        r"""
        Exact log-density `log p(latent | prompt)` in nats (summed over all latent dimensions) of the images' VAE
        latents ([`~StarFlowPipeline.encode_images`]: the posterior mode times the scaling factor) under the flow.
        This is the likelihood of the latent, not of the pixels (the VAE is not a bijection); it is read at the latent
        itself, without the training noise.

        Args:
            images: PIL images, or arrays / tensors in [0, 1], height and width multiples of the latent grid.
            prompt (`str` or `list[str]`): one caption for all images, or one per image (or pass `prompt_embeds`).
            generator, sample_posterior: see [`~StarFlowPipeline.encode_images`].
            batch_size (`int`): latents per forward pass.

        Returns:
            `torch.Tensor` of shape `(batch,)`, float32.
        """
        return self._likelihoods(images, prompt, prompt_embeds, generator, sample_posterior, batch_size)[0]

    @torch.no_grad()
    def bits_per_dim(self, images: ImageInput, prompt: PromptInput = None, **kwargs: Any) -> torch.Tensor:
        r"""
        Negative log-likelihood of the images' VAE latents in bits per latent dimension (`-log2 p(latent | prompt) /
        (channels * height / 8 * width / 8)`), arguments as [`~StarFlowPipeline.log_likelihood`] (after `images`
        and `prompt`, by keyword: `prompt_embeds`, `generator`, `sample_posterior`, `batch_size`). A continuous
        density of the latent: not comparable with pixel-space bits per dimension.

        Returns:
            `torch.Tensor` of shape `(batch,)`, float32.
        """
        return self._likelihoods(images, prompt, **kwargs)[1]

    def _likelihoods(self, images, prompt, prompt_embeds=None, generator=None, sample_posterior=False, batch_size=16):
        """(log_likelihood, bits_per_dim) of the images' latents, float32; the arguments, and their defaults, are
        [`~StarFlowPipeline.log_likelihood`]'s."""
        latents = self.encode_images(images, generator=generator, sample_posterior=sample_posterior)
        embeds = self._text_rows(prompt, prompt_embeds, latents.shape[0])
        return self._log_likelihood(latents, embeds, batch_size)

    @torch.no_grad()
    def classify(
        self,
        images: ImageInput,
        candidate_prompts: Sequence[str] | None = None,
        candidate_embeds: torch.Tensor | None = None,
        batch_size: int = 16,
    ) -> torch.Tensor:
        r"""
        Zero-shot captioning by exact likelihood: `p(caption | image) ∝ p(latent | caption)` by Bayes' rule with a
        uniform prior over the candidates, i.e. the softmax over candidates of
        [`~StarFlowPipeline.log_likelihood`]. Every image is scored under every caption, `batch_size` (image,
        caption) pairs per forward pass.

        Args:
            images: PIL images, or arrays / tensors in [0, 1].
            candidate_prompts (`list[str]`): the candidate captions (or pass `candidate_embeds`, `(num_candidates,
                text_length, hidden)`, from [`~StarFlowPipeline.encode_prompt`]).
            batch_size (`int`): pairs per forward pass.

        Returns:
            `torch.Tensor` of shape `(num_images, num_candidates)`: probabilities, each row summing to 1.

        Example:

        ```python
        >>> captions = ["a dog", "a cat", "a car"]
        >>> probabilities = pipe.classify(images, captions)
        >>> [captions[i] for i in probabilities.argmax(-1).tolist()]
        ```
        """
        if isinstance(candidate_prompts, str):
            raise ValueError("candidate_prompts must be a list of captions (got a single string)")
        if candidate_prompts is not None and not candidate_prompts:
            raise ValueError("candidate_prompts is empty")
        latents = self.encode_images(images)
        if (candidate_prompts is None) == (candidate_embeds is None):
            raise ValueError("pass either candidate_prompts or candidate_embeds (exactly one)")
        embeds, _ = self.encode_prompt(
            None if candidate_prompts is None else list(candidate_prompts),
            prompt_embeds=candidate_embeds,
            do_classifier_free_guidance=False,
        )
        num_images, num_candidates = latents.shape[0], embeds.shape[0]
        image_index = torch.arange(num_images).repeat_interleave(num_candidates)
        caption_index = torch.arange(num_candidates).repeat(num_images)
        log_likelihood, _ = self._log_likelihood(latents[image_index], embeds[caption_index], batch_size)
        return log_likelihood.view(num_images, num_candidates).softmax(dim=-1)


if PACKAGED:  # AutoModel finds the package's model wherever this pipeline is importable
    importlib.import_module(__package__).register_auto_classes()

__all__ = ["StarFlowPipeline", "StarFlowPipelineOutput"]
