"""What every tarflow-hf pipeline shares: argument checks, prior noise, running the flow backwards block by block
(CPU-offload hook, progress bar, diffusers-style callbacks), saving and uploading through `tarflow_hf.hub`, and
loading with the installed classes.

`FlowPipelineMixin` goes before `DiffusionPipeline` in a pipeline's bases; the pipeline names its transformer's
installed class (`_transformer_module`, `_transformer_class`). A saved folder carries this file (see
`tarflow_hf.hub`), so it imports nothing from `tarflow_hf` by name; `hub` and the installed model classes are
looked up relative to this module's package when it is the installed one.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub.errors import StrictDataclassError

# True when imported as part of the installed tarflow-hf package; False when diffusers loaded this file from a
# saved folder or Hub repository (`trust_remote_code=True`).
PACKAGED = __name__ == "tarflow_hf.pipeline_utils"

Generator = torch.Generator | list[torch.Generator] | None
Callback = Callable[..., Any] | PipelineCallback | MultiPipelineCallbacks | None
PUSH_ARGUMENTS = ("repo_id", "token", "private", "commit_message", "create_pr")
# diffusers logs the loading of each component on its pipeline loader's logger; the transformer's is logged there too.
LOADING_LOGGER = logging.get_logger("diffusers.pipelines.pipeline_utils")


# ------------------------------------------------------------------------------------------------ checks
def check_output_type(output_type: str, allowed: Sequence[str], hint: str = "") -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {tuple(allowed)}, got {output_type!r}{hint}")


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """`value` is an int (not a bool) >= `minimum`, else a one-line `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_guidance_scale(guidance_scale: Any) -> None:
    """A finite number > 0 (diffusers convention: 1.0 is no guidance; Apple's `--cfg g` is `1 + g`)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
        raise ValueError(f"guidance_scale must be a number > 0 (1.0 is no guidance), got {guidance_scale!r}")
    if not 0 < guidance_scale < math.inf:
        raise ValueError(f"guidance_scale must be a finite number > 0 (1.0 is no guidance), got {guidance_scale}")


def check_denoise(denoise: Any) -> None:
    """`True`, `False` or a finite number (the denoising step's strength)."""
    if isinstance(denoise, bool):
        return
    if not isinstance(denoise, int | float) or not math.isfinite(denoise):
        raise ValueError(f"denoise must be True, False or a finite strength (a number), got {denoise!r}")


def check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {batch_size!r}")


def callback_inputs(callback: Callback, names: Sequence[str], allowed: Sequence[str]) -> Sequence[str]:
    """The tensors a step-end callback receives: a `PipelineCallback`'s own `tensor_inputs`, else `names`,
    checked against the pipeline's `_callback_tensor_inputs`."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs has {unknown}; allowed are {list(allowed)}")
    return names


def run_in_chunks(
    function: Callable[..., tuple[torch.Tensor, ...]], batch_size: int, *inputs: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """`function` on `batch_size` rows of `inputs` at a time (`None` inputs stay `None`), its outputs (a tuple of
    tensors) concatenated: the pipelines' likelihood passes, in memory-bounded chunks."""
    check_batch_size(batch_size)
    parts = [
        function(*(None if x is None else x[start : start + batch_size] for x in inputs))
        for start in range(0, inputs[0].shape[0], batch_size)
    ]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory of `device` in bytes (a GPU's, or the machine's RAM for the CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


# ------------------------------------------------------------------------------------------------- noise
def check_latents(latents: Any, shape: Sequence[int | None], describe: str) -> torch.Tensor:
    """Given prior noise: a floating-point tensor of `shape` (`None`: any size, the batch usually)."""
    if (
        not isinstance(latents, torch.Tensor)
        or latents.dim() != len(shape)
        or any(want is not None and got != want for got, want in zip(latents.shape, shape, strict=True))
    ):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must have shape {describe}, got {got}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got dtype {latents.dtype}")
    if latents.shape[0] == 0:
        raise ValueError(f"latents is an empty batch (shape {tuple(latents.shape)})")
    return latents


def _checked_generators(generator: Generator, count: int) -> Generator:
    """`generator` checked (a torch.Generator, a list of one per image, or None); a tuple becomes a list."""
    generators = list(generator) if isinstance(generator, list | tuple) else [generator]
    bad = next((g for g in generators if not isinstance(g, torch.Generator)), None)
    if generator is not None and (bad is not None or not generators):
        raise ValueError(
            f"generator must be a torch.Generator or a list of them (one per image), got {bad!r} in it; seed one "
            "with torch.Generator().manual_seed(seed)"
        )
    if isinstance(generator, list | tuple) and len(generators) != count:
        raise ValueError(
            f"got a list of {len(generators)} generators for {count} images; pass one generator per image "
            "(or a single generator)"
        )
    return generators if isinstance(generator, list | tuple) else generator


def normal_noise(shape: Sequence[int], generator: Generator, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise as diffusers' `randn_tensor` draws it: on the generator's device, one generator
    per image when a list is given (so a seed gives the same image in any batch)."""
    generator = _checked_generators(generator, shape[0])
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)


def uniform_noise(shape: torch.Size, generator: Generator) -> torch.Tensor:
    """U[0, 1) float32 noise drawn on the generator's device and returned on the CPU; one generator per image when a
    list is given (as `normal_noise`)."""
    generator = _checked_generators(generator, shape[0])
    if isinstance(generator, list):
        return torch.cat(
            [torch.rand((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).cpu() for g in generator]
        )
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).cpu()


# ------------------------------------------------------------------------------------------------- mixin
class FlowPipelineMixin:
    """Sampling plumbing, saving/uploading and loading shared by the tarflow-hf pipelines (see the module doc)."""

    _transformer_module: ClassVar[str]  # the installed model's module in this package, e.g. "modeling_tarflow"
    _transformer_class: ClassVar[str]  # and its class, e.g. "TarFlowModel"

    # ------------------------------------------------------------------------------------- running the flow
    def _onload_transformer(self) -> None:
        # With `enable_model_cpu_offload`, accelerate moves the model to the accelerator when its `forward` runs;
        # sampling calls `inverse`, so run the hook by hand (as diffusers' `apply_forward_hook` does for VAEs).
        hook = getattr(self.transformer, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.transformer)

    # Per-call state that diffusers pipelines keep as attributes (callbacks read and set `_guidance_scale`), kept per
    # thread so that calls running at once on one pipeline (a Space serving several visitors) never see each other's.
    @property
    def _guidance_scale(self) -> float | None:
        return _call_state(self).get("guidance_scale")

    @_guidance_scale.setter
    def _guidance_scale(self, value: float | None) -> None:
        _call_state(self)["guidance_scale"] = value

    @property
    def _num_timesteps(self) -> int | None:
        return _call_state(self).get("num_timesteps")

    @_num_timesteps.setter
    def _num_timesteps(self, value: int | None) -> None:
        _call_state(self)["num_timesteps"] = value

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the call running in this thread (diffusers convention: 1.0 is none)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the call running in this thread still guides (a callback may turn guidance off)."""
        return self._guidance_scale is not None and self._guidance_scale > 0 and self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int | None:
        """Steps of the call running in this thread: one per flow block (diffusers' denoising steps)."""
        return self._num_timesteps

    def _scale_for_block(self, step: int) -> float:
        """The guidance of the next block: what the call asked for, unless a callback changed `_guidance_scale`;
        diffusers' guidance cut-off callbacks set 0.0 to stop guiding, so a scale <= 0 means none (1.0)."""
        return self._guidance_scale if self.do_classifier_free_guidance else 1.0

    @contextlib.contextmanager
    def _block_progress(
        self,
        denoise: bool,
        callback: Callback,
        tensor_inputs: Sequence[str],
        tensors: dict[str, Any] | None = None,
    ) -> Iterator[tuple[Callable[[int, torch.Tensor], torch.Tensor | None], Callable[[], None]]]:
        """Onload the transformer and open a progress bar of one step per flow block (plus one for denoising).
        Yields `(on_block, denoised)`: `on_block(step, current)` is the model's per-block callback: it calls
        `callback(pipe, step, block_index, callback_kwargs)` diffusers style (`block_index` counts down as diffusion
        timesteps do; `callback_kwargs` holds `latents`, the current model-space samples, and the call's other
        `tensors` named in `tensor_inputs`), takes back what the callback returns (latents it returns replace the
        current ones; other tensors update `tensors`), and advances the bar; `denoised()` advances it after the
        denoising step."""
        num_blocks = self.transformer.config.num_blocks
        self._num_timesteps = num_blocks
        tensors = {} if tensors is None else tensors
        self._onload_transformer()
        with self.progress_bar(total=num_blocks + int(denoise)) as progress_bar:

            def on_block(step: int, current: torch.Tensor) -> torch.Tensor | None:
                replaced = None
                if callback is not None:
                    available = {**tensors, "latents": current}
                    kwargs = {name: available[name] for name in tensor_inputs}
                    outputs = callback(self, step, num_blocks - 1 - step, kwargs) or {}
                    replaced = outputs.get("latents")
                    tensors.update({name: value for name, value in outputs.items() if name in tensors})
                progress_bar.update()
                return replaced

            yield on_block, progress_bar.update

    # ------------------------------------------------------------------------------------- saving (hub.py)
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        model_card: Any = None,
        overwrite_model_card: bool = False,
        **kwargs,
    ) -> None:
        r"""
        Save the pipeline in a folder that loads with this class's `from_pretrained` (tarflow-hf installed) and with
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` (without it): `model_index.json`, the
        pipeline's code, one subfolder per component (safetensors weights; the transformer's with its code) and a
        model card `README.md`; see `tarflow_hf.hub`.

        The folder is written next to its destination and then moved in place, so an interrupted save leaves no
        half-written files; other files already in the folder are kept.

        Args:
            save_directory (`str` or `os.PathLike`): the folder (created if needed).
            safe_serialization (`bool`): save weights as safetensors (the default); `False` writes PyTorch pickles
                (`.bin`), which loading reads with `weights_only=True`.
            variant, max_shard_size: as in [`DiffusionPipeline.save_pretrained`].
            push_to_hub (`bool`): then upload the folder to `repo_id` (a keyword argument; defaults to the folder
                name), see `push_to_hub`. Also accepts `token`, `private`, `commit_message`, `create_pr`.
            model_card (`ModelCard` or `dict`, *optional*): the card to write, or keyword arguments for
                `model_card` (for instance `{"license": "apple-amlr", "repo_id": "me/tarflow"}`).
            overwrite_model_card (`bool`): replace a README.md already in the folder even if it was not generated by
                tarflow-hf (a card written by hand or by training code is kept otherwise).
        """
        push_kwargs = {key: kwargs.pop(key) for key in PUSH_ARGUMENTS if key in kwargs}
        if kwargs:
            raise ValueError(f"unexpected arguments to save_pretrained: {sorted(kwargs)}")
        hub = _hub()
        repo_id = push_kwargs.pop("repo_id", None)
        card = model_card
        if repo_id and not isinstance(card, hub.ModelCard):
            card = {"repo_id": repo_id, **(card or {})}
        folder = hub.save_pipeline(
            self,
            save_directory,
            card=card,
            overwrite_model_card=overwrite_model_card,
            variant=variant,
            max_shard_size=max_shard_size,
            safe_serialization=safe_serialization,
        )
        if push_to_hub:
            hub.upload_folder(folder, repo_id or folder.name, overwrite_model_card=overwrite_model_card, **push_kwargs)

    def model_card(self, repo_id: str | None = None, license: str | None = None, **kwargs) -> Any:
        r"""
        A model card (`huggingface_hub.ModelCard`) for this pipeline: metadata (library, tags, pipeline tag,
        license, datasets, base model), the model's configuration, and how to load and sample it with and without
        tarflow-hf installed. Keyword arguments as `tarflow_hf.hub.model_card` (`datasets`, `base_model`,
        `description`, `training`, `evaluation`).
        """
        return _hub().model_card(self, repo_id=repo_id, license=license, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        model_card: Any = None,
        overwrite_model_card: bool = False,
    ) -> Any:
        r"""
        Upload the pipeline to the Hub (creating the repository if needed), in the layout of `save_pretrained`,
        with a generated model card. A README.md already in the repository that was not generated by tarflow-hf is
        kept unless `overwrite_model_card=True`; a pipeline loaded from a folder with a generated card keeps that
        card's training and evaluation sections.

        Example:

        ```python
        >>> pipe.push_to_hub("me/tarflow-afhq", model_card={"license": "apple-amlr"})
        ```
        """
        return _hub().push_pipeline(
            self,
            repo_id,
            card=model_card,
            overwrite_model_card=overwrite_model_card,
            token=token,
            private=private,
            commit_message=commit_message,
            create_pr=create_pr,
            variant=variant,
            safe_serialization=safe_serialization,
        )

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> Any:
        r"""
        Load a saved pipeline (a folder or a Hub id), as [`DiffusionPipeline.from_pretrained`].

        With tarflow-hf installed the installed classes are used and no remote code runs, whatever the folder
        ships; `torch_dtype`/`dtype` (a dtype, or a dict by component) apply to the components, `device_map` to the
        transformer. Without tarflow-hf, use `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`.
        """
        if PACKAGED and Path(pretrained_model_name_or_path).is_dir():
            importlib.import_module(f"{__package__}.registry").check_pipeline_folder(pretrained_model_name_or_path)
            _check_variant(Path(pretrained_model_name_or_path), kwargs.get("variant"))
        if PACKAGED and kwargs.get("transformer") is None:
            kwargs.pop("transformer", None)
            kwargs["transformer"] = cls._load_transformer(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _load_transformer(cls, pretrained_model_name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Any:
        module = importlib.import_module(f"{__package__}.{cls._transformer_module}")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, dict):
            dtype = dtype.get("transformer", dtype.get("default"))
        passed = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant")
        options = {key: kwargs[key] for key in passed if kwargs.get(key) is not None}
        folder = Path(pretrained_model_name_or_path) / "transformer"
        if "variant" in options and folder.is_dir() and not _has_variant(folder, options["variant"]):
            del options["variant"]  # as diffusers loads a component without the variant's files: its own weights
        device_map = kwargs.pop("device_map", None)
        if device_map is not None:
            options["device_map"] = device_map
        quantization = kwargs.get("quantization_config")  # diffusers' PipelineQuantizationConfig, for every component
        if quantization is not None and hasattr(quantization, "_resolve_quant_config"):
            # The transformer is a transformers model: its part of the pipeline's configuration, as transformers'.
            transformer_config = quantization._resolve_quant_config(is_diffusers=False, module_name="transformer")
            if transformer_config is not None:
                options["quantization_config"] = transformer_config
            kwargs["quantization_config"] = _without_transformer(quantization)  # diffusers quantizes the others
        model_class = getattr(module, cls._transformer_class)
        try:
            model = model_class.from_pretrained(
                pretrained_model_name_or_path, subfolder="transformer", dtype=dtype or torch.float32, **options
            )
        except StrictDataclassError as error:  # a config field of the wrong type: huggingface_hub's message
            details = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise ValueError(f"{pretrained_model_name_or_path}/transformer/config.json: {details}") from None
        LOADING_LOGGER.info(
            f"Loaded transformer as {model_class.__name__} from `transformer` subfolder of "
            f"{pretrained_model_name_or_path}."
        )
        return model

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        config = super()._dict_from_json_file(json_file)
        if PACKAGED and "transformer" in config:
            # The saved model_index.json names the remote-code classes shipped with the folder; the installed
            # package uses its own pipeline class instead, `from_pretrained` passes the transformer it loaded, and
            # the sampler is the installed package's class of that name.
            config["_class_name"] = cls.__name__
            config["transformer"] = [None, None]
            sampler = config.get("sampler")
            if isinstance(sampler, list) and len(sampler) == 2 and sampler[1] is not None:
                config["sampler"] = [f"{__package__}.samplers", sampler[1]]
        return config


def _without_transformer(quantization: Any) -> Any:
    """A `PipelineQuantizationConfig` for the components other than the transformer (which the pipeline loads
    itself), or None when it names no other."""
    import copy

    if not quantization.quant_mapping and not quantization.components_to_quantize:
        return quantization  # every component: diffusers does the others
    others = copy.copy(quantization)
    if quantization.quant_mapping:
        others.quant_mapping = {name: c for name, c in quantization.quant_mapping.items() if name != "transformer"}
        return others if others.quant_mapping else None
    names = [name for name in quantization.components_to_quantize or [] if name != "transformer"]
    others.components_to_quantize = names
    return others if names else None


def _has_variant(folder: Path, variant: str) -> bool:
    """Whether `folder` holds files of weights `variant` (`model.fp16.safetensors`): diffusers' test."""
    return any(
        len(parts) > 2 and parts[1].startswith(variant) for parts in (p.name.split(".") for p in folder.iterdir())
    )


def _check_variant(folder: Path, variant: str | None) -> None:
    """diffusers' `ValueError` for a `variant` no component of the pipeline folder has, before anything loads."""
    if variant is None:
        return
    if not any(sub.is_dir() and _has_variant(sub, variant) for sub in folder.iterdir()):
        raise ValueError(
            f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are "
            f"available. ({folder} has no component saved with that variant.)"
        )


_CALL_STATES = threading.local()


def _call_state(pipeline: Any) -> dict[str, Any]:
    """This thread's per-call state of `pipeline`."""
    states = _CALL_STATES.__dict__.setdefault("by_pipeline", weakref.WeakKeyDictionary())
    return states.setdefault(pipeline, {})


def _hub() -> ModuleType:
    """`tarflow_hf.hub` (saving, cards, uploads). Looked up by name, not imported relatively, so that a saved folder
    need not carry it; a copy loaded as remote code cannot save."""
    if not PACKAGED:
        raise RuntimeError(
            "saving or pushing a pipeline loaded as remote code needs the tarflow-hf package: pip install tarflow-hf, "
            "then load it with the package's pipeline class (TarFlowPipeline / StarFlowPipeline).from_pretrained"
        )
    return importlib.import_module(f"{__package__}.hub")


__all__ = [
    "FlowPipelineMixin",
    "callback_inputs",
    "check_batch_size",
    "check_count",
    "check_denoise",
    "check_guidance_scale",
    "check_latents",
    "check_output_type",
    "device_memory_bytes",
    "normal_noise",
    "run_in_chunks",
    "uniform_noise",
]
