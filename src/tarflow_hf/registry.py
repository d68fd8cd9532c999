"""The family registry: the one place that knows each model family (TarFlow, STARFlow), its classes, what its model
cards say, and how to recognise its folders and Hub repositories.

Everything that must tell the families apart asks here: the pipelines' loading through `AutoFlowPipeline`, the
command line (`sample`, `train`, `evaluate`, `convert`), the model cards (`tarflow_hf.hub`) and the Space. Classes
are named, not imported, so that importing the registry stays cheap; `ModelFamily.pipeline_class` and friends
import them on first use.

```python
>>> from tarflow_hf import AutoFlowPipeline
>>> pipe = AutoFlowPipeline.from_pretrained("path/or/owner-name")  # a TarFlowPipeline or a StarFlowPipeline
```
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "tarflow_hf"
# A Hub repository id, `owner/name`: letters, digits, `_`, `-` and `.`, each part starting with a letter or digit.
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# The longest model name (path or Hub id) worth looking at: Hub ids are at most 96 characters.
MAX_NAME_LENGTH = 1024
# How Apple names its ml-tarflow checkpoints; the TarFlow converter reads the architecture and noise from it, and
# takes images to have 3 channels unless told otherwise.
APPLE_TARFLOW_FILE_NAME = "{dataset}_model_{patch}_{width}_{blocks}_{layers}_{noise_std|uniform}.pth"
APPLE_TARFLOW_CHANNELS = 3
# The components a STARFlow conversion puts around the transformer (Apple's choices).
STARFLOW_TEXT_ENCODER = "google/flan-t5-xl"
STARFLOW_VAE = "stabilityai/sd-vae-ft-ema"


@dataclass(frozen=True)
class WeightsLicense:
    """The license of a family's released weights, stated (with attribution) on the card of a model that holds
    them: the card's license metadata is `other` + `license_name` + `license_link`, as the Hub documents."""

    id: str  # how `model_card(license=...)` names it
    link: str
    note: str  # one sentence: who released the weights, for what, under what
    attribution: str = ""  # the notice the license requires on redistribution, verbatim
    text_name: str = "LICENSE"  # the license's file in the original repository

    def card_text(self, has_license_file: bool) -> str:
        """The card's license paragraph: the note, the attribution notice, and whether the folder carries the
        license's text as `LICENSE` (a warning when not: redistributing the weights requires a copy)."""
        attribution = f' Attribution notice: "{self.attribution}"' if self.attribution else ""
        if has_license_file:
            where = "`LICENSE` in this folder holds the license's text."
        else:
            where = (
                f"**Warning: this folder does not carry the license's text**, which must go with the weights whenever "
                f"they are shared: add {self.text_name} from [its source]({self.link}) as `LICENSE` (a conversion "
                f"does it with `tarflow-hf convert ... --license-file {self.text_name}`)."
            )
        terms = f"Use of these weights is subject to that license ([{self.id}]({self.link}))."
        return f"{self.note}{attribution}\n{terms} {where}"


@dataclass(frozen=True)
class ModelFamily:
    """One model family: its classes (module and class names in this package), what a model card says about it,
    and what `tarflow-hf` needs to know to drive it."""

    name: str  # "tarflow": also the config's `model_type`
    config_class_name: str
    model_class_name: str
    pipeline_class_name: str
    title: str
    paper: str
    citation: str
    tags: tuple[str, ...] = ()
    pipeline_tag: str = "unconditional-image-generation"
    summary: str = ""  # the card description's second part: what the pipeline does
    guidance: str = ""  # how `guidance_scale` maps onto the original code's flag
    weights_license: WeightsLicense | None = None  # the default license of the family's released models
    text_to_image: bool = False  # prompts in (STARFlow), rather than class labels (TarFlow)

    @property
    def model_type(self) -> str:
        return self.name

    @property
    def config_class(self) -> type:
        return _import(f"configuration_{self.name}", self.config_class_name)

    @property
    def model_class(self) -> type:
        return _import(f"modeling_{self.name}", self.model_class_name)

    @property
    def pipeline_class(self) -> type:
        return _import(f"pipeline_{self.name}", self.pipeline_class_name)


def _import(module: str, name: str) -> type:
    return getattr(importlib.import_module(f"{PACKAGE}.{module}"), name)


APPLE_AMLR = WeightsLicense(
    id="apple-amlr",
    link="https://github.com/apple/ml-starflow/blob/main/LICENSE_MODEL",
    note=(
        "Apple's STARFlow weights are released for research purposes only under the Apple Machine Learning Research "
        "Model License (LICENSE_MODEL in apple/ml-starflow)."
    ),
    attribution=(
        "Apple Machine Learning Research Model is licensed under the Apple Machine Learning Research Model License "
        "Agreement."
    ),
    text_name="LICENSE_MODEL",
)
TARFLOW = ModelFamily(
    name="tarflow",
    config_class_name="TarFlowConfig",
    model_class_name="TarFlowModel",
    pipeline_class_name="TarFlowPipeline",
    title="TarFlow",
    paper="https://arxiv.org/abs/2412.06329",
    citation="Shuangfei Zhai et al., *Normalizing Flows are Capable Generative Models*, 2024.",
    tags=("tarflow",),
    summary=(
        "Sampling runs the flow backwards; the same model gives exact log-likelihoods, an invertible encoder and, "
        "for\nclass-conditional models, a generative classifier."
    ),
    guidance=(
        "`guidance_scale` follows the diffusers convention (1.0 is no guidance, `w` gives "
        "`uncond + w * (cond - uncond)`);\nthe `--cfg g` of Apple's code is `guidance_scale = 1 + g`."
    ),
)
STARFLOW = ModelFamily(
    name="starflow",
    config_class_name="StarFlowConfig",
    model_class_name="StarFlowModel",
    pipeline_class_name="StarFlowPipeline",
    title="STARFlow",
    paper="https://arxiv.org/abs/2506.06276",
    citation=(
        "Jiatao Gu et al., *STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis*, 2025."
    ),
    tags=("starflow",),
    pipeline_tag="text-to-image",
    summary=(
        "A flow over the latents of a VAE, conditioned on T5 text embeddings: sampling runs it backwards and the "
        "VAE decodes;\nthe same model gives the exact log-likelihood of an image's latent under a caption and "
        "zero-shot captioning\nby Bayes' rule over candidate captions."
    ),
    guidance=(
        "`guidance_scale` follows the diffusers convention (1.0 is no guidance; `w` gives the deep block's "
        "`p_cond^w / p_uncond^(w - 1)`,\nSTARFlow's rule); the `--cfg g` of Apple's code is "
        "`guidance_scale = 1 + g`."
    ),
    weights_license=APPLE_AMLR,
    text_to_image=True,
)
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (TARFLOW, STARFLOW)}


# ------------------------------------------------------------------------------------------------- lookups
def family_by_model_type(model_type: Any) -> ModelFamily | None:
    """The family whose config has `model_type`, or None."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def family_by_pipeline_class(class_name: Any) -> ModelFamily | None:
    """The family of a `model_index.json` `_class_name`: `"TarFlowPipeline"` (a folder for the installed package)
    or `["pipeline_tarflow", "TarFlowPipeline"]` (a folder with its own code); None for anything else."""
    if isinstance(class_name, list) and class_name:
        class_name = class_name[-1]
    return next((family for family in FAMILIES.values() if family.pipeline_class_name == class_name), None)


def family_of_model(model: Any) -> ModelFamily | None:
    """The family of a model (or a pipeline, through its transformer), by its config's `model_type`."""
    model = getattr(model, "transformer", model)
    return family_by_model_type(getattr(getattr(model, "config", None), "model_type", None))


# ------------------------------------------------------------------------------------------------- folders
def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; a clear `ValueError` naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (expected JSON)") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}); restore or re-save it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def family_of_folder(folder: str | os.PathLike) -> ModelFamily:
    """The family of a saved folder, read from its files without loading anything: a pipeline folder by its
    `model_index.json`, a model folder by its `config.json` (or `transformer/config.json`). Raises `ValueError`
    (naming the file) for a folder of neither family, or for an index or config that is not valid JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    index = folder / "model_index.json"
    if index.is_file():
        class_name = read_json_object(index).get("_class_name")
        family = family_by_pipeline_class(class_name)
        if family is None:
            raise ValueError(f"{index} names the pipeline {class_name!r}, not a TarFlow or STARFlow pipeline")
        return family
    for config_file in (folder / "config.json", folder / "transformer" / "config.json"):
        if config_file.is_file():
            model_type = read_json_object(config_file).get("model_type")
            family = family_by_model_type(model_type)
            if family is None:
                raise ValueError(f"{config_file} is a {model_type!r} model, not a TarFlow or STARFlow one")
            return family
    raise ValueError(
        f"{folder} is not a TarFlow or STARFlow folder (no model_index.json, config.json or transformer/config.json)"
    )


def check_pipeline_folder(folder: str | os.PathLike) -> ModelFamily:
    """Before anything loads: a local pipeline folder's index, component folders, configs and weight files are
    readable, so that a damaged folder is one line naming the file (not a traceback after minutes of loading).
    Weight files are checked by their headers only (cheap, even for a 15 GB file). Returns the folder's family."""
    folder = Path(folder)
    family = family_of_folder(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return family  # a model folder: transformers reads it
    for name, entry in read_json_object(index).items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        component = folder / name
        if not component.is_dir():
            raise FileNotFoundError(
                f"{component} is missing: model_index.json names a {entry[1]} there; the folder is incomplete "
                "(save or download it again)"
            )
        for config_file in sorted(component.glob("*config*.json")):
            read_json_object(config_file)
        for weights in sorted(component.glob("*.safetensors")):
            _check_safetensors_header(weights)
    if not (folder / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'transformer' / 'config.json'} is missing: the folder has no model to load")
    _check_vae_config(folder / "vae" / "config.json")
    return family


def _check_safetensors_header(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{path} is not a readable safetensors file ({why}): truncated or damaged; save or download it again"
        ) from None


def _check_vae_config(path: Path) -> None:
    """The VAE's sizes a pipeline reads before diffusers does (its scale factor is 2 ** (len - 1))."""
    if not path.is_file():
        return
    channels = read_json_object(path).get("block_out_channels")
    if not (
        isinstance(channels, list)
        and channels
        and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
    ):
        raise ValueError(f"{path}: block_out_channels must be a non-empty list of positive integers, got {channels!r}")


def is_flow_folder(folder: str | os.PathLike) -> bool:
    """True for a folder tarflow-hf wrote (a pipeline folder, a model folder, or a `--transformer-only` output):
    what `--overwrite` may replace, never another program's or the user's folder."""
    try:
        family_of_folder(folder)
    except (OSError, ValueError):
        return False
    return True


def looks_like_hub_repo_id(text: str) -> bool:
    """`text` is a valid Hub repository id with an owner (`owner/name`, as `huggingface_hub` validates them: at most
    96 characters, no `--` or `..`); decided from the text alone, never from the file system."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if HUB_REPO_ID.match(text) is None:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def is_hub_repo_id(name: Any) -> bool:
    """`name` looks like a Hub repository id (`owner/name`) and is not an existing local path."""
    text = str(name) if name else ""
    return looks_like_hub_repo_id(text) and not Path(text).exists()


def family_of_hub_repo(repo_id: str, revision: str | None = None) -> ModelFamily:
    """The family of a Hub repository, from its `model_index.json` (the local cache first; `HF_HUB_OFFLINE=1`
    reads the cache only). Raises `OSError` when it cannot be fetched and `ValueError` for another family."""
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(repo_id, "model_index.json", revision=revision)
    except Exception as error:  # the Hub client's many errors: not found, offline, gated, ...
        raise OSError(
            f"cannot read model_index.json of the Hub repository {repo_id!r} ({type(error).__name__})"
        ) from None
    return family_of_folder(Path(index).parent)


def resolve_model_name(name: str | os.PathLike) -> str:
    """What a model name designates: `"bundled"` is the package's MNIST model, an existing folder is itself, anything
    else must be a Hub repo id. A mistake is one `FileNotFoundError` / `ValueError` line."""
    text = os.fspath(name) if name is not None else ""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no model given: a pipeline folder, a Hub repo id (owner/name) or 'bundled'")
    if len(text) > MAX_NAME_LENGTH:
        raise ValueError(f"model name of {len(text)} characters: a folder path or Hub id is at most {MAX_NAME_LENGTH}")
    if text == "bundled":
        from . import BUNDLED_MODEL

        if not Path(BUNDLED_MODEL).is_dir():
            raise FileNotFoundError(f"the bundled model is missing from this installation ({BUNDLED_MODEL})")
        return BUNDLED_MODEL
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{text!r} is a file; a model is a pipeline folder, a Hub repo id (owner/name) or 'bundled'")
    if not is_hub_repo_id(text):
        raise FileNotFoundError(
            f"{text!r} is neither an existing folder nor a Hub repo id (owner/name); 'bundled' is the MNIST model "
            "shipped with tarflow-hf"
        )
    return text


def family_of(name: str | os.PathLike, revision: str | None = None) -> ModelFamily:
    """The family of a model name (see `resolve_model_name`): a folder's files, or a Hub repository's index."""
    resolved = resolve_model_name(name)
    if Path(resolved).is_dir():
        return family_of_folder(resolved)
    return family_of_hub_repo(resolved, revision)


@contextlib.contextmanager
def loading_progress_bars(enabled: bool) -> Iterator[None]:
    """The loading bars of diffusers and transformers on or off while loading, restored afterwards (they are
    process-wide settings)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.enable_progress_bar() if enabled else library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, before, strict=True):
            library.enable_progress_bar() if was_enabled else library.disable_progress_bar()


# ---------------------------------------------------------------------------------------------- auto class
class AutoFlowPipeline:
    r"""
    Loads the right pipeline of the family a folder or Hub repository holds, as diffusers' `AutoPipeline` classes
    do: a `TarFlowPipeline` or a `StarFlowPipeline`. Not instantiable; use `from_pretrained`.

    Example:

    ```python
    >>> from tarflow_hf import AutoFlowPipeline
    >>> pipe = AutoFlowPipeline.from_pretrained("bundled")  # the MNIST TarFlow shipped with the package
    >>> type(pipe).__name__
    'TarFlowPipeline'
    ```
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is not instantiable; use {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """The pipeline of `pretrained_model_name_or_path` (a folder, a Hub id, or `"bundled"`), loaded with its
        family's `from_pretrained(path, **kwargs)`; the family is read from the folder's or repository's
        `model_index.json` before anything is loaded."""
        resolved = resolve_model_name(pretrained_model_name_or_path)
        family = family_of(resolved, kwargs.get("revision"))
        return family.pipeline_class.from_pretrained(resolved, **kwargs)  # which checks a folder first


__all__ = [
    "APPLE_AMLR",
    "APPLE_TARFLOW_CHANNELS",
    "APPLE_TARFLOW_FILE_NAME",
    "FAMILIES",
    "STARFLOW",
    "STARFLOW_TEXT_ENCODER",
    "STARFLOW_VAE",
    "TARFLOW",
    "AutoFlowPipeline",
    "ModelFamily",
    "WeightsLicense",
    "check_pipeline_folder",
    "family_by_model_type",
    "family_by_pipeline_class",
    "family_of",
    "family_of_folder",
    "family_of_hub_repo",
    "family_of_model",
    "is_flow_folder",
    "is_hub_repo_id",
    "loading_progress_bars",
    "read_json_object",
    "resolve_model_name",
]
