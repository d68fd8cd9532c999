"""Apple's `.pth` checkpoints straight into a pipeline or a model, as diffusers' `from_single_file` loads original
checkpoints, with no `tarflow-hf convert` step in between:

```python
>>> pipe = TarFlowPipeline.from_single_file("afhq_model_8_768_8_8_0.07.pth", dtype=torch.bfloat16)
>>> pipe = StarFlowPipeline.from_single_file("starflow_3B_t2i_256x256.pth", config="starflow_3B_t2i_256x256.yaml")
>>> model = TarFlowModel.from_single_file("my_run.pth", noise_std=0.05)
```

The converters do the reading (`tarflow_hf.convert.load_ml_tarflow_checkpoint`,
`tarflow_hf.convert_starflow.load_ml_starflow_checkpoint`), so everything a conversion checks is checked (Apple's keys
and shapes, NaN or infinite weights, truncated or unsafe files, the yaml against the weights), and the result holds
the very tensors that `tarflow-hf convert` followed by `from_pretrained` gives (tests/test_single_file.py).

Memory: the file is memory-mapped (`torch.load(weights_only=True, mmap=True)`) and the model, built on the meta
device, takes its tensors as they are. In the file's dtype the weights stay in the mapping (no copy at all; keep the
file where it is while the model is in use); another `dtype` is applied parameter by parameter (`Module.to`), so
the only copy made is the model's own, one tensor at a time, never a float32 copy of the whole state.

The classes reach this module by name (`importlib`), never by a relative import: a saved folder carries the classes'
code and the modules it imports relatively, and this one needs the installed package (the converters).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .apple_checkpoints import check_input_file, source_family
from .configuration_tarflow import TarFlowConfig
from .convert import load_ml_tarflow_checkpoint
from .convert_starflow import _component_name, apple_settings, load_ml_starflow_checkpoint
from .registry import (
    STARFLOW,
    STARFLOW_TEXT_ENCODER,
    STARFLOW_VAE,
    TARFLOW,
    ModelFamily,
    family_by_model_type,
    family_by_pipeline_class,
)
from .samplers import get_sampler

# What each family's converter takes besides the file (TarFlow: a config, or what infers one; STARFlow: Apple's yaml).
CONVERTER_OPTIONS = {TARFLOW.name: ("config", "num_channels", "noise_std", "labels"), STARFLOW.name: ("config",)}
# STARFlow's components around the transformer, and the Hub download options for those given by Hub id.
STARFLOW_COMPONENTS = ("text_encoder", "tokenizer", "vae")
COMPONENT_TITLES = {"text_encoder": "text encoder", "tokenizer": "tokenizer", "vae": "VAE"}
HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token")
PLACEMENT_OPTIONS = ("dtype", "torch_dtype", "device", "device_map")


# ---------------------------------------------------------------------------------------------------- models
def load_model(model_class: type, checkpoint: str | os.PathLike, **options: Any) -> Any:
    r"""
    An Apple `.pth` as a `TarFlowModel` / `StarFlowModel` (what `model_class.from_single_file` calls): the model
    `from_pretrained` gives for the folder `tarflow-hf convert` writes, tensor for tensor.

    Args:
        checkpoint (`str` or `os.PathLike`): Apple's `.pth` file.
        config: TarFlow: a `TarFlowConfig` (else inferred from the weights and the file name); STARFlow: Apple's
            yaml, a path or an already parsed dict (else the released 3B yaml's values, with a warning).
        num_channels, noise_std, labels: TarFlow only, what the weights and the file name cannot tell (as
            `tarflow_hf.convert.infer_config` takes them).
        dtype (`torch.dtype` or `"auto"`, also `torch_dtype`): `"auto"` (the default, as in transformers'
            `from_pretrained`) keeps the file's dtype, with the weights left in the file's memory map.
        device / device_map (`str` or `torch.device`): the one device to put the model on.

    Raises:
        `FileNotFoundError`, `ValueError`: one line naming the bad file, value or option.
    """
    family = _family(family_by_model_type(getattr(model_class.config_class, "model_type", None)), model_class)
    dtype = _checked_dtype(_pop_dtype(options), allow_auto=True)
    device = _pop_device(options)
    converter_options = _pop(options, CONVERTER_OPTIONS[family.name])
    _refuse_unknown(options, model_class, (*CONVERTER_OPTIONS[family.name], *PLACEMENT_OPTIONS))
    model = _load_transformer(family, checkpoint, converter_options, "model_class_name")
    return _placed(model, "auto" if dtype is None else dtype, device)


# ------------------------------------------------------------------------------------------------- pipelines
def load_pipeline(pipeline_class: type, checkpoint: str | os.PathLike, **options: Any) -> Any:
    r"""
    An Apple `.pth` as a `TarFlowPipeline` / `StarFlowPipeline` (what `pipeline_class.from_single_file` calls): the
    pipeline `from_pretrained` gives for the folder `tarflow-hf convert` writes, tensor for tensor.

    Args:
        checkpoint (`str` or `os.PathLike`): Apple's `.pth` file.
        config, num_channels, noise_std, labels: as for `load_model`.
        text_encoder, tokenizer, vae: STARFlow only. A Hub id or a folder, loaded as `tarflow-hf convert
            --text-encoder/--vae` loads it (default: what the yaml names, `text` and `vae`, else Apple's released
            `google/flan-t5-xl` and `stabilityai/sd-vae-ft-ema`; the tokenizer comes from the text encoder's
            folder or id), or an already loaded object, used as it is (diffusers' convention: neither cast nor
            copied). `cache_dir`, `force_download`, `proxies`, `local_files_only`, `token` go to those loads.
        sampler (a `FlowSampler` or a name such as `"jacobi:tolerance=1e-3"`): the pipeline's sampler component.
        dtype (`torch.dtype`, or a dict by component name with a `"default"`; also `torch_dtype`): as diffusers'
            `from_pretrained`: the transformer in float32 unless told otherwise, the components loaded here in
            `dtype` (their own default when not given).
        device / device_map (`str` or `torch.device`): move the whole pipeline there once loaded.

    Raises:
        `FileNotFoundError`, `ValueError`: one line naming the bad file, value or option.
    """
    family = _family(_pipeline_family(pipeline_class), pipeline_class)
    dtype = _pop_dtype(options)
    dtype = (
        {key: _checked_dtype(value) for key, value in dtype.items()}
        if isinstance(dtype, Mapping)
        else _checked_dtype(dtype)
    )
    device = _pop_device(options)
    sampler = options.pop("sampler", None)
    sampler = None if sampler is None else get_sampler(sampler)
    converter_options = _pop(options, CONVERTER_OPTIONS[family.name])
    starflow = family is STARFLOW
    given = _pop(options, STARFLOW_COMPONENTS) if starflow else {}
    hub_options = _pop(options, HUB_OPTIONS) if starflow else {}
    accepted = (*CONVERTER_OPTIONS[family.name], "sampler", *PLACEMENT_OPTIONS)
    _refuse_unknown(options, pipeline_class, accepted + (STARFLOW_COMPONENTS + HUB_OPTIONS if starflow else ()))
    _check_component_types(given)

    model = _load_transformer(family, checkpoint, converter_options, "pipeline_class_name")
    transformer = _placed(model, _component_dtype(dtype, "transformer") or torch.float32, None)
    components = {}
    if starflow:
        components = starflow_components(converter_options.get("config"), given, dtype, hub_options)
    pipeline = pipeline_class(transformer=transformer, sampler=sampler, **components)
    pipeline.register_to_config(_name_or_path=os.fspath(checkpoint))
    return pipeline if device is None else pipeline.to(device)


def starflow_components(
    config_yaml: str | os.PathLike | Mapping[str, Any] | None,
    given: Mapping[str, Any],
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    hub_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The text encoder, tokenizer and VAE around a STARFlow transformer: each `given` object as it is, each other
    one loaded in `dtype` from its name (a Hub id or a folder; `component_names`)."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    options = dict(hub_options or {})
    loaders = {
        "text_encoder": partial(T5EncoderModel.from_pretrained, **options, **_dtype_option(dtype, "text_encoder")),
        "tokenizer": partial(AutoTokenizer.from_pretrained, **options),
        "vae": partial(AutoencoderKL.from_pretrained, **options, **_dtype_option(dtype, "vae")),
    }
    names = component_names(config_yaml, given)
    return {
        component: given[component]
        if _is_object(given.get(component))
        else _load_named(component, load, *names[component])
        for component, load in loaders.items()
    }


def component_names(
    config_yaml: str | os.PathLike | Mapping[str, Any] | None, given: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """Each STARFlow component's name and where it comes from, as the converter names them
    (`tarflow_hf.convert_starflow`): the name given, else the yaml's `text` / `vae`, else Apple's released choices;
    the tokenizer's is the text encoder's (a loaded text encoder's own `name_or_path` when it has one) unless given."""
    settings = apple_settings(config_yaml)
    text_encoder = given.get("text_encoder")
    text_given = _name(text_encoder) or getattr(text_encoder, "name_or_path", None) or None
    text = _component_name(text_given, settings, "text", STARFLOW_TEXT_ENCODER)
    tokenizer = _name(given.get("tokenizer"))
    return {
        "text_encoder": text,
        "tokenizer": (tokenizer, "") if tokenizer else text,
        "vae": _component_name(_name(given.get("vae")), settings, "vae", STARFLOW_VAE),
    }


def _load_named(component: str, load: Callable[[str], Any], name: str, origin: str) -> Any:
    """`load(name)`; a failure is one line naming the component, where its name came from, and what to pass."""
    try:
        return load(name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not load the {COMPONENT_TITLES[component]} {name!r}{origin} ({first_line}); pass {component}= "
            "a local folder, a Hub id, or an already loaded object"
        ) from None


def _check_component_types(given: Mapping[str, Any]) -> None:
    """STARFlow's components: a name (Hub id or folder), or an object of the kind the pipeline takes."""
    from transformers import PreTrainedTokenizerBase

    kinds = {"text_encoder": torch.nn.Module, "tokenizer": PreTrainedTokenizerBase, "vae": torch.nn.Module}
    for component, value in given.items():
        if _is_object(value) and not isinstance(value, kinds[component]):
            raise ValueError(
                f"{component} must be a Hub id, a folder or a loaded {kinds[component].__name__}, got "
                f"{type(value).__name__}"
            )


# -------------------------------------------------------------------------------------------------- shared
def _family(family: ModelFamily | None, owner: type) -> ModelFamily:
    if family is None:
        raise ValueError(f"{owner.__name__} is not a TarFlow or STARFlow class; from_single_file cannot load it")
    return family


def _pipeline_family(pipeline_class: type) -> ModelFamily | None:
    """The family of a pipeline class or of the first of its bases the registry knows (a subclass, say)."""
    return next(filter(None, (family_by_pipeline_class(base.__name__) for base in pipeline_class.__mro__)), None)


def _check_checkpoint(checkpoint: str | os.PathLike, family: ModelFamily, role: str) -> Path:
    """`checkpoint` is a readable Apple `.pth` of `family`, loading into `family`'s `role` class
    (`"model_class_name"` or `"pipeline_class_name"`); a missing, truncated, unsafe or other family's file is one
    line."""
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; from_single_file takes Apple's .pth file (a converted or saved folder loads with "
            f"{getattr(family, role)}.from_pretrained)"
        )
    found = source_family(check_input_file(path, "checkpoint"))
    if found is not family:
        raise ValueError(
            f"{path} is an apple/ml-{found.name} ({found.title}) checkpoint, not a {family.title} one; load it with "
            f"{getattr(found, role)}.from_single_file"
        )
    return path


def _load_transformer(family: ModelFamily, checkpoint: str | os.PathLike, options: dict[str, Any], role: str) -> Any:
    """The family's converter on the checked file (see `_check_checkpoint`): a model on its memory-mapped tensors."""
    path = _check_checkpoint(checkpoint, family, role)
    config = options.get("config")
    if family is TARFLOW and config is not None and not isinstance(config, TarFlowConfig):
        raise ValueError(f"config must be a TarFlowConfig (or left out, to read it off the weights), got {config!r}")
    if family is TARFLOW:
        model = load_ml_tarflow_checkpoint(path, **options)
    else:
        model = load_ml_starflow_checkpoint(path, options.get("config"))
    model.config._name_or_path = os.fspath(checkpoint)
    return model


def _placed(model: Any, dtype: torch.dtype | str, device: torch.device | None) -> Any:
    """`model` in `dtype` ("auto": as the file holds it) on `device`, by `Module.to`: parameter by parameter, each
    cast or moved tensor replacing its memory-mapped original, so no second copy of the whole state ever exists.
    The config records the dtype, as `from_pretrained` does."""
    target = None if dtype == "auto" else dtype
    if (target is not None and target != model.dtype) or device is not None:
        model.to(device=device, dtype=target)
    model.config.dtype = model.dtype
    return model


def _pop(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: options.pop(name) for name in names if name in options}


def _pop_dtype(options: dict[str, Any]) -> Any:
    given = _pop(options, ("dtype", "torch_dtype"))
    if len(given) > 1:
        raise ValueError("pass dtype or torch_dtype, not both (torch_dtype is its older name)")
    return next(iter(given.values()), None)


def _checked_dtype(value: Any, allow_auto: bool = False) -> torch.dtype | str | None:
    """A floating-point torch dtype (or its name, `"bfloat16"`), `None`, or with `allow_auto` `"auto"`."""
    if value is None or (allow_auto and value == "auto"):
        return value
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        allowed = "a floating-point torch dtype (torch.float32, torch.bfloat16, torch.float16)"
        raise ValueError(f"dtype must be {allowed}{' or auto' if allow_auto else ''}, got {value!r}")
    return dtype


def _component_dtype(dtype: torch.dtype | Mapping[str, torch.dtype] | None, component: str) -> torch.dtype | None:
    """A component's dtype: diffusers' rule for a dict (its entry, else `"default"`, else float32)."""
    if isinstance(dtype, Mapping):
        return dtype.get(component, dtype.get("default", torch.float32))
    return dtype


def _dtype_option(dtype: torch.dtype | Mapping[str, torch.dtype] | None, component: str) -> dict[str, torch.dtype]:
    component_dtype = _component_dtype(dtype, component)
    return {} if component_dtype is None else {"dtype": component_dtype}


def _pop_device(options: dict[str, Any]) -> torch.device | None:
    given = _pop(options, ("device", "device_map"))
    if len(given) > 1:
        raise ValueError("pass device or device_map, not both")
    if not given:
        return None
    ((name, value),) = given.items()
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{name} must name one device ('cpu', 'cuda', 'cuda:1', a torch.device), got {value!r}; from_single_file "
            "does not spread a model over several devices"
        ) from None


def _is_object(value: Any) -> bool:
    """A component given as an object (not as a name, nor left out)."""
    return value is not None and _name(value) is None


def _name(value: Any) -> str | None:
    """A component given by name (a Hub id or a folder) as a string; None for an object or nothing."""
    return os.fspath(value) if isinstance(value, str | os.PathLike) else None


def _refuse_unknown(options: Mapping[str, Any], owner: type, accepted: tuple[str, ...]) -> None:
    if options:
        raise ValueError(
            f"{owner.__name__}.from_single_file got unexpected arguments {sorted(options)}; it takes "
            f"{', '.join(sorted(accepted))}"
        )


__all__ = [
    "CONVERTER_OPTIONS",
    "HUB_OPTIONS",
    "STARFLOW_COMPONENTS",
    "load_model",
    "load_pipeline",
    "starflow_components",
]
