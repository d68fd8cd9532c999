"""LoRA adapters for the flow pipelines, as diffusers' pipelines take them: `LoraMixin` gives `TarFlowPipeline` and
`StarFlowPipeline` diffusers' LoRA methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, `unload_lora_weights`,
`save_lora_weights`, ...), with diffusers' file format and semantics, built on PEFT's own functions
(`inject_adapter_in_model`, `set_peft_model_state_dict`, `get_peft_model_state_dict`, `LoraConfig`).

```python
>>> pipe = StarFlowPipeline.from_pretrained("starflow-3b")
>>> pipe.load_lora_weights("you/starflow-corgis", adapter_name="corgis")  # a folder or a Hub id
>>> pipe.load_lora_weights("you/starflow-ink", adapter_name="ink")
>>> pipe.set_adapters(["corgis", "ink"], adapter_weights=[1.0, 0.5])
>>> image = pipe("a corgi").images[0]
>>> pipe.fuse_lora(lora_scale=0.8)  # into the weights: no LoRA cost per step
>>> pipe.unload_lora_weights()  # the plain model again (with the fused adapters in its weights, if fused)
```

The file is diffusers' `pytorch_lora_weights.safetensors`: PEFT's keys under the component's prefix
(`transformer.blocks.0.layers.0.attention.qkv.lora_A.weight`) and, in the safetensors metadata, the adapter's
`LoraConfig` as JSON under `lora_adapter_metadata`, its keys under the same prefix (`transformer.r`,
`transformer.lora_alpha`, ...). Without that metadata the rank is read from the weights (the most common rank, others
as a `rank_pattern`) and alpha is the rank (a scale of 1), as diffusers does. A LoRA applies to the transformer (the
flow); the flow's linear layers (`layers.FlowLinear`) are `nn.Linear`s, which PEFT wraps, and the samplers' weight
packing still serves the wrapped base layers.

A saved pipeline folder carries this file with the pipeline's code (see `tarflow_hf.hub`), so it imports nothing from
tarflow_hf by name, and `peft` only when a LoRA method runs: a folder loads without peft installed. Saving a LoRA file
needs the installed package (its atomic writes, `tarflow_hf.fileio`), as saving a pipeline does.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

# True when imported as part of the installed tarflow-hf package; False when diffusers loaded this file from a saved
# folder (`trust_remote_code=True`).
PACKAGED = __name__ == "tarflow_hf.lora"

# diffusers' names (`diffusers.loaders.lora_base`).
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
TRANSFORMER_NAME = "transformer"
PEFT_MISSING = 'LoRA needs the peft package: pip install "tarflow-hf[lora]" (or pip install "peft>=0.17")'
# Where a model keeps the `requires_grad` of its own parameters while adapters are in it (PEFT freezes them).
_REQUIRES_GRAD = "_lora_base_requires_grad"


# ------------------------------------------------------------------------------------------------- PEFT
def _peft() -> Any:
    """The peft package, imported on first use (a pipeline folder loads without it)."""
    try:
        return importlib.import_module("peft")
    except ImportError as error:
        raise ImportError(PEFT_MISSING) from error


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every layer of `model` that PEFT wrapped (none, without peft installed)."""
    if not getattr(model, "peft_config", None):
        return iter(())
    base_class = importlib.import_module("peft.tuners.tuners_utils").BaseTunerLayer
    return ((name, module) for name, module in model.named_modules() if isinstance(module, base_class))


def loaded_adapters(model: nn.Module) -> list[str]:
    """The adapters loaded into `model`, in loading order."""
    return list(getattr(model, "peft_config", None) or {})


def config_metadata(config: Any) -> dict[str, Any]:
    """A `LoraConfig` as the JSON-ready dict diffusers stores in a LoRA file (sets as lists)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: sorted(value) if isinstance(value, set) else value for key, value in data.items()}


def add_lora_adapter(model: nn.Module, config: Any, adapter_name: str = "default", **peft_kwargs: Any) -> None:
    """Inject a new adapter (PEFT's `inject_adapter_in_model`) into `model`, which then runs it alone; PEFT freezes
    every other parameter (`unload_lora_weights` gives the model its own `requires_grad` back)."""
    peft = _peft()
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty name without '.', got {adapter_name!r}")
    if adapter_name in loaded_adapters(model):
        raise ValueError(f"adapter name {adapter_name!r} is already in use; loaded: {loaded_adapters(model)}")
    if not loaded_adapters(model):
        setattr(model, _REQUIRES_GRAD, {name: p.requires_grad for name, p in model.named_parameters()})
    try:
        with warnings.catch_warnings():  # "Already found a `peft_config` attribute": a second adapter is wanted
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            peft.inject_adapter_in_model(config, model, adapter_name=adapter_name, **peft_kwargs)
    except BaseException:
        delete_lora_adapter(model, adapter_name)
        raise
    model._hf_peft_config_loaded = True  # transformers' adapter methods see the adapters


def delete_lora_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter's layers and config; the wrappers go with the last one."""
    for _, layer in tuner_layers(model):
        layer.delete_adapter(adapter_name)
    getattr(model, "peft_config", {}).pop(adapter_name, None)
    if not loaded_adapters(model):
        remove_lora_layers(model)


def remove_lora_layers(model: nn.Module) -> None:
    """Every PEFT-wrapped layer replaced by its base layer (with whatever was fused into it), the adapters' configs
    dropped, and the model's own `requires_grad` back: the model as it was before any adapter, bit for bit, unless a
    LoRA was fused."""
    for name, layer in list(tuner_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(getattr(model, _REQUIRES_GRAD, {}).get(name, parameter.requires_grad))
    if hasattr(model, _REQUIRES_GRAD):
        delattr(model, _REQUIRES_GRAD)


# --------------------------------------------------------------------------------------------- LoRA files
def is_lora_folder(folder: str | os.PathLike) -> bool:
    """A folder holding a LoRA file under diffusers' name (what a LoRA training writes)."""
    return any(Path(folder, name).is_file() for name in (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME))


def _lora_file(source: str | os.PathLike, weight_name: str | None, subfolder: str | None, hub: dict) -> Path:
    """The LoRA file `source` names: a file, a folder's `weight_name` (diffusers' name by default), or a Hub
    repository's."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        names = [weight_name] if weight_name else [LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME]
        found = next((folder / name for name in names if (folder / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{folder} has no {' or '.join(names)} (diffusers' LoRA file name; pass weight_name= for another)"
            )
        return found
    huggingface_hub = importlib.import_module("huggingface_hub")
    options = {key: value for key, value in hub.items() if value is not None}
    return Path(
        huggingface_hub.hf_hub_download(
            str(source), weight_name or LORA_WEIGHT_NAME_SAFE, subfolder=subfolder, **options
        )
    )


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(the tensors, diffusers' adapter metadata or None) of a LoRA file: safetensors, or a PyTorch pickle read
    with `weights_only=True`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        try:
            return dict(torch.load(path, map_location="cpu", weights_only=True)), None
        except Exception as error:  # pickle's and torch's many errors
            raise ValueError(f"{path}: not a readable PyTorch LoRA file ({error})") from None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        return tensors, json.loads(raw) if raw else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its {LORA_ADAPTER_METADATA_KEY} metadata is not JSON ({error})") from None


def _component_part(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key.removeprefix(f"{prefix}."): value for key, value in data.items() if key.startswith(f"{prefix}.")}


# ------------------------------------------------------------------------------------ checks and configs
def _lora_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-format LoRA weights by module: {"blocks.0...qkv": {"A": ..., "B": ..., "B.bias": ...}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        module, found, part = key.partition(".lora_")
        if not found or part not in ("A.weight", "B.weight", "B.bias"):
            raise ValueError(
                f"{key!r} is not a LoRA weight in PEFT's format ('<layer>.lora_A.weight', '<layer>.lora_B.weight')"
            )
        modules.setdefault(module, {})[part.removesuffix(".weight")] = value
    return modules


def check_lora_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Every LoRA weight fits a linear layer of `model` (one `ValueError` line naming the first that does not);
    returns each layer's rank."""
    ranks = {}
    for name, parts in _lora_modules(state_dict).items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the LoRA has weights for {name!r}, which {type(model).__name__} does not have (a LoRA of another "
                "model?)"
            ) from None
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"the LoRA adapts {name!r}, a {type(layer).__name__}: only linear layers take LoRA here")
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"the LoRA has no lora_{'B' if 'A' in parts else 'A'}.weight for {name!r}")
        rank = parts["A"].shape[0]
        shapes = {"A": (rank, layer.in_features), "B": (layer.out_features, rank)}
        for part, shape in shapes.items():
            if tuple(parts[part].shape) != shape:
                raise ValueError(
                    f"{name}.lora_{part}.weight has shape {tuple(parts[part].shape)}, but {name} "
                    f"({layer.in_features} -> {layer.out_features}) with rank {rank} takes {shape}"
                )
        ranks[name] = rank
    if not ranks:
        raise ValueError("the LoRA holds no weights")
    return ranks


def lora_config(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None, ranks: dict[str, int]
) -> Any:
    """The adapter's `LoraConfig`: diffusers' metadata when the file has it (fields this peft does not know are
    left out), else read from the weights: the most common rank, the others as a `rank_pattern`, alpha equal to
    the rank (scale 1), the adapted layers by name."""
    config_class = _peft().LoraConfig
    if metadata:
        known = {field.name for field in dataclasses.fields(config_class)}
        return config_class(**{key: value for key, value in metadata.items() if key in known})
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(name)}": value for name, value in ranks.items() if value != rank}
    return config_class(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_bias=any(key.endswith("lora_B.bias") for key in state_dict),
    )


def load_lora_adapter(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    low_cpu_mem_usage: bool = False,
) -> str:
    """Load PEFT-format LoRA weights (keys without the component prefix) into `model` as a new adapter, which
    becomes the active one (diffusers' behaviour). Returns the adapter's name (`default_{n}` when not given). A
    LoRA that does not fit the model is one `ValueError` and leaves the model as it was."""
    peft = _peft()
    ranks = check_lora_weights(model, state_dict)
    name = adapter_name if adapter_name is not None else f"default_{len(loaded_adapters(model))}"
    config = lora_config(state_dict, metadata, ranks)
    add_lora_adapter(model, config, name, low_cpu_mem_usage=low_cpu_mem_usage)
    try:
        loaded = peft.set_peft_model_state_dict(model, dict(state_dict), name, low_cpu_mem_usage=low_cpu_mem_usage)
        missing = [key for key in loaded.missing_keys if ".lora_" in key and name in key.split(".")]
        if missing:
            raise ValueError(f"the LoRA's config adapts {missing[0].split('.lora_')[0]!r} but it has no weights for it")
    except BaseException:
        delete_lora_adapter(model, name)
        raise
    return name


def write_lora_file(folder: Path, weight_name: str, tensors: dict[str, torch.Tensor], metadata: dict | None) -> Path:
    """Write a LoRA file into `folder` (created if needed) atomically, through `tarflow_hf.fileio`."""
    if not PACKAGED:
        raise RuntimeError(
            "saving a LoRA from a pipeline loaded as remote code needs the tarflow-hf package: pip install tarflow-hf"
        )
    fileio = importlib.import_module(f"{__package__}.fileio")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weight_name
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    with fileio.atomic_file(path) as staging:
        if weight_name.endswith(".safetensors"):
            from safetensors.torch import save_file

            extra = {LORA_ADAPTER_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)} if metadata else {}
            save_file(tensors, str(staging), metadata={"format": "pt", **extra})
        else:
            torch.save(tensors, staging)
    return path


# ---------------------------------------------------------------------------------------------- the mixin
class LoraMixin:
    """diffusers' LoRA methods for a pipeline whose `transformer` takes the adapters (see the module doc). Goes
    first in a pipeline's bases: its `save_pretrained`/`push_to_hub` refuse a pipeline holding LoRA layers."""

    _lora_loadable_modules: ClassVar[list[str]] = [TRANSFORMER_NAME]
    transformer_name = TRANSFORMER_NAME

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor], **kwargs: Any
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        r"""
        The tensors of a LoRA, keys as in the file (`transformer.<layer>.lora_A.weight`), from a state dict, a file, a
        folder (`pytorch_lora_weights.safetensors`, else `.bin`) or a Hub repository.

        Args:
            weight_name (`str`, *optional*): the file in the folder or repository.
            subfolder, revision, cache_dir, token, local_files_only, force_download: for the download.
            use_safetensors (`bool`, *optional*): accepted for diffusers' signature (the file's suffix decides).
            return_lora_metadata (`bool`): also return the adapter metadata (None when the file has none).
        """
        return_metadata = kwargs.pop("return_lora_metadata", False)
        weight_name, subfolder = kwargs.pop("weight_name", None), kwargs.pop("subfolder", None)
        kwargs.pop("use_safetensors", None)
        hub = {key: kwargs.pop(key, None) for key in ("revision", "cache_dir", "token", "local_files_only")}
        hub["force_download"] = kwargs.pop("force_download", None)
        if kwargs:
            raise TypeError(f"lora_state_dict() got unexpected keyword arguments {sorted(kwargs)}")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            state_dict, metadata = dict(source), None
        else:
            state_dict, metadata = read_lora_file(_lora_file(source, weight_name, subfolder, hub))
        return (state_dict, metadata) if return_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        r"""
        Load a LoRA into the transformer as a new adapter, which becomes the active one (`set_adapters` combines
        several). `pretrained_model_name_or_path_or_dict`: a folder or Hub id holding `pytorch_lora_weights.safetensors`
        (diffusers' name), a LoRA file, or a state dict with `transformer.`-prefixed keys. `adapter_name`: its name
        (default `default_{n}`); the other keyword arguments are `lora_state_dict`'s (and `low_cpu_mem_usage`).

        Example:

        ```python
        >>> pipe.load_lora_weights("you/tarflow-afhq-lora", adapter_name="afhq")
        ```
        """
        if hotswap:
            raise ValueError("hotswap is not supported: unload_lora_weights() or delete_adapters() first")
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not all("lora" in key for key in state_dict):
            raise ValueError("invalid LoRA checkpoint: every weight's name must contain 'lora'")
        self.load_lora_into_transformer(
            state_dict,
            transformer=getattr(self, self.transformer_name),
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        transformer: nn.Module,
        adapter_name: str | None = None,
        _pipeline: Any = None,
        low_cpu_mem_usage: bool = False,
        hotswap: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """The transformer's part of a LoRA state dict (keys under `transformer.`), loaded as a new adapter."""
        if hotswap:
            raise ValueError("hotswap is not supported: unload_lora_weights() or delete_adapters() first")
        weights = _component_part(state_dict, cls.transformer_name)
        if not weights:
            first = next(iter(state_dict), None)
            raise ValueError(
                f"the LoRA has no weights for the {cls.transformer_name} (keys '{cls.transformer_name}.<layer>"
                f".lora_A.weight', as diffusers saves them; the first key is {first!r})"
            )
        own_metadata = _component_part(metadata, cls.transformer_name) if metadata else None
        load_lora_adapter(transformer, weights, adapter_name, own_metadata, low_cpu_mem_usage)

    # ----------------------------------------------------------------------------------------------- saving
    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: Mapping[str, torch.Tensor] | nn.Module | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: Mapping[str, Any] | Any | None = None,
    ) -> None:
        r"""
        Write a LoRA file as diffusers does: `transformer_lora_layers` (PEFT's state dict of the adapter, as
        `peft.get_peft_model_state_dict(pipe.transformer, adapter_name=...)` gives it) under `transformer.` keys in
        `save_directory/pytorch_lora_weights.safetensors` (`.bin` without `safe_serialization`), with the adapter's
        `LoraConfig` (or its dict) as metadata. Only the main process writes; the file appears whole or not at all.
        `save_function(tensors, path)` replaces the writer (no metadata then).
        """
        if not transformer_lora_layers:
            raise ValueError("save_lora_weights needs transformer_lora_layers (the adapter's state dict)")
        if transformer_lora_adapter_metadata is not None and not safe_serialization:
            raise ValueError("transformer_lora_adapter_metadata needs safe_serialization (safetensors metadata)")
        if not is_main_process:
            return
        layers = transformer_lora_layers
        tensors = layers.state_dict() if isinstance(layers, nn.Module) else dict(layers)
        tensors = {f"{cls.transformer_name}.{key}": value for key, value in tensors.items()}
        metadata = None
        if transformer_lora_adapter_metadata is not None:
            own = config_metadata(transformer_lora_adapter_metadata)
            metadata = {f"{cls.transformer_name}.{key}": value for key, value in own.items()}
        name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
        if save_function is not None:
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            save_function(tensors, str(Path(save_directory, name)))
            return
        write_lora_file(Path(save_directory), name, tensors, metadata)

    def _refuse_lora_layers(self, action: str) -> None:
        names = loaded_adapters(getattr(self, self.transformer_name))
        if names:
            raise ValueError(
                f"cannot {action} a pipeline whose transformer holds LoRA adapters {names}: save_lora_weights saves "
                "an adapter; fuse_lora() then unload_lora_weights() gives a plain model to save"
            )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """As the pipeline's `save_pretrained`, refused while LoRA layers are loaded (they would be saved as part of
        the transformer's weights, which no loader reads back)."""
        self._refuse_lora_layers("save")
        super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        """As the pipeline's `push_to_hub`, refused while LoRA layers are loaded (see `save_pretrained`)."""
        self._refuse_lora_layers("upload")
        return super().push_to_hub(repo_id, *args, **kwargs)

    # ------------------------------------------------------------------------------------ using the adapters
    def _lora_layers(self, components: Sequence[str] | None = None) -> list[nn.Module]:
        for component in components or self._lora_loadable_modules:
            if component not in self._lora_loadable_modules:
                raise ValueError(f"{component!r} takes no LoRA; the components that do: {self._lora_loadable_modules}")
        return [layer for _, layer in tuner_layers(getattr(self, self.transformer_name))]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The loaded adapters, by component: `{"transformer": [...]}` (empty when none)."""
        names = loaded_adapters(getattr(self, self.transformer_name))
        return {self.transformer_name: names} if names else {}

    def get_active_adapters(self) -> list[str]:
        """The adapters the transformer runs (`[]` when none is loaded)."""
        return next((list(layer.active_adapters) for layer in self._lora_layers()), [])

    def set_adapters(
        self,
        adapter_names: str | list[str],
        adapter_weights: float | dict | list[float | dict | None] | None = None,
    ) -> None:
        r"""
        Run these adapters together, each scaled by its weight (1.0 by default; a `{"transformer": w}` dict as in
        diffusers).

        Example:

        ```python
        >>> pipe.set_adapters(["corgis", "ink"], adapter_weights=[1.0, 0.5])
        ```
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter weights")
        loaded = self.get_list_adapters().get(self.transformer_name, [])
        missing = [name for name in names if name not in loaded]
        if missing:
            raise ValueError(f"no adapter named {missing[0]!r}; loaded: {loaded}")
        weights = [w.get(self.transformer_name, 1.0) if isinstance(w, dict) else w for w in weights]
        weights = [1.0 if w is None else w for w in weights]
        for layer in self._lora_layers():
            layer.set_adapter(names)
            for name, weight in zip(names, weights, strict=True):
                layer.set_scale(name, weight)

    def disable_lora(self) -> None:
        """Sample with the base model, keeping the adapters loaded (`enable_lora` turns them back on)."""
        for layer in self._lora_layers():
            layer.enable_adapters(False)

    def enable_lora(self) -> None:
        """Turn the active adapters back on after `disable_lora`."""
        for layer in self._lora_layers():
            layer.enable_adapters(True)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove these adapters (their weights and configs)."""
        transformer = getattr(self, self.transformer_name)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if name not in loaded_adapters(transformer):
                raise ValueError(f"no adapter named {name!r}; loaded: {loaded_adapters(transformer)}")
            delete_lora_adapter(transformer, name)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the transformer is bit for bit what it was before `load_lora_weights` (with the
        fused adapters in its weights, if `fuse_lora` ran)."""
        remove_lora_layers(getattr(self, self.transformer_name))

    # -------------------------------------------------------------------------------------------- fusing
    def fuse_lora(
        self,
        components: Sequence[str] = (TRANSFORMER_NAME,),
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        r"""
        Add the active adapters (or `adapter_names`), times `lora_scale`, into the transformer's weights: sampling
        then costs what the base model costs, and gives the unfused samples to float rounding. `safe_fusing` checks
        the fused weights for NaNs first. `unfuse_lora` subtracts them again; `unload_lora_weights` keeps them.
        """
        layers = self._lora_layers(components)
        if not layers:
            raise ValueError("no LoRA to fuse: load_lora_weights first")
        for layer in layers:
            layer.scale_layer(lora_scale)
            layer.merge(safe_merge=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self, components: Sequence[str] = (TRANSFORMER_NAME,), **kwargs: Any) -> None:
        """Subtract the fused adapters from the transformer's weights again (to float rounding)."""
        for layer in self._lora_layers(components):
            if layer.merged:
                layer.unmerge()

    @property
    def fused_loras(self) -> set[str]:
        """The adapters fused into the transformer's weights."""
        return {name for layer in self._lora_layers() for name in layer.merged_adapters}

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)


__all__ = [
    "LORA_ADAPTER_METADATA_KEY",
    "LORA_WEIGHT_NAME",
    "LORA_WEIGHT_NAME_SAFE",
    "LoraMixin",
    "add_lora_adapter",
    "check_lora_weights",
    "config_metadata",
    "delete_lora_adapter",
    "is_lora_folder",
    "load_lora_adapter",
    "loaded_adapters",
    "lora_config",
    "read_lora_file",
    "remove_lora_layers",
    "tuner_layers",
]
