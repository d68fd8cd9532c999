"""Which models the Space may load, how, and what it keeps in memory.

The operator chooses the served model (`TARFLOW_MODEL`, a folder or a Hub id); visitors may load others only where
the operator allows it (`ModelCatalog`): Hub ids, and pipeline folders under the operator's model root. Which
family a folder or repository holds is asked of `tarflow_hf.registry` before anything is loaded, so a model of the
other family is refused without loading it. `ModelStore` keeps the served model for good and a few visitors'
models besides, loading each once even when several visitors ask at the same moment.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tarflow_hf import registry
from tarflow_hf.labels import id_from_text, menu_names
from tarflow_hf.registry import MAX_NAME_LENGTH, ModelFamily

from .limits import env_choice, env_flag, env_int

logger = logging.getLogger("tarflow_space")

# Files fetched for a Hub model: configs, weights and tokenizers; never code or pickles.
HUB_FILES = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNCONDITIONAL_CHOICE = "(no class: unconditional branch)"


# ------------------------------------------------------------------------------------------------ serving
@dataclass(frozen=True)
class ServingOptions:
    """Where and how models run (operator settings): the device, the weights' dtype, and whether the pipeline's
    components wait on the CPU and move to the device only while they run (`enable_model_cpu_offload`)."""

    device: str
    dtype: torch.dtype
    offload: bool = False

    @classmethod
    def from_env(cls) -> ServingOptions:
        device = os.environ.get("TARFLOW_DEVICE", "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[env_choice("TARFLOW_DTYPE", "float32", tuple(DTYPES))]
        return cls(device, dtype, env_flag("TARFLOW_OFFLOAD", False))

    def place(self, pipe: Any) -> Any:
        """`pipe` on the device, or offloaded to it."""
        if self.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe


# ---------------------------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class ModelRef:
    """A model the server may load: `location` is a local folder (absolute, server side only) or a Hub id, `name`
    what visitors see (a Hub id, a folder's name or its path under the model root: never an absolute path)."""

    source: str  # "local" or "hub"
    location: str
    name: str


def is_hub_id(text: str) -> bool:
    """`owner/name` as the Hub validates repository ids (no `..`, so never a path on the server)."""
    return registry.looks_like_hub_repo_id(text)


def operator_model(model: str) -> ModelRef:
    """The operator's choice (command line, $TARFLOW_MODEL, `build_demo(model)`): "bundled", a local pipeline
    folder or a Hub id. Visitors never reach this function."""
    resolved = registry.resolve_model_name(model)
    path = Path(resolved)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model!r} is not a pipeline folder (it has no model_index.json)")
        return ModelRef("local", str(path.resolve()), path.resolve().name)
    return ModelRef("hub", resolved, resolved)


class ModelCatalog:
    """What a visitor may load with the "Model" field: nothing unless the operator allows it; then Hub ids and the
    pipeline folders under the operator's model root. Refusals say the same thing whether or not a path exists."""

    def __init__(self, startup: ModelRef, allow_change: bool, root: str | None) -> None:
        self.startup = startup
        self.allow_change = allow_change
        self.root = Path(root).expanduser().resolve() if root else None
        if self.root is not None and not self.root.is_dir():
            raise SystemExit(f"TARFLOW_MODEL_ROOT={root!r} is not a folder")

    def refusal(self) -> str:
        where = " or the name of a model folder offered by this server" if self.root is not None else ""
        return f"not a model this server offers: type a Hub id such as `owner/name`{where}"

    def resolve(self, text: Any) -> ModelRef:
        if not self.allow_change:
            raise ValueError("this server serves one model: loading another is turned off")
        text = str(text or "").strip()
        if not text:
            raise ValueError("no model given: type a Hub id such as `owner/name`")
        if len(text) > MAX_NAME_LENGTH:
            raise ValueError(f"a model name is at most {MAX_NAME_LENGTH} characters, got {len(text):,}")
        if text == self.startup.name:
            return self.startup
        offered = self._offered_folder(text)
        if offered is not None:
            return offered
        if is_hub_id(text):
            return ModelRef("hub", text, text)
        raise ValueError(self.refusal())

    def _offered_folder(self, text: str) -> ModelRef | None:
        """A pipeline folder under the root named by `text`: symbolic links are followed, then checked."""
        if self.root is None or Path(text).is_absolute() or text.startswith("~"):
            return None
        try:
            candidate = (self.root / text).resolve()
            if not candidate.is_relative_to(self.root) or not (candidate / "model_index.json").is_file():
                return None
        except OSError:  # a name too long for the file system, a loop of links, ...
            return None
        return ModelRef("local", str(candidate), candidate.relative_to(self.root).as_posix())


# ---------------------------------------------------------------------------------------------- loading
def load_failure(ref: ModelRef) -> ValueError:
    """What a visitor is told when `ref` cannot be loaded (the details, which may hold server paths, are logged)."""
    where = "from the Hub (no such repository, no connection, or " if ref.source == "hub" else "("
    return ValueError(f"could not load {ref.name!r} {where}not a TarFlow or STARFlow pipeline)")


def family_of_ref(ref: ModelRef) -> ModelFamily:
    """The family of `ref`, read from its model_index.json (a Hub repository's alone is fetched), nothing loaded."""
    try:
        if ref.source == "local":
            return registry.family_of_folder(ref.location)
        return registry.family_of_hub_repo(ref.location)
    except (OSError, ValueError) as error:
        logger.warning("could not read the family of %s (%s): %s", ref.name, ref.source, error)
        raise load_failure(ref) from None


def require_family(ref: ModelRef, family: ModelFamily, expected: ModelFamily | None) -> None:
    if expected is not None and family is not expected:
        raise ValueError(f"{ref.name!r} is a {family.title} model; this page serves {expected.title} models")


def fetch_from_hub(repo_id: str) -> str:
    """A Hub repository -> a local folder in the Hub cache (configs, safetensors weights, tokenizer files only)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=HUB_FILES)


class ModelStore:
    """The pipelines in memory: the served one for good, and the `keep` most recently used visitors' models.
    Safe to use from the queue's worker threads; each model is loaded once, outside the store's lock, so a slow
    download never blocks visitors using models already loaded."""

    def __init__(self, startup: ModelRef, options: ServingOptions, keep: int | None = None) -> None:
        self.startup = startup
        self.options = options
        self.keep = env_int("TARFLOW_MAX_LOADED_MODELS", 1, minimum=0) if keep is None else keep
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._served: Any = None
        self._others: OrderedDict[str, Any] = OrderedDict()

    def loaded(self, ref: ModelRef) -> Any | None:
        """The pipeline of `ref` if it is in memory (nothing is loaded)."""
        with self._lock:
            if ref.location == self.startup.location:
                return self._served
            if ref.location in self._others:
                self._others.move_to_end(ref.location)
            return self._others.get(ref.location)

    def family(self, ref: ModelRef) -> ModelFamily:
        """The family of `ref`: a loaded pipeline's, else read from its model_index.json (nothing loaded)."""
        pipe = self.loaded(ref)
        return registry.family_of_model(pipe) if pipe is not None else family_of_ref(ref)

    def load(self, ref: ModelRef, expected: ModelFamily | None = None) -> Any:
        """The pipeline of `ref`, loaded once; `ValueError` (before loading anything) for a model of another
        family than `expected`."""
        family = self.family(ref)
        require_family(ref, family, expected)
        pipe = self.loaded(ref)
        if pipe is not None:
            return pipe
        with self._lock:
            loading = self._loading.setdefault(ref.location, threading.Lock())
        with loading:  # a second visitor asking for the same model waits for the first one's load
            pipe = self.loaded(ref)
            if pipe is None:
                pipe = self._read(ref, family)
                self._remember(ref, pipe)
        return pipe

    def _read(self, ref: ModelRef, family: ModelFamily) -> Any:
        start = time.perf_counter()
        try:
            folder = fetch_from_hub(ref.location) if ref.source == "hub" else ref.location
            pipe = family.pipeline_class.from_pretrained(folder, dtype=self.options.dtype)
            self.options.place(pipe)
        except Exception as error:
            logger.warning("could not load %s (%s): %s", ref.name, ref.source, error)
            raise load_failure(ref) from None
        where = "offloaded to " if self.options.offload else ""
        logger.info(
            "loaded model %s (%s) %son %s in %.1f s",
            ref.name,
            family.name,
            where,
            self.options.device,
            time.perf_counter() - start,
        )
        return pipe

    def _remember(self, ref: ModelRef, pipe: Any) -> None:
        with self._lock:
            if ref.location == self.startup.location:
                self._served = pipe
                return
            self._others[ref.location] = pipe
            while len(self._others) > self.keep:
                self._others.popitem(last=False)


# ---------------------------------------------------------------------------------------------- describing
def describe(pipe: Any, name: str) -> str:
    """One line about the model, naming it as visitors see it (`ModelRef.name`)."""
    config = pipe.transformer.config
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    size = f"{parameters / 1e6:.1f}M" if parameters >= 100_000 else f"{parameters:,}"
    where = pipe.transformer.dtype.__repr__().removeprefix("torch.") + " on " + str(pipe._execution_device.type)
    if registry.family_of_model(pipe).text_to_image:
        side = config.sample_size * pipe.vae_scale_factor
        return (
            f"**Model** `{name}`: STARFlow text to image, {side}x{side} images from {config.in_channels}x"
            f"{config.sample_size}x{config.sample_size} VAE latents, {config.num_blocks} flow blocks, {size} "
            f"parameters, {where}."
        )
    classes = f"{config.num_classes} classes" if config.num_classes else "unconditional"
    return (
        f"**Model** `{name}`: {config.image_size}x{config.image_size}x{config.num_channels}, "
        f"{classes}, {config.num_blocks} flow blocks, {size} parameters, {where}."
    )


def class_options(pipe: Any) -> list[str]:
    """The class picker's entries: class names (with the id added to the few names that occur twice, as
    tarflow_hf.labels writes them), then the unconditional branch."""
    if not pipe.transformer.config.num_classes:
        return [UNCONDITIONAL_CHOICE]
    return [*menu_names(pipe.id2label), UNCONDITIONAL_CHOICE]


def parse_class(pipe: Any, choice: Any) -> int | None:
    """A class picked or typed in the page -> a class id, or None for the unconditional branch (and for
    unconditional models, which take no class). Unknown names raise with the closest known names."""
    if not pipe.transformer.config.num_classes:
        return None
    if choice is None or not str(choice).strip():
        raise ValueError("pick a class (or the unconditional branch)")
    if " ".join(str(choice).split()) == UNCONDITIONAL_CHOICE:
        return None
    return id_from_text(pipe.id2label, str(choice))
