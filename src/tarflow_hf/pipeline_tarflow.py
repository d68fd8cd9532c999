"""TarFlowPipeline: sampling, exact likelihoods, encoding and classification with a TarFlow normalizing flow.

A saved folder (see `tarflow_hf.hub`) carries this file and the sibling modules it imports relatively, so a Hub
repository works both ways:

- with tarflow-hf installed: `TarFlowPipeline.from_pretrained(repo)` (the installed classes; no remote code);
- without it: `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` (this file, the shared
  `pipeline_utils.py`, `images.py` and `labels.py`, and the model's own `transformer/modeling_tarflow.py`, all
  shipped in the repository).

Hence the file imports nothing from `tarflow_hf` by name, only sibling modules relatively (and diffusers copies a
local folder's *direct* relative imports only, so every sibling this file needs is imported here directly). The
model is used only through its methods; saving (`tarflow_hf.hub`, which needs the installed package) and the
installed model class are looked up relative to this module's package when there is one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import PreTrainedModel

from .guidance import GuidanceRule
from .images import ImageInput, to_tensor
from .labels import aliases, ids_for_names, label2id, resolve_class_ids
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
    normal_noise,
    run_in_chunks,
    uniform_noise,
)
from .products import is_quantized  # noqa: F401 (the layers' import: diffusers copies direct imports only)
from .samplers import FlowSampler, SamplingStats, SequentialSampler

OUTPUT_TYPES = ("latent", "pil", "np", "pt")
LabelInput = int | str | Sequence[int | str] | torch.Tensor | np.ndarray | None


@dataclass
class TarFlowPipelineOutput(BaseOutput):
    """
    Output of [`TarFlowPipeline.__call__`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The samples: PIL images, a float32 array (batch, height, width, channels) in [0, 1], a float32 tensor
            (batch, channels, height, width) in [0, 1], or the model's raw output (`output_type="latent"`).
        stats (`SamplingStats`, *optional*):
            What the sampler did per block (passes, rows computed, residuals).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SamplingStats | None = None


class ClassLabelsMixin:
    """Class names and class-label inputs of a class-conditional pipeline: names (with aliases) from the
    `id2label` in the pipeline's config, ids, names or tensors of ids -> a label tensor for the transformer."""

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> name (possibly several comma-separated aliases)."""
        return {int(key): name for key, name in self.config.id2label.items()}

    @property
    def labels(self) -> dict[str, int]:
        """Every accepted class name (each alias separately) -> class id, sorted by name (as in `DiTPipeline`); a
        name shared by several classes maps to the first."""
        return label2id(self.id2label)

    def _aliases(self) -> dict[str, list[int]]:
        """Alias (spaces normalised) -> the class ids it names, usually one."""
        return aliases(self.id2label)

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        r"""
        Map class names to class ids. Matching ignores case and surrounding spaces; an unknown name raises a
        `ValueError` that lists the closest known names.

        Example:

        ```python
        >>> pipe.get_label_ids(["golden retriever", "tabby"])
        [207, 281]
        ```
        """
        if not self.transformer.config.num_classes:
            raise ValueError("this model is unconditional (num_classes=0): it has no class names")
        return ids_for_names(self.id2label, label)

    def _class_ids(self, class_labels: LabelInput) -> list[int] | None:
        """Class labels in any accepted form -> a list of ids (-1 for the unconditional branch), or None."""
        if class_labels is None:
            return None
        num_classes = self.transformer.config.num_classes
        if not num_classes:
            return resolve_class_ids(self.id2label, 0, class_labels)  # raises, naming what was passed
        if isinstance(class_labels, (Mapping, Set)):
            raise ValueError(
                f"class_labels must be an id, a name, a list of them or a tensor/array of ids, got a "
                f"{type(class_labels).__name__} (its order or its values would be guessed)"
            )
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if isinstance(class_labels, torch.Tensor):
                integral = not (class_labels.is_floating_point() or class_labels.is_complex())
                integral = integral and class_labels.dtype != torch.bool
            else:
                integral = np.issubdtype(class_labels.dtype, np.integer)
            if not integral:
                raise ValueError(f"class_labels must hold integer class ids, got dtype {class_labels.dtype}")
            items: list[Any] = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (str, int, np.integer)):
            items = [class_labels]
        else:
            items = list(class_labels)
        return resolve_class_ids(self.id2label, num_classes, items)

    def _labels_tensor(self, ids: list[int] | None, batch_size: int) -> torch.Tensor | None:
        if ids is None:
            return None
        if len(ids) == 1:
            ids = ids * batch_size
        if len(ids) != batch_size:
            raise ValueError(f"got {len(ids)} class labels for {batch_size} images; pass one label, or one per image")
        return torch.tensor(ids, dtype=torch.long, device=self._execution_device)


class TarFlowPipeline(LoraMixin, FlowPipelineMixin, ClassLabelsMixin, DiffusionPipeline):
    r"""
    Pipeline for TarFlow ("Normalizing Flows are Capable Generative Models", Zhai et al. 2024): image generation
    with classifier-free guidance, and what only a normalizing flow can do, exact log-likelihoods, an invertible
    encoder/decoder and a generative classifier.

    Parameters:
        transformer ([`TarFlowModel`]):
            The flow (a transformers `PreTrainedModel`).
        id2label (`dict[int, str]`, *optional*):
            Class names, one per class id; defaults to the transformer config's `id2label`. A name may hold several
            comma-separated aliases (ImageNet style, `"tench, Tinca tinca"`); each alias selects the class. Saved to
            `model_index.json`.
        sampler ([`~samplers.FlowSampler`], *optional*):
            How each flow block is inverted (`tarflow_hf.samplers`); the exact `SequentialSampler` by default. Swap it
            as a diffusers scheduler: `pipe.sampler = JacobiSampler(tolerance=1e-3)`; saved with the pipeline.

    Examples:

    ```python
    >>> import torch
    >>> from tarflow_hf import TarFlowPipeline

    >>> pipe = TarFlowPipeline.from_pretrained("path/or/repo-id")
    >>> image = pipe(class_labels=["golden retriever"], guidance_scale=3.0, generator=torch.manual_seed(0)).images[0]
    >>> image.save("dog.png")

    >>> # Exact likelihood of images, in bits per dimension (PIL images, or arrays / tensors in [0, 1]).
    >>> pipe.bits_per_dim([image], class_labels=["golden retriever"], generator=torch.manual_seed(0))

    >>> # The flow is invertible: decode(encode(x)) == x, so latent interpolation is a one-liner.
    >>> z = pipe.encode([image_a, image_b])
    >>> t = torch.linspace(0, 1, 8).view(-1, 1, 1)
    >>> frames = pipe.decode(torch.cos(t * torch.pi / 2) * z[:1] + torch.sin(t * torch.pi / 2) * z[1:])

    >>> # Bayes' rule over the class-conditional likelihoods.
    >>> probabilities = pipe.classify([image])  # (1, num_classes)
    ```
    """

    model_cpu_offload_seq = "transformer"
    _transformer_module, _transformer_class = "modeling_tarflow", "TarFlowModel"
    _optional_components = ["sampler"]  # noqa: RUF012 (diffusers reads these class attributes as lists)
    _callback_tensor_inputs = ["latents"]  # noqa: RUF012

    def __init__(
        self,
        transformer: PreTrainedModel,
        id2label: dict[int, str] | dict[str, str] | None = None,
        sampler: SchedulerMixin | None = None,  # a FlowSampler; typed by its diffusers base, which remote code shares
    ):
        super().__init__()
        self.register_modules(transformer=transformer, sampler=sampler or SequentialSampler())
        num_classes = transformer.config.num_classes
        if id2label is None:
            id2label = dict(transformer.config.id2label or {}) if num_classes else {}
        id2label = {int(key): str(name) for key, name in id2label.items()}
        if sorted(id2label) != list(range(num_classes)):
            raise ValueError(
                f"id2label must name each class id 0..{num_classes - 1} exactly once (the transformer has "
                f"num_classes={num_classes}), got ids {sorted(id2label)[:10]}"
            )
        self.register_to_config(id2label=id2label)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    @classmethod
    def from_single_file(cls, checkpoint: str, **kwargs: Any) -> TarFlowPipeline:
        """Apple's `.pth` as a pipeline, without converting it (`noise_std=`, ...): `tarflow_hf.single_file`."""
        return importlib.import_module("tarflow_hf.single_file").load_pipeline(cls, checkpoint, **kwargs)

    # ----------------------------------------------------------------------------------------------- sampling
    def check_inputs(
        self,
        num_images_per_label: int,
        guidance_scale: float,
        denoise: bool | float,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """Validate what the transformer does not check before the (long) sampling loop starts."""
        check_count("num_images_per_label", num_images_per_label)
        check_guidance_scale(guidance_scale)
        check_denoise(denoise)
        check_output_type(output_type, OUTPUT_TYPES)
        callback_inputs(None, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

    def prepare_latents(
        self, batch_size: int, generator: Generator, latents: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Prior noise (batch, num_patches, patch_dim): the given latents (checked, moved to `device`), or float32
        noise drawn as diffusers' `randn_tensor` does (on the generator's device, one generator per image when a
        list is given; `batch_size` is then the number of images)."""
        config = self.transformer.config
        if latents is not None:
            shape = (None, config.num_patches, config.patch_dim)
            return check_latents(latents, shape, f"(batch, {shape[1]}, {shape[2]})").to(device)
        return normal_noise((batch_size, config.num_patches, config.patch_dim), generator, device)

    def _postprocess(self, images: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Model space [-1, 1] -> [0, 1] (x / 2 + 0.5, clipped) in float32, as a tensor, array or PIL images; the
        model's raw output for `"latent"` (TarFlow samples in pixel space)."""
        if output_type == "latent":
            return images.detach()
        return self.image_processor.postprocess(images.detach().float(), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: LabelInput = None,
        num_images_per_label: int = 1,
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
    ) -> TarFlowPipelineOutput | tuple:
        r"""
        Generate images: draw prior noise, run the flow backwards block by block (with classifier-free guidance),
        then take one denoising step with the model's own score.

        Args:
            class_labels (`int`, `str`, list of them, `torch.Tensor`, or `None`):
                Classes to sample: ids, names from the model's `id2label` (`"golden retriever"`; see
                [`~TarFlowPipeline.labels`]), or both mixed; -1 is the unconditional branch. `None` samples the
                unconditional branch (the mean class embedding for a class-conditional model). An unconditional
                model takes no labels.
            num_images_per_label (`int`, defaults to 1):
                Images per label (consecutive in the output); with `class_labels=None`, the number of images.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance in the diffusers convention, > 0 (1.0 is none; below 1 pushes away from the
                class): with TarFlow's rule the flow's log-scale and shift become `uncond + w * (cond - uncond)`.
                Apple's `--cfg g` is `1 + g`. Defaults to the transformer config's `default_guidance_scale`.
            guidance_rule (`GuidanceRule` or `str`, *optional*):
                How the branches combine (`tarflow_hf.guidance`): a rule or its name, `"extrapolate"` (TarFlow's,
                the default) or `"gaussian_product"` (STARFlow's); the rule also holds what is guided (`target`),
                the `schedule` (`"linear"`: Apple's annealed guidance) and the unconditional branch's attention
                temperature (Apple's `attn_temp`), e.g. `"extrapolate:schedule=linear,unconditional_temperature=0.6"`.
            attention_temperature (`float`, defaults to 1.0):
                Divides the attention logits of every layer, in every branch.
            sampler (`FlowSampler` or `str`, *optional*):
                How each block is inverted for this call (`tarflow_hf.samplers`: a sampler, or a name such as
                `"jacobi"`); the pipeline's `sampler` component (exact, sequential by default) when None.
            denoise (`bool` or `float`, defaults to `True`):
                Models trained on noisy images sample noisy images; one Tweedie step
                `x + strength * noise_std**2 * grad log p(x | y)` removes the noise (per image, so the result does not
                depend on the batch). `True` is strength 1 with the config's `noise_std`, `False` none, a number the
                strength.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic. With one generator per image, each image's noise comes from its own
                generator, so a seed gives the same image whatever the batch it is drawn in (and whatever runs at
                the same time). Noise is drawn in float32 on the generator's device.
            latents (`torch.Tensor` of shape `(batch, num_patches, patch_dim)`, *optional*):
                Prior noise to use instead of drawing it (then `generator` is not used).
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (float32 (batch, height, width, channels)), `"pt"` (float32 (batch, channels, height,
                width)), arrays and tensors in [0, 1] (`x / 2 + 0.5` of the model's output, clipped), or `"latent"`:
                the model's output itself (model space, about [-1, 1], not clipped).
            return_dict (`bool`, defaults to `True`):
                Return a [`TarFlowPipelineOutput`] (with the sampler's statistics) rather than a tuple `(images,)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each flow block as `callback_on_step_end(pipe, step, block_index, callback_kwargs)`,
                diffusers style: `step` counts from 0 in sampling order, `block_index` is the index of the block just
                inverted (it counts down, as diffusion timesteps do), `callback_kwargs["latents"]` holds the current
                images in model space (about [-1, 1]). Latents it returns replace them, and `pipe._guidance_scale`
                set by it applies to the blocks still to run (0 stops guiding, as diffusers' cut-off callbacks do).
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`.

        Examples:

        ```python
        >>> import torch
        >>> from tarflow_hf import JacobiSampler, TarFlowPipeline

        >>> pipe = TarFlowPipeline.from_pretrained("path/or/repo-id").to("cuda", torch.bfloat16)
        >>> generator = [torch.Generator().manual_seed(seed) for seed in range(4)]
        >>> out = pipe(class_labels=["golden retriever", 281], num_images_per_label=2, guidance_scale=3.0,
        ...            generator=generator)
        >>> out.images[0].save("dog.png")
        >>> fast = pipe(class_labels=[281], sampler=JacobiSampler(tolerance=1e-3))  # parallel, for this call
        ```

        Returns:
            [`TarFlowPipelineOutput`] or `tuple`: with `return_dict=False`, `(images,)`.
        """
        callback_on_step_end_tensor_inputs = callback_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        config = self.transformer.config
        guidance_scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(
            num_images_per_label, guidance_scale, denoise, output_type, callback_on_step_end_tensor_inputs
        )
        self._guidance_scale = guidance_scale
        device = self._execution_device

        # 1. Labels and batch size: each label repeated num_images_per_label times.
        ids = self._class_ids(class_labels)
        if ids is not None:
            ids = [class_id for class_id in ids for _ in range(num_images_per_label)]

        # 2. Prior noise: given (which sets the batch size), or one draw per image.
        if latents is not None:
            latents = self.prepare_latents(0, None, latents, device)
        else:
            batch_size = len(ids) if ids is not None else num_images_per_label
            latents = self.prepare_latents(batch_size, generator, None, device)
        labels = self._labels_tensor(ids, latents.shape[0])

        # 3. Invert the flow, one progress step per block (and one for denoising).
        strength = float(denoise)
        progress = self._block_progress(strength != 0, callback_on_step_end, callback_on_step_end_tensor_inputs)
        with progress as (on_block, denoised):
            images, stats = self.transformer.inverse(
                latents.to(self.transformer.dtype),
                class_labels=labels,
                guidance_scale=self._scale_for_block,
                guidance_rule=guidance_rule,
                attention_temperature=attention_temperature,
                sampler=self.sampler if sampler is None else sampler,
                callback=on_block,
                return_stats=True,
            )

            # 4. Tweedie denoising with the conditional likelihood (no guidance), image by image.
            if strength != 0:
                images = self.transformer.denoise(images, class_labels=labels, strength=strength)
                denoised()

        self.maybe_free_model_hooks()
        images = self._postprocess(images, output_type)
        if not return_dict:
            return (images,)
        return TarFlowPipelineOutput(images=images, stats=stats)

    # --------------------------------------------------------------------------------------------- likelihood
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        r"""
        Images in the pipeline's output formats -> a float32 tensor (batch, channels, height, width) in [0, 1].

        Accepts a PIL image or a list of them (converted to the model's mode, `"L"` or `"RGB"`; transparency is
        flattened onto white), a channels-last NumPy array (height, width[, channels]) or (batch, height, width,
        channels), a tensor (channels, height, width) or (batch, channels, height, width), or lists of arrays /
        tensors. Floats must lie in [0, 1]; uint8 is divided by 255. Images are not resized. Anything ambiguous (a
        channels-first array, an empty batch) is refused; see `tarflow_hf.images`.
        """
        config = self.transformer.config
        return to_tensor(images, config.num_channels, config.image_size)

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> the model's [-1, 1], on its device and in its dtype."""
        return VaeImageProcessor.normalize(images).to(self._execution_device, self.transformer.dtype)

    def _forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None, batch_size: int):
        """The model's forward pass in chunks, concatenated: (log_likelihood, bits_per_dim, latents)."""

        def forward(pixels: torch.Tensor, chunk_labels: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            out = self.transformer(pixels, chunk_labels)
            return out.log_likelihood, out.bits_per_dim, out.latents

        return run_in_chunks(forward, batch_size, pixel_values, labels)

    @torch.no_grad()
    def log_likelihood(self, images: ImageInput, class_labels: LabelInput = None, batch_size: int = 64) -> torch.Tensor:
        r"""
        Exact log-density `log p(x | y)` in nats (summed over all dimensions) of images mapped to the model's
        space, `x = 2 * image - 1`.

        Args:
            images: PIL images, or arrays / tensors in [0, 1] (see [`~TarFlowPipeline.preprocess`]).
            class_labels: one label or one per image (ids or names); `None` is the unconditional branch.
            batch_size (`int`): images per forward pass.

        Returns:
            `torch.Tensor` of shape `(batch,)`, float32.

        Example:

        ```python
        >>> pipe.log_likelihood(pipe(class_labels=[3], output_type="pt").images, class_labels=[3])
        ```
        """
        pixel_values = self._model_input(self.preprocess(images))
        labels = self._labels_tensor(self._class_ids(class_labels), pixel_values.shape[0])
        return self._forward(pixel_values, labels, batch_size)[0].float()

    @torch.no_grad()
    def bits_per_dim(
        self,
        images: ImageInput,
        class_labels: LabelInput = None,
        dequantize: bool = True,
        generator: Generator = None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        r"""
        Negative log-likelihood in bits per dimension of 8-bit images, as Apple's `evaluate_bpd.py` computes it.

        Images are quantized to their 256 levels `k` (PIL and uint8 inputs are already; floats are rounded,
        `k = round(255 * x)`). With `dequantize=True` (the standard evaluation) uniform noise `u` in [0, 1) is added,
        `x = 2 * (k + u) / 256 - 1`, drawn from `generator` (one per image for batch-independent results; the
        global torch RNG when `None`), so the mean over a dataset estimates the discrete likelihood's bound. With
        `dequantize=False` the density is read at the pixels themselves, `x = 2 * k / 255 - 1` (deterministic, not a
        proper discrete likelihood). Apple evaluates with `class_labels=None`.

        Returns:
            `torch.Tensor` of shape `(batch,)`, float32.

        Example:

        ```python
        >>> generator = [torch.Generator().manual_seed(i) for i in range(len(images))]
        >>> pipe.bits_per_dim(images, generator=generator).mean()
        ```
        """
        levels = (self.preprocess(images) * 255).round()
        if dequantize:
            noise = uniform_noise(levels.shape, generator)
            unit = (levels + noise) / 256
        else:
            unit = levels / 255
        pixel_values = self._model_input(unit)
        labels = self._labels_tensor(self._class_ids(class_labels), pixel_values.shape[0])
        return self._forward(pixel_values, labels, batch_size)[1].float()

    @torch.no_grad()
    def encode(self, images: ImageInput, class_labels: LabelInput = None, batch_size: int = 64) -> torch.Tensor:
        r"""
        Images -> their latents under the flow, (batch, num_patches, patch_dim), standard normal for data images.
        Exactly inverted by [`~TarFlowPipeline.decode`] with the same `class_labels`.

        Example:

        ```python
        >>> z = pipe.encode(images)
        >>> pipe.decode(z, output_type="pt")  # the same images
        ```
        """
        pixel_values = self._model_input(self.preprocess(images))
        labels = self._labels_tensor(self._class_ids(class_labels), pixel_values.shape[0])
        latents = self._forward(pixel_values, labels, batch_size)[2]
        # `inverse` scales latents by the prior's std (ones for nvp models); undo it so decode(encode(x)) == x.
        return latents / self.transformer.prior_variance.sqrt()

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, class_labels: LabelInput = None, output_type: str = "pil"
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        r"""
        Latents -> images: the exact inverse of [`~TarFlowPipeline.encode`] (no guidance, no denoising).

        Example (spherical interpolation between two images):

        ```python
        >>> z = pipe.encode([image_a, image_b])
        >>> t = torch.linspace(0, 1, 8).view(-1, 1, 1)
        >>> frames = pipe.decode(torch.cos(t * torch.pi / 2) * z[:1] + torch.sin(t * torch.pi / 2) * z[1:])
        ```
        """
        check_output_type(output_type, OUTPUT_TYPES)
        latents = self.prepare_latents(0, None, latents, self._execution_device)
        labels = self._labels_tensor(self._class_ids(class_labels), latents.shape[0])
        self._onload_transformer()
        images = self.transformer.inverse(latents.to(self.transformer.dtype), class_labels=labels)
        self.maybe_free_model_hooks()
        return self._postprocess(images, output_type)

    @torch.no_grad()
    def classify(
        self, images: ImageInput, prior: torch.Tensor | Sequence[float] | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        r"""
        Class probabilities by Bayes' rule, `p(y | x) ∝ p(x | y) p(y)`, from the exact class-conditional
        likelihoods (a generative classifier). Every image is scored under every class, `batch_size` (image, class)
        pairs per forward pass.

        Args:
            images: PIL images, or arrays / tensors in [0, 1].
            prior (`torch.Tensor` or list of floats, *optional*): class prior p(y), `(num_classes,)`; uniform when
                `None`. It need not be normalized.
            batch_size (`int`): (image, class) pairs per forward pass.

        Returns:
            `torch.Tensor` of shape `(batch, num_classes)`: probabilities, each row summing to 1.

        Example:

        ```python
        >>> probabilities = pipe.classify(images)
        >>> [pipe.id2label[i] for i in probabilities.argmax(-1).tolist()]
        ```
        """
        num_classes = self.transformer.config.num_classes
        if num_classes == 0:
            raise ValueError("classify needs a class-conditional model; this one is unconditional (num_classes=0)")
        log_prior = _log_prior(prior, num_classes)
        pixel_values = self._model_input(self.preprocess(images))
        batch = pixel_values.shape[0]
        image_index = torch.arange(batch, device=pixel_values.device).repeat_interleave(num_classes)
        classes = torch.arange(num_classes, device=pixel_values.device).repeat(batch)
        (log_likelihood,) = run_in_chunks(
            lambda rows, labels: (self.transformer(pixel_values[rows], labels).log_likelihood,),
            batch_size,
            image_index,
            classes,
        )
        scores = log_likelihood.view(batch, num_classes).float() + log_prior.to(log_likelihood.device)
        return scores.softmax(dim=-1)


def _log_prior(prior: torch.Tensor | Sequence[float] | None, num_classes: int) -> torch.Tensor:
    """log p(y) of `classify`'s class prior (uniform when `None`; need not be normalized), float32."""
    if prior is None:
        return torch.zeros(num_classes)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.shape != (num_classes,) or not torch.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"prior must be {num_classes} non-negative finite numbers, not all zero")
    return prior.log().float()


if PACKAGED:  # AutoModel finds the package's model wherever this pipeline is importable
    importlib.import_module(__package__).register_auto_classes()

__all__ = ["TarFlowPipeline", "TarFlowPipelineOutput"]
