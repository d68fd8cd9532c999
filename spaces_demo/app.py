"""TarFlow demo (a Gradio app, also a Hugging Face Space).

Three things a normalizing flow can show: it samples images (block by block, with classifier-free guidance), it
gives the exact likelihood of any image (bits per dimension, and class probabilities by Bayes' rule), and it maps
images to latents and back without loss (so latent interpolation is exact at the ends).

    python spaces_demo/app.py                              # the MNIST model bundled with tarflow-hf
    TARFLOW_MODEL=path/or/hub-id python spaces_demo/app.py  # any TarFlow pipeline folder or Hub repository

Settings (environment variables, all optional):

- `TARFLOW_MODEL`: the model loaded at start (default: `tarflow_hf.BUNDLED_MODEL`).
- `TARFLOW_ALLOW_MODEL_CHANGE`: `1` lets visitors load another model (default `0`: no field, and no handler on the
  server); then only Hub ids and pipeline folders under `TARFLOW_MODEL_ROOT` are accepted. Also `--allow-model-change`
  and `--model-root` on the command line (`python app.py [MODEL] [--host H] [--port P]`).
- `TARFLOW_MAX_ROWS`: compute budget of one request in transformer rows (default 150000; see `check_budget`).
- `TARFLOW_SAMPLER`: STARFlow only, forces the default sampler (otherwise the fastest exact-enough one measured at
  startup).
- `TARFLOW_DEVICE` / `TARFLOW_DTYPE`: default `cuda` when available, else `cpu`; `float32`.
- `TARFLOW_CONCURRENCY`: model calls that run at once (default 1); `TARFLOW_QUEUE_SIZE`: requests that may wait
  (default 32; more are turned away with "queue is full").
- `TARFLOW_MAX_IMAGES`: images per request (default 16); `TARFLOW_MAX_CLASSIFY`: the largest number of classes the
  Bayes classifier scores (one forward pass per class; default 1000 on GPU, 100 on CPU).
- `TARFLOW_TORCH_THREADS`: CPU threads for torch.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import re
import statistics
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before Gradio is imported: the demo sends no usage statistics unless the operator asks for them.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

try:
    import tarflow_hf
    from tarflow_hf.grids import make_grid
    from tarflow_hf.images import flatten_alpha
    from tarflow_hf.labels import id_from_text, menu_names
    from tarflow_hf.pipeline_starflow import StarFlowPipeline
    from tarflow_hf.pipeline_tarflow import TarFlowPipeline
    from tarflow_hf.sampling import GUIDANCE_SCHEDULES, GUIDANCE_TARGETS, SAMPLERS
except ImportError as import_error:  # pragma: no cover - a deployment mistake, not a code path
    raise SystemExit(
        "tarflow_hf is not importable: `pip install -e .` in the tarflow-hf repository, or copy its "
        "src/tarflow_hf folder next to app.py (see spaces_demo/README.md)"
    ) from import_error

logger = logging.getLogger("tarflow_demo")


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SystemExit(f"{name}={value} must be >= {minimum}")
    return value


# ------------------------------------------------------------------------------------------------ limits
# Every input is checked here on the server: the UI's sliders are only a convenience for the browser.
MAX_IMAGES = _env_int("TARFLOW_MAX_IMAGES", 16)
MAX_SEED = 2**32 - 1
GUIDANCE_RANGE = (0.0, 12.0)
TEMPERATURE_RANGE = (0.1, 4.0)
DENOISE_STRENGTH_RANGE = (0.0, 2.0)
FRAMES_RANGE = (3, 16)
MAX_UPLOAD_SIDE = 4096
MAX_UPLOAD_MB = 10
INVERT_CHOICES = ("auto", "yes", "no")
INTERPOLATION_SOURCES = ("two seeds", "two images")
INTERPOLATION_METHODS = ("spherical", "linear")
UNCONDITIONAL_CHOICE = "(no class: unconditional branch)"
# Uploads are decoded by PIL before our code sees them; this turns a decompression bomb into an error early.
PIL.Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_SIDE * MAX_UPLOAD_SIDE
# Displayed images are scaled up (nearest neighbour, so pixels stay sharp) to at least this many pixels.
DISPLAY_SIZE = 192
# MNIST digits fit a 20x20 box centred by mass in a 28x28 image: drawings are fitted the same way.
MNIST_BOX_FRACTION = 20 / 28


# --------------------------------------------------------------------------------------- concurrency probe
class ActiveCalls:
    """Counts model calls running right now (and the most seen at once), so tests and operators can check that
    the queue's concurrency limit holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.total = 0

    def __enter__(self) -> ActiveCalls:
        with self._lock:
            self.current += 1
            self.total += 1
            self.peak = max(self.peak, self.current)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self.current -= 1

    def reset(self) -> None:
        with self._lock:
            self.peak = self.current
            self.total = 0


ACTIVE_CALLS = ActiveCalls()


def model_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler that runs the model: count it in ACTIVE_CALLS and turn every failure into a readable
    `gr.Error` (the user's mistakes keep their message; anything else is logged and summarised)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with ACTIVE_CALLS:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except (ValueError, FloatingPointError) as error:
                raise gr.Error(str(error), print_exception=False) from None
            except torch.OutOfMemoryError:
                raise gr.Error("out of memory: ask for fewer images", print_exception=False) from None
            except Exception as error:
                logger.exception("%s failed", fn.__name__)
                raise gr.Error(f"internal error ({type(error).__name__}); the server log has the details") from None

    return wrapper


# ---------------------------------------------------------------------------------------- upload components
def _readable_upload_errors(preprocess: Callable[..., Any]) -> Callable[..., Any]:
    """Gradio decodes uploads before any handler runs, and a file PIL cannot read would reach the user as a generic
    "error"; turn it into a message that says what to upload instead."""

    @functools.wraps(preprocess)
    def wrapper(self: gr.components.Component, payload: Any) -> Any:
        try:
            return preprocess(self, payload)
        except gr.Error:
            raise
        except PIL.Image.DecompressionBombError:
            raise gr.Error(
                f"the image has too many pixels: at most {MAX_UPLOAD_SIDE}x{MAX_UPLOAD_SIDE}", print_exception=False
            ) from None
        except (OSError, ValueError, SyntaxError):  # PIL.UnidentifiedImageError is an OSError
            raise gr.Error(
                "could not read the upload as an image: use a PNG, JPEG, WebP, GIF or BMP file", print_exception=False
            ) from None

    return wrapper


class ImageUpload(gr.Image):
    """`gr.Image` (same front end) whose unreadable uploads give a readable error."""

    is_template = True  # makes Gradio use the base class's front-end component
    preprocess = _readable_upload_errors(gr.Image.preprocess)


class DrawingPad(gr.ImageEditor):
    """A sketchpad (`gr.ImageEditor`'s front end, no layers, one fixed dark brush) that also takes uploads, with
    readable errors for unreadable files."""

    is_template = True
    preprocess = _readable_upload_errors(gr.ImageEditor.preprocess)


# ------------------------------------------------------------------------------------------------- models
def default_device() -> str:
    return os.environ.get("TARFLOW_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


# A Hub repository id: `owner/name`, each part starting with a letter or digit, no "..": never a path on the server.
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w-]|\.(?!\.))*/[A-Za-z0-9](?:[\w-]|\.(?!\.))*")
# Files fetched for a Hub model: configs, weights and tokenizers; never code or pickles.
HUB_FILES = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
PIPELINE_KINDS = {"TarFlowPipeline": "tarflow", "StarFlowPipeline": "starflow"}


@dataclass(frozen=True)
class ModelRef:
    """A model the server may load: `location` is a local folder (absolute, server side only) or a Hub id, `name`
    what visitors see (a Hub id, a folder's name or its path under the model root: never an absolute path)."""

    source: str  # "local" or "hub"
    location: str
    name: str


def operator_model(model: str) -> ModelRef:
    """The operator's choice (command line, $TARFLOW_MODEL, `build_demo(model)`): any local pipeline folder or a
    Hub id. Visitors never reach this function."""
    model = (model or "").strip()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model!r} is not a pipeline folder (it has no model_index.json)")
        return ModelRef("local", str(path.resolve()), path.resolve().name)
    if HUB_ID.fullmatch(model):
        return ModelRef("hub", model, model)
    raise ValueError(f"no folder at {model!r}, and it is not a Hub id (`owner/name`)")


class ModelCatalog:
    """What a visitor may load with the "Model" field: nothing unless the operator allows it; then Hub ids and the
    pipeline folders under the operator's model root. Refusals say the same thing whether or not a path exists."""

    def __init__(self, startup: ModelRef, allow_change: bool, root: str | None) -> None:
        self.startup = startup
        self.allow_change = allow_change
        self.root = Path(root).expanduser().resolve() if root else None
        if self.root is not None and not self.root.is_dir():
            raise SystemExit(f"TARFLOW_MODEL_ROOT={root!r} is not a folder")

    def refusal(self, text: str) -> str:
        where = " or the name of a model folder offered by this server" if self.root is not None else ""
        return f"not a model this server offers: type a Hub id such as `owner/name`{where}"

    def resolve(self, text: Any) -> ModelRef:
        if not self.allow_change:
            raise ValueError("this server serves one model: loading another is turned off")
        text = str(text or "").strip()
        if not text:
            raise ValueError("no model given: type a Hub id such as `owner/name`")
        if text == self.startup.name:
            return self.startup
        if self.root is not None and not Path(text).is_absolute() and not text.startswith("~"):
            candidate = (self.root / text).resolve()  # symbolic links are followed, then checked
            if candidate.is_relative_to(self.root) and (candidate / "model_index.json").is_file():
                return ModelRef("local", str(candidate), candidate.relative_to(self.root).as_posix())
        if HUB_ID.fullmatch(text):
            return ModelRef("hub", text, text)
        raise ValueError(self.refusal(text))


def fetch_from_hub(repo_id: str) -> str:
    """A Hub repository -> a local folder in the Hub cache (configs, safetensors weights, tokenizer files only)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=HUB_FILES)


def pipeline_kind(folder: str) -> str:
    """ "tarflow" or "starflow", from a pipeline folder's model_index.json; ValueError for anything else."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
        name = index.get("_class_name")
        name = name[-1] if isinstance(name, list) and name else name
        return PIPELINE_KINDS[name]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError("not a TarFlow or STARFlow pipeline") from None


def kind_of(pipe: Any) -> str:
    return "starflow" if isinstance(pipe, StarFlowPipeline) else "tarflow"


_PIPELINES: OrderedDict[str, Any] = OrderedDict()
_PIPELINES_LOCK = threading.Lock()


def loaded_pipeline(model: ModelRef) -> Any | None:
    """The pipeline for `model` if it is in memory (nothing is loaded)."""
    with _PIPELINES_LOCK:
        return _PIPELINES.get(model.location)


def load_pipeline(model: ModelRef | str) -> Any:
    """The pipeline (TarFlowPipeline or StarFlowPipeline) for `model`, loaded once and kept (the most recently used
    few). A string is an operator's choice (see `operator_model`). Errors name the model as visitors see it."""
    model = operator_model(model) if isinstance(model, str) else model
    with _PIPELINES_LOCK:
        if model.location in _PIPELINES:
            _PIPELINES.move_to_end(model.location)
            return _PIPELINES[model.location]
    # Loaded outside the lock: a slow Hub download must not block sessions using models already loaded.
    device = default_device()
    dtype = getattr(torch, os.environ.get("TARFLOW_DTYPE", "float32"))
    start = time.perf_counter()
    try:
        folder = fetch_from_hub(model.location) if model.source == "hub" else model.location
        kind = pipeline_kind(folder)
        pipeline_class = StarFlowPipeline if kind == "starflow" else TarFlowPipeline
        pipe = pipeline_class.from_pretrained(folder, dtype=dtype).to(device)
    except Exception as error:
        # The details (which may hold server paths) go to the log; the visitor gets a message without them.
        logger.warning("could not load %s (%s): %s", model.name, model.source, error)
        where = "from the Hub (no such repository, no connection, or " if model.source == "hub" else "("
        raise ValueError(f"could not load {model.name!r} {where}not a TarFlow or STARFlow pipeline)") from None
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded model %s (%s) on %s in %.1f s", model.name, kind_of(pipe), device, time.perf_counter() - start)
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.setdefault(model.location, pipe)
        _PIPELINES.move_to_end(model.location)
        while len(_PIPELINES) > _env_int("TARFLOW_MAX_LOADED_MODELS", 2):
            _PIPELINES.popitem(last=False)
    return pipe


def class_choices(pipe: TarFlowPipeline) -> list[str]:
    """Dropdown entries: class names, with the id added to the few names that occur twice (ImageNet has two
    "crane" classes), as tarflow_hf.labels writes them."""
    return menu_names(pipe.id2label)


def parse_class(pipe: TarFlowPipeline, choice: Any) -> int | None:
    """A class picked or typed in the UI -> a class id, or None for the unconditional branch (and for
    unconditional models, which take no class). Unknown names raise with the closest known names."""
    if not pipe.transformer.config.num_classes:
        return None
    if choice is None or not str(choice).strip():
        raise ValueError("pick a class (or the unconditional branch)")
    if " ".join(str(choice).split()) == UNCONDITIONAL_CHOICE:
        return None
    return id_from_text(pipe.id2label, str(choice))


def describe(pipe: Any, name: str) -> str:
    """One line about the model, naming it as visitors see it (`ModelRef.name`)."""
    config = pipe.transformer.config
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    size = f"{parameters / 1e6:.1f}M" if parameters >= 100_000 else f"{parameters:,}"
    if kind_of(pipe) == "starflow":
        side = config.sample_size * pipe.vae_scale_factor
        return (
            f"**Model** `{name}`: STARFlow text to image, {side}x{side} images from {config.in_channels}x"
            f"{config.sample_size}x{config.sample_size} VAE latents, {config.num_blocks} flow blocks, {size} "
            f"parameters, on {pipe.device.type}."
        )
    classes = f"{config.num_classes} classes" if config.num_classes else "unconditional"
    return (
        f"**Model** `{name}`: {config.image_size}x{config.image_size}x{config.num_channels}, "
        f"{classes}, {config.num_blocks} flow blocks, {size} parameters, on {pipe.device.type}."
    )


# ------------------------------------------------------------------------------------------------- checks
def check_number(name: str, value: Any, low: float, high: float, integer: bool = False) -> float | int:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = " and ".join(str(int(bound)) if float(bound).is_integer() else str(bound) for bound in (low, high))
        raise ValueError(f"{name} must be between {bounds}, got {value!r}")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------- images
def upscale(image: PIL.Image.Image, size: int = DISPLAY_SIZE) -> PIL.Image.Image:
    """Nearest-neighbour enlargement by a whole factor, so 28x28 digits show as sharp pixels."""
    factor = max(1, size // image.width)
    return image.resize((image.width * factor, image.height * factor), PIL.Image.Resampling.NEAREST)


def for_display(image: PIL.Image.Image, **provenance: Any) -> PIL.Image.Image:
    """A copy of an output image whose PNG carries where it came from and a fresh id.

    Gradio 6 caches an output image under the hash of its PNG bytes and rewrites that file in place, so two
    responses with identical pictures (two users asking for the same seed) race: one may be downloading the file
    while the other truncates it. The id makes every response's bytes, and so its cached files, distinct."""
    image = image.copy()
    image.info = {"Software": "tarflow-hf demo", **{f"tarflow:{key}": str(value) for key, value in provenance.items()}}
    image.info["tarflow:response"] = uuid.uuid4().hex
    return image


def model_space_to_pil(pipe: TarFlowPipeline, images: torch.Tensor) -> list[PIL.Image.Image]:
    return pipe.image_processor.postprocess(images.detach().float().cpu(), output_type="pil")


def latents_to_pil(pipe: TarFlowPipeline, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Latents (batch, patches, patch_dim), standard normal for typical images, shown as images: +-3 std maps to
    black..white."""
    images = pipe.transformer.unpatchify(latents.float().to(pipe.device))
    return model_space_to_pil(pipe, images / 3.0)


def fit_to_model(
    image: PIL.Image.Image, size: int, channels: int, invert: str = "auto", center: bool = False
) -> PIL.Image.Image:
    """An uploaded or drawn image -> the model's input, a `size`x`size` image in mode "L" (1 channel) or "RGB".

    - Transparency is flattened onto white (as Gradio flattens drawings, and as the pipelines' `preprocess` does).
    - `invert`: "yes" inverts, "no" keeps, "auto" inverts single-channel images whose border is mostly light: MNIST
      (and models like it) expect light strokes on a dark background, a drawing is dark on light.
    - `center` (single-channel only): crop to the strokes, scale them to fit a box of 20/28 of the side and centre
      them by mass, as MNIST's digits were prepared.
    - Otherwise: centre-crop to a square and resize (Lanczos). An image already of the right size passes unchanged.
    """
    if not isinstance(image, PIL.Image.Image):
        raise ValueError("no image: upload or draw one first")
    if max(image.size) > MAX_UPLOAD_SIDE or min(image.size) < 1:
        raise ValueError(f"images may be at most {MAX_UPLOAD_SIDE}x{MAX_UPLOAD_SIDE} pixels, got {image.size}")
    check_choice("invert", invert, INVERT_CHOICES)
    if channels not in (1, 3):
        raise ValueError(f"the demo handles 1- or 3-channel models, this one has {channels} channels")
    image = flatten_alpha(image, "L" if channels == 1 else "RGB")  # the pipelines' own rule (tarflow_hf.images)
    if invert == "yes" or (invert == "auto" and channels == 1 and _light_border(image)):
        image = PIL.ImageOps.invert(image)
    if center and channels == 1:
        return _center_by_mass(image, size)
    if image.size == (size, size):
        return image
    return PIL.ImageOps.fit(image, (size, size), method=PIL.Image.Resampling.LANCZOS)


def _light_border(image: PIL.Image.Image) -> bool:
    pixels = np.asarray(image, dtype=np.float32)
    margin = max(1, min(pixels.shape) // 20)
    border = np.concatenate(
        [pixels[:margin].ravel(), pixels[-margin:].ravel(), pixels[:, :margin].ravel(), pixels[:, -margin:].ravel()]
    )
    return float(border.mean()) > 127.5


def _center_by_mass(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    pixels = np.asarray(image)
    ink = pixels > 32
    if not ink.any():
        return PIL.ImageOps.fit(image, (size, size), method=PIL.Image.Resampling.LANCZOS)
    rows, cols = np.nonzero(ink)
    strokes = image.crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    box = max(1, round(size * MNIST_BOX_FRACTION))
    scale = box / max(strokes.size)
    strokes = strokes.resize(
        (max(1, round(strokes.width * scale)), max(1, round(strokes.height * scale))), PIL.Image.Resampling.LANCZOS
    )
    weights = np.asarray(strokes, dtype=np.float64)
    total = weights.sum()
    if total > 0:
        mass_y = (weights.sum(1) * np.arange(weights.shape[0])).sum() / total
        mass_x = (weights.sum(0) * np.arange(weights.shape[1])).sum() / total
    else:
        mass_y, mass_x = (weights.shape[0] - 1) / 2, (weights.shape[1] - 1) / 2
    left = min(max(round((size - 1) / 2 - mass_x), 0), size - strokes.width)
    top = min(max(round((size - 1) / 2 - mass_y), 0), size - strokes.height)
    canvas = PIL.Image.new("L", (size, size), 0)
    canvas.paste(strokes, (left, top))
    return canvas


def slerp(start: torch.Tensor, end: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two latents (1, ...) at `weights` in [0, 1] -> (len(weights), ...). Keeps
    the norm of Gaussian latents (a straight line between them passes through low-norm, atypical latents)."""
    a, b = start.flatten().double(), end.flatten().double()
    cosine = (a @ b / (a.norm() * b.norm())).clamp(-1.0, 1.0)
    angle = torch.arccos(cosine)
    shape = (-1,) + (1,) * (start.dim() - 1)
    weights = weights.double().view(shape)
    if angle.item() < 1e-4:  # (nearly) parallel: the straight line is the arc
        mixed = (1 - weights) * start.double() + weights * end.double()
    else:
        mixed = (torch.sin((1 - weights) * angle) * start.double() + torch.sin(weights * angle) * end.double()) / (
            torch.sin(angle)
        )
    return mixed.to(start.dtype)


# ------------------------------------------------------------------------------------------------- budget
# One request may not hold the worker for long: its cost is estimated, before any work, in transformer rows (one
# row: one token through one flow block, for one image and one guidance branch) and refused above
# $TARFLOW_MAX_ROWS. Per image and block a sampler computes about cost x num_patches rows: the sequential sampler
# each token once; the parallel ones recompute unsettled tokens on every pass (measured on the bundled MNIST model:
# jacobi 7-8x, newton 240-300x, i.e. 8 x (2 x patch_dim + 1), as it iterates on 2 x patch_dim + 1 copies).
DEFAULT_MAX_ROWS = 150_000
SAMPLER_COST = {"sequential": 1, "jacobi": 8, "block_jacobi": 8}


def sampler_cost(sampler: str, patch_dim: int) -> int:
    return 8 * (2 * patch_dim + 1) if sampler == "newton" else SAMPLER_COST[sampler]


def max_rows() -> int:
    return _env_int("TARFLOW_MAX_ROWS", DEFAULT_MAX_ROWS)


def sampling_rows(pipe: Any, sampler: str, num_images: int, guided: bool) -> int:
    """Estimated transformer rows for sampling `num_images` images: TarFlow guides every block (two branches),
    STARFlow only its deep block."""
    config = pipe.transformer.config
    branch_blocks = config.num_blocks
    if guided:
        branch_blocks += 1 if kind_of(pipe) == "starflow" else config.num_blocks
    return num_images * sampler_cost(sampler, config.patch_dim) * config.num_patches * branch_blocks


def check_budget(rows: int, per_item: int, items: str, advice: str = "") -> None:
    """ValueError when `rows` is over the budget, saying how many `items` fit (at `per_item` rows each)."""
    limit = max_rows()
    if rows <= limit:
        return
    fit = limit // max(per_item, 1)
    lower = f"ask for at most {fit} {items}" if fit else f"even one is over it ({items})"
    raise ValueError(
        f"this request would need about {rows:,} transformer rows, over this server's limit of {limit:,} per "
        f"request: {lower}{advice}"
    )


def check_sampling_budget(pipe: Any, sampler: str, num_images: int, guided: bool) -> None:
    per_image = sampling_rows(pipe, sampler, 1, guided)
    advice = "" if sampler == "sequential" else ", or choose the sequential sampler (the least compute per image)"
    check_budget(per_image * num_images, per_image, f"image(s) with the {sampler} sampler", advice)


# -------------------------------------------------------------------------------------------------- work
def _frame(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """One trajectory frame: all images of a request side by side (4 a row), each enlarged."""
    return make_grid([upscale(image, DISPLAY_SIZE // 2) for image in images], columns=4)


@dataclass
class Generation:
    images: list[PIL.Image.Image]
    frames: list[tuple[str, PIL.Image.Image]]  # (caption, all images enlarged and tiled) per sampling step
    seconds: float
    transformer_passes: int  # transformer evaluations that ran one after another


def check_generation(
    pipe: TarFlowPipeline,
    num_images: Any,
    guidance_scale: Any,
    seed: Any,
    guidance_target: Any,
    guidance_schedule: Any,
    attention_temperature: Any,
    denoise_strength: Any,
    sampler: Any,
) -> tuple[Any, ...]:
    """The arguments of `generate_images` checked (ValueError naming the first bad one) and normalised, the
    request's cost included."""
    num_images = check_number("number of images", num_images, 1, MAX_IMAGES, integer=True)
    guidance_scale = check_number("guidance scale", guidance_scale, *GUIDANCE_RANGE)
    seed = check_number("seed", seed, 0, MAX_SEED, integer=True)
    guidance_target = check_choice("guidance target", guidance_target, GUIDANCE_TARGETS)
    guidance_schedule = check_choice("guidance schedule", guidance_schedule, GUIDANCE_SCHEDULES)
    attention_temperature = check_number("attention temperature", attention_temperature, *TEMPERATURE_RANGE)
    denoise_strength = check_number("denoising strength", denoise_strength, *DENOISE_STRENGTH_RANGE)
    sampler = check_choice("sampler", sampler, SAMPLERS)
    check_sampling_budget(pipe, sampler, num_images, guidance_scale != 1)
    return (
        num_images,
        guidance_scale,
        seed,
        guidance_target,
        guidance_schedule,
        attention_temperature,
        denoise_strength,
        sampler,
    )


def generate_images(
    pipe: TarFlowPipeline,
    class_id: int | None,
    num_images: int,
    guidance_scale: float,
    seed: int,
    guidance_target: str = "both",
    guidance_schedule: str = "constant",
    attention_temperature: float = 1.0,
    denoise: bool = True,
    denoise_strength: float = 1.0,
    sampler: str = "sequential",
    on_block: Callable[[int, int, str], None] | None = None,
) -> Generation:
    """Sample `num_images` images, image i from seed `seed + i` (so an image does not depend on how many are
    asked for), and record the trajectory: the prior noise, the images after each flow block, the denoised ones.
    `on_block(done, total, description)` is called as sampling progresses."""
    (
        num_images,
        guidance_scale,
        seed,
        guidance_target,
        guidance_schedule,
        attention_temperature,
        denoise_strength,
        (sampler),
    ) = check_generation(
        pipe,
        num_images,
        guidance_scale,
        seed,
        guidance_target,
        guidance_schedule,
        attention_temperature,
        denoise_strength,
        sampler,
    )
    num_blocks = pipe.transformer.config.num_blocks
    total = num_blocks + int(bool(denoise))

    start = time.perf_counter()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    latents = pipe.prepare_latents(num_images, generators, None, pipe.device)
    prior = pipe.transformer.unpatchify(latents * pipe.transformer.prior_variance.sqrt())
    frames = [("prior noise", _frame(model_space_to_pil(pipe, prior)))]

    def on_step(_pipe: Any, step: int, block_index: int, tensors: dict[str, torch.Tensor]) -> None:
        frames.append(
            (f"after flow block {step + 1} of {num_blocks}", _frame(model_space_to_pil(pipe, tensors["images"])))
        )
        if on_block is not None:
            next_step = f"flow block {step + 2}" if step + 1 < num_blocks else ("denoising" if denoise else "done")
            on_block(step + 1, total, f"inverted flow block {step + 1}/{num_blocks}; next: {next_step}")

    output = pipe(
        class_labels=None if class_id is None else [class_id],
        num_images_per_label=num_images,
        guidance_scale=guidance_scale,
        guidance_target=guidance_target,
        guidance_schedule=guidance_schedule,
        attention_temperature=attention_temperature,
        sampler=sampler,
        denoise=bool(denoise),
        denoise_strength=denoise_strength,
        latents=latents,
        callback_on_step_end=on_step,
        return_stats=True,
    )
    images = list(output.images)
    if denoise:
        frames.append(("denoised (final)", _frame(images)))
    return Generation(images, frames, time.perf_counter() - start, output.stats.transformer_passes)


@dataclass
class Analysis:
    model_input: PIL.Image.Image
    bits_per_dim: float
    probabilities: dict[str, float] | None
    best_class: str | None
    best_bits_per_dim: float | None
    latent: PIL.Image.Image
    latent_std: float
    reconstruction: PIL.Image.Image
    reconstruction_error: float  # largest pixel difference, in 8-bit grey levels


def analyze_image(
    pipe: TarFlowPipeline, image: PIL.Image.Image, invert: str = "auto", center: bool = False
) -> Analysis:
    """Fit `image` to the model, then: its bits/dim (unconditional branch, dequantized with a fixed seed), class
    probabilities by Bayes' rule, its latent and the image decoded back from that latent."""
    config = pipe.transformer.config
    model_input = fit_to_model(image, config.image_size, config.num_channels, invert, center)
    bits = pipe.bits_per_dim([model_input], generator=torch.Generator().manual_seed(0)).item()

    probabilities = best_class = best_bits = None
    max_classes = _env_int("TARFLOW_MAX_CLASSIFY", 1000 if pipe.device.type == "cuda" else 100)
    if 0 < config.num_classes <= max_classes:
        scores = pipe.classify([model_input])[0].tolist()
        names = class_choices(pipe)
        probabilities = dict(zip(names, scores, strict=True))
        best = int(np.argmax(scores))
        best_class = names[best]
        best_bits = pipe.bits_per_dim(
            [model_input], class_labels=[best], generator=torch.Generator().manual_seed(0)
        ).item()

    latents = pipe.encode([model_input])
    reconstruction = pipe.decode(latents, output_type="pt")
    original = pipe.preprocess([model_input])
    error = (reconstruction.cpu() - original).abs().max().item() * 255
    return Analysis(
        model_input=model_input,
        bits_per_dim=bits,
        probabilities=probabilities,
        best_class=best_class,
        best_bits_per_dim=best_bits,
        latent=latents_to_pil(pipe, latents)[0],
        latent_std=latents.float().std().item(),
        reconstruction=pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(reconstruction.cpu()))[0],
        reconstruction_error=error,
    )


def interpolate(
    pipe: TarFlowPipeline,
    source: str,
    class_id: int | None,
    frames: int,
    method: str = "spherical",
    seeds: tuple[Any, Any] = (0, 1),
    images: tuple[Any, Any] = (None, None),
    guidance_scale: float = 1.0,
    invert: str = "auto",
    center: bool = False,
) -> list[PIL.Image.Image]:
    """Images along a path between two latents: two seeds' prior noise (sampled with `guidance_scale` and
    denoised, as in the Generate tab), or two images' exact encodings (decoded exactly: the ends are the images)."""
    source = check_choice("interpolate between", source, INTERPOLATION_SOURCES)
    frames = check_number("number of frames", frames, *FRAMES_RANGE, integer=True)
    method = check_choice("interpolation", method, INTERPOLATION_METHODS)
    weights = torch.linspace(0, 1, frames)
    labels = None if class_id is None else [class_id]
    if source == "two seeds":
        guidance_scale = check_number("guidance scale", guidance_scale, *GUIDANCE_RANGE)
        per_frame = sampling_rows(pipe, "sequential", 1, guidance_scale != 1)
        check_budget(per_frame * frames, per_frame, "frames")
        generators = [torch.Generator().manual_seed(check_number("seed", s, 0, MAX_SEED, integer=True)) for s in seeds]
        ends = pipe.prepare_latents(2, generators, None, pipe.device)
    else:
        if any(image is None for image in images):
            raise ValueError("upload two images to interpolate between them")
        config = pipe.transformer.config
        fitted = [fit_to_model(image, config.image_size, config.num_channels, invert, center) for image in images]
        ends = pipe.encode(fitted, class_labels=labels)
    if method == "spherical":
        path = slerp(ends[:1], ends[1:], weights.to(ends.device))
    else:
        path = torch.lerp(ends[:1], ends[1:], weights.to(ends.device).view(-1, 1, 1))
    if source == "two seeds":
        return list(
            pipe(class_labels=labels, num_images_per_label=frames, guidance_scale=guidance_scale, latents=path).images
        )
    return list(pipe.decode(path, class_labels=labels))


# ------------------------------------------------------------------------------------------------ STARFlow
STARFLOW_SAMPLERS = ("sequential", "jacobi", "block_jacobi", "newton")
STARFLOW_GUIDANCE_RANGE = (1.0, 12.0)  # STARFlow's guidance rule needs a scale >= 1
MAX_PROMPT_CHARS = 500
MAX_CAPTIONS = 32
# A sampler is "exact enough" to be the default when its images differ from the sequential sampler's by at most this
# many 8-bit grey levels (measured at startup on one image).
EXACT_ENOUGH_LEVELS = 2.0
PROMPT_EXAMPLES = (
    "a photo of a cat sitting on a sofa",
    "a watercolor painting of a fox in the snow",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table",
)


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt: a sentence describing the image")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt may be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    return prompt


def parse_captions(text: Any) -> list[str]:
    """Captions typed one per line -> a list without blanks or repeats (in order); ValueError unless 2 to
    MAX_CAPTIONS remain."""
    if not isinstance(text, str):
        raise ValueError("type the candidate captions, one per line")
    captions = list(dict.fromkeys(" ".join(line.split()) for line in text.splitlines() if line.strip()))
    if len(captions) < 2:
        raise ValueError("type at least two different captions, one per line, to rank them")
    if len(captions) > MAX_CAPTIONS:
        raise ValueError(f"at most {MAX_CAPTIONS} captions, got {len(captions)}")
    too_long = [caption for caption in captions if len(caption) > MAX_PROMPT_CHARS]
    if too_long:
        raise ValueError(f"captions may be at most {MAX_PROMPT_CHARS} characters each")
    return captions


def starflow_image_size(pipe: StarFlowPipeline) -> int:
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def check_starflow_generation(
    pipe: StarFlowPipeline, prompt: Any, num_images: Any, guidance_scale: Any, seed: Any, sampler: Any
) -> tuple[str, int, float, int, str]:
    prompt = check_prompt(prompt)
    num_images = check_number("number of images", num_images, 1, MAX_IMAGES, integer=True)
    guidance_scale = check_number("guidance scale", guidance_scale, *STARFLOW_GUIDANCE_RANGE)
    seed = check_number("seed", seed, 0, MAX_SEED, integer=True)
    sampler = check_choice("sampler", sampler, STARFLOW_SAMPLERS)
    check_sampling_budget(pipe, sampler, num_images, guidance_scale != 1)
    return prompt, num_images, guidance_scale, seed, sampler


def ranking_rows(pipe: StarFlowPipeline, num_captions: int) -> int:
    config = pipe.transformer.config
    return num_captions * config.num_patches * config.num_blocks


def generate_starflow(
    pipe: StarFlowPipeline,
    prompt: str,
    num_images: int,
    guidance_scale: float,
    seed: int,
    sampler: str,
    denoise: bool = True,
    attention_temperature: float = 1.0,
    on_block: Callable[[int, int, str], None] | None = None,
    record_frames: bool = True,
) -> Generation:
    """Text to image with a STARFlow pipeline, image i from seed `seed + i`, recording the trajectory (each block's
    latents decoded by the VAE) as `generate_images` does."""
    prompt, num_images, guidance_scale, seed, sampler = check_starflow_generation(
        pipe, prompt, num_images, guidance_scale, seed, sampler
    )
    attention_temperature = check_number("attention temperature", attention_temperature, *TEMPERATURE_RANGE)
    num_blocks = pipe.transformer.config.num_blocks
    total = num_blocks + int(bool(denoise))
    side = starflow_image_size(pipe)

    start = time.perf_counter()
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    latents = pipe.prepare_latents(num_images, side, side, generators, None, pipe.device)
    frames: list[tuple[str, PIL.Image.Image]] = []
    if record_frames:
        with torch.no_grad():
            frames.append(("prior noise (decoded)", _frame(pipe.decode_latents(latents))))

    def on_step(_pipe: Any, step: int, block_index: int, tensors: dict[str, torch.Tensor]) -> None:
        if record_frames:
            with torch.no_grad():
                decoded = pipe.decode_latents(tensors["latents"])
            frames.append((f"after flow block {step + 1} of {num_blocks}", _frame(decoded)))
        if on_block is not None:
            next_step = f"flow block {step + 2}" if step + 1 < num_blocks else ("denoising" if denoise else "done")
            on_block(step + 1, total, f"inverted flow block {step + 1}/{num_blocks}; next: {next_step}")

    options = {
        "prompt": prompt,
        "num_images_per_prompt": num_images,
        "guidance_scale": guidance_scale,
        "latents": latents,
        "sampler": sampler,
        "denoise": bool(denoise),
        "attention_temperature": attention_temperature,
        "callback_on_step_end": on_step,
        "return_stats": True,
    }
    output = pipe(**options)
    images = list(output.images)
    if denoise and record_frames:
        frames.append(("denoised (final)", _frame(images)))
    return Generation(images, frames, time.perf_counter() - start, output.stats.transformer_passes)


@dataclass
class Ranking:
    model_input: PIL.Image.Image
    probabilities: dict[str, float]  # caption -> p(caption | image), over the candidates
    best: str
    bits_per_dim: float  # of the image's latent under the best caption


def rank_captions(pipe: StarFlowPipeline, image: Any, captions_text: Any) -> Ranking:
    """Candidate captions (one per line) ranked for `image` by Bayes' rule over the exact likelihoods of its VAE
    latent under each caption (`pipe.classify`)."""
    captions = parse_captions(captions_text)
    check_budget(ranking_rows(pipe, len(captions)), ranking_rows(pipe, 1), "captions")
    model_input = fit_to_model(image, starflow_image_size(pipe), 3, invert="no")
    scores = pipe.classify([model_input], captions)[0].tolist()
    probabilities = dict(zip(captions, scores, strict=True))
    best = captions[int(np.argmax(scores))]
    bits = pipe.bits_per_dim([model_input], best).item()
    return Ranking(model_input, probabilities, best, bits)


class TimeEstimator:
    """Expected seconds of a request, from what this server measured: a calibration at startup (one image per
    sampler, one ranking of two captions) and then every request served. Sampling time is fitted as a + b x images
    per sampler once requests of two sizes were seen (until then: the per-image time times the images)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, list[tuple[int, float]]] = {}
        self._pairs: list[tuple[int, float]] = []

    def observe_sampling(self, sampler: str, num_images: int, seconds: float) -> None:
        with self._lock:
            self._samples.setdefault(sampler, []).append((num_images, seconds))
            del self._samples[sampler][:-16]

    def observe_ranking(self, pairs: int, seconds: float) -> None:
        with self._lock:
            self._pairs.append((pairs, seconds))
            del self._pairs[:-16]

    @staticmethod
    def _fit(points: list[tuple[int, float]], count: int) -> float | None:
        if not points:
            return None
        sizes = {n for n, _ in points}
        if len(sizes) == 1:
            size = next(iter(sizes))
            return statistics.median(s for _, s in points) / size * count
        xs, ys = np.array([n for n, _ in points], float), np.array([s for _, s in points], float)
        slope = max(float(np.polyfit(xs, ys, 1)[0]), 0.0)
        intercept = max(float(np.mean(ys - slope * xs)), 0.0)
        return intercept + slope * count

    def sampling_seconds(self, sampler: str, num_images: int) -> float | None:
        with self._lock:
            return self._fit(list(self._samples.get(sampler, [])), num_images)

    def ranking_seconds(self, pairs: int) -> float | None:
        with self._lock:
            return self._fit(list(self._pairs), pairs)


@dataclass
class Calibration:
    seconds: dict[str, float]  # one image, per sampler
    deviation: dict[str, float]  # largest difference from the sequential sampler's image, 8-bit levels
    default_sampler: str

    def summary(self) -> str:
        parts = [
            f"{name} {self.seconds[name]:.2f} s (off by {self.deviation[name]:.1f} levels)"
            if name != "sequential"
            else f"sequential {self.seconds[name]:.2f} s"
            for name in self.seconds
        ]
        return (
            f"Measured at startup, one image: {'; '.join(parts)}. Default sampler: **{self.default_sampler}**, the "
            f"fastest within {EXACT_ENOUGH_LEVELS:g} grey levels of the exact sequential sampler."
        )


def calibrate_starflow(
    pipe: StarFlowPipeline, estimator: TimeEstimator, prompt: str = PROMPT_EXAMPLES[0]
) -> Calibration:
    """Time one image with every sampler (after a warm-up) and one ranking of two captions; the default sampler is
    the fastest whose image is within EXACT_ENOUGH_LEVELS of the sequential sampler's and that fits the budget.
    $TARFLOW_SAMPLER forces the default."""
    guidance = pipe.transformer.config.default_guidance_scale
    generate_starflow(pipe, prompt, 1, guidance, 0, "sequential", record_frames=False)  # warm-up
    seconds, deviation, reference = {}, {}, None
    for sampler in STARFLOW_SAMPLERS:
        if sampling_rows(pipe, sampler, 1, guidance != 1) > max_rows():
            continue
        result = generate_starflow(pipe, prompt, 1, guidance, 0, sampler, record_frames=False)
        pixels = np.asarray(result.images[0], dtype=np.float64)
        reference = pixels if reference is None else reference
        seconds[sampler] = result.seconds
        deviation[sampler] = float(np.abs(pixels - reference).max())
        estimator.observe_sampling(sampler, 1, result.seconds)
    image = PIL.Image.new("RGB", (starflow_image_size(pipe),) * 2, "white")
    start = time.perf_counter()
    pipe.classify([image], [prompt, PROMPT_EXAMPLES[1]])
    estimator.observe_ranking(2, time.perf_counter() - start)
    forced = os.environ.get("TARFLOW_SAMPLER", "").strip()
    if forced:
        default = check_choice("TARFLOW_SAMPLER", forced, STARFLOW_SAMPLERS)
    else:
        exact = [name for name in seconds if deviation[name] <= EXACT_ENOUGH_LEVELS]
        default = min(exact, key=seconds.__getitem__)
    calibration = Calibration(seconds, deviation, default)
    logger.info("%s", calibration.summary().replace("**", ""))
    return calibration


def describe_estimate(seconds: float | None, what: str) -> str:
    if seconds is None:
        return f"Expected time for {what}: not measured yet on this server."
    shown = f"{seconds:.3f}" if seconds < 1 else f"{seconds:.1f}"
    return f"Expected time for {what}: **about {shown} s** on this server (measured, not promised)."


# ------------------------------------------------------------------------------------------------------ UI
INTRO = """# TarFlow: a normalizing flow that draws
[TarFlow](https://arxiv.org/abs/2412.06329) stacks causal transformer blocks into an invertible map between images
and Gaussian noise. Run backwards it **samples**; run forwards it gives the **exact likelihood** of any image, and
an **exact latent**: things a diffusion model or a GAN cannot give you."""

LIKELIHOOD_HELP = """Draw (dark on light is fine) or upload an image. It is converted to the model's size and
channels: transparency flattened onto white, single-channel models get light-on-dark images (**invert: auto**
inverts when the border is light, as MNIST digits are white on black) and, with **centre**, the strokes are
cropped, scaled to a 20/28 box and centred by mass like MNIST's digits; other images are centre-cropped and
resized. The picture on the right is what the model scores."""


STARFLOW_INTRO = """# STARFlow: text to image with a normalizing flow
[STARFlow](https://arxiv.org/abs/2506.06276) is a normalizing flow over the latents of an autoencoder, guided by a
text prompt. Run backwards it **samples** an image for a prompt; run forwards it gives the **exact likelihood** of an
image's latent under any caption, so it can **rank captions** for an image by Bayes' rule."""

RANKING_HELP = """Upload an image and type candidate captions, one per line: each caption gets p(caption | image) by
Bayes' rule over the exact likelihoods of the image's latent under every caption (a uniform prior over them).
Transparency is flattened onto white; the image is centre-cropped and resized to the model's size."""


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={raw!r}: use 1 or 0")


def ui_check(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A check run by the page before a model call (queued without a limit, no outputs): a mistake becomes a message
    while every output keeps what it showed. Other failures are left to the model call, which reports them."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except gr.Error:
            raise
        except (ValueError, FloatingPointError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:
            logger.exception("check %s failed", fn.__name__)

    return wrapper


def guarded(
    trigger: Callable[..., Any],
    check: Callable[..., Any],
    handler: Callable[..., Any],
    inputs: list,
    outputs: list,
    api_name: str,
    **events: Any,
) -> Any:
    """`trigger(check)` then, only if it passed, `handler`: API clients call `handler` by its name (it checks the
    same things itself); the page runs `check` first so that an error leaves the outputs as they were."""
    return trigger(
        ui_check(check), inputs, None, concurrency_limit=None, api_visibility="undocumented", show_progress="hidden"
    ).success(handler, inputs, outputs, api_name=api_name, **events)


def check_image_given(image: Any) -> None:
    image = image.get("composite") if isinstance(image, dict) else image
    if not isinstance(image, PIL.Image.Image):
        raise ValueError("no image: upload or draw one first")


def build_demo(
    model: str | None = None,
    concurrency_limit: int | None = None,
    queue_size: int | None = None,
    allow_model_change: bool | None = None,
    model_root: str | None = None,
) -> gr.Blocks:
    """The app, with its queue configured. `model` (the operator's choice: a pipeline folder or a Hub id, TarFlow or
    STARFlow) defaults to $TARFLOW_MODEL, then the bundled MNIST model; `concurrency_limit` / `queue_size` to
    $TARFLOW_CONCURRENCY / $TARFLOW_QUEUE_SIZE (1 / 32); `allow_model_change` to $TARFLOW_ALLOW_MODEL_CHANGE (off:
    visitors cannot load anything, the handler does not exist); `model_root` to $TARFLOW_MODEL_ROOT (the folder
    whose pipeline folders visitors may load when model change is on; Hub ids are accepted too).

    Example:

    ```python
    >>> demo = build_demo("path/to/pipeline")
    >>> launch(demo, server_name="127.0.0.1", prevent_thread_lock=True)
    ```
    """
    threads = _env_int("TARFLOW_TORCH_THREADS", 0, minimum=0)
    if threads:
        torch.set_num_threads(threads)
    model = model or os.environ.get("TARFLOW_MODEL") or tarflow_hf.BUNDLED_MODEL
    if model == tarflow_hf.BUNDLED_MODEL and not Path(model).is_dir():
        raise SystemExit(f"the bundled model is missing ({model}); set TARFLOW_MODEL to a TarFlow pipeline folder")
    startup = operator_model(model)
    pipe = load_pipeline(startup)
    allow_change = _env_flag("TARFLOW_ALLOW_MODEL_CHANGE", False) if allow_model_change is None else allow_model_change
    root = model_root if model_root is not None else (os.environ.get("TARFLOW_MODEL_ROOT") or None)
    catalog = ModelCatalog(startup, bool(allow_change), root)
    kind = kind_of(pipe)

    # Output files are cached per response (see for_display): every 30 minutes drop those older than an hour.
    title = "STARFlow demo" if kind == "starflow" else "TarFlow demo"
    with gr.Blocks(title=title, delete_cache=(1800, 3600)) as demo:
        model_state = gr.State(startup)
        gr.Markdown(STARFLOW_INTRO if kind == "starflow" else INTRO)
        model_box = load_button = None
        if catalog.allow_change:
            with gr.Row(equal_height=True):
                offered = "a Hub id" + (" or a model folder offered by this server" if catalog.root else "")
                model_box = gr.Textbox(value=startup.name, label=f"Model: {offered}", scale=4)
                load_button = gr.Button("Load model", scale=1)
        model_info = gr.Markdown(describe(pipe, startup.name))
        header = (catalog, model_state, model_box, load_button, model_info)
        if kind == "starflow":
            _starflow_page(pipe, header)
        else:
            _tarflow_page(pipe, header)

    concurrency = concurrency_limit or _env_int("TARFLOW_CONCURRENCY", 1)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size or _env_int("TARFLOW_QUEUE_SIZE", 32))
    return demo


def _load_checked(catalog: ModelCatalog, text: str, kind: str) -> tuple[ModelRef, Any]:
    ref = catalog.resolve(text)
    pipe = load_pipeline(ref)
    if kind_of(pipe) != kind:
        names = {"tarflow": "TarFlow", "starflow": "STARFlow"}
        raise ValueError(f"{ref.name!r} is a {names[kind_of(pipe)]} model; this page serves {names[kind]} models")
    return ref, pipe


def _trajectory_outputs(num_blocks: int) -> tuple[Any, ...]:
    gallery = gr.Gallery(label="Samples", columns=4, format="png", object_fit="contain", elem_id="samples", height=330)
    timing = gr.Markdown(elem_id="timing")
    frames_state = gr.State([])
    step_slider = gr.Slider(0, num_blocks + 1, value=0, step=1, label="Sampling step (0 = noise)", interactive=True)
    step_image = gr.Image(
        label="The images forming, block by block", format="png", interactive=False, height=240, elem_id="trajectory"
    )
    return gallery, timing, frames_state, step_slider, step_image


def _generation_outputs(result: Generation, seed_int: int, name: str, summary: str) -> tuple[Any, ...]:
    gallery_items = [
        (for_display(upscale(image), seed=seed_int + i, model=name), f"seed {seed_int + i}")
        for i, image in enumerate(result.images)
    ]
    last = len(result.frames) - 1
    caption, frame = result.frames[last]
    return (
        gallery_items,
        summary,
        result.frames,
        gr.Slider(maximum=last, value=last, label=f"Sampling step: {caption}"),
        for_display(frame, step=caption),
    )


def on_step(recorded: list[tuple[str, PIL.Image.Image]], step: float):
    if not recorded:
        return gr.Slider(), None
    index = min(max(int(step), 0), len(recorded) - 1)
    caption, frame = recorded[index]
    return gr.Slider(label=f"Sampling step: {caption}"), for_display(frame, step=caption)


MODEL_EVENTS = {"concurrency_id": "model"}


def _wire_generation(
    button: Any,
    check: Callable[..., Any],
    handler: Callable[..., Any],
    inputs: list,
    trajectory: tuple[Any, ...],
    random_button: Any,
    seed: Any,
    after: Callable[[Any], Any] | None = None,
) -> None:
    """The events both pages share around generation: the Generate button (checked, then `handler`, then what
    `after(event)` chains to it), the trajectory slider and the random seed button."""
    gallery, timing, frames_state, step_slider, step_image = trajectory
    event = guarded(
        button.click,
        check,
        handler,
        inputs,
        [gallery, timing, frames_state, step_slider, step_image],
        "generate",
        **MODEL_EVENTS,
    )
    if after is not None:
        after(event)
    step_slider.release(
        on_step, [frames_state, step_slider], [step_slider, step_image], api_name="show_step", queue=False
    )
    random_button.click(
        lambda: random.randint(0, MAX_SEED), None, seed, api_name="random_seed", queue=False, show_progress="hidden"
    )
    return event


def _wire_model_loading(
    header: tuple[Any, ...],
    kind: str,
    page_updates: Callable[[Any], tuple[Any, ...]],
    page_outputs: list,
    trajectory: tuple[Any, ...],
) -> None:
    """The Load model button, only where visitors may change the model: loads a `kind` pipeline and updates the
    header, the page's own components (`page_outputs`, given `page_updates(pipe)`) and the trajectory slider."""
    catalog, model_state, model_box, load_button, model_info = header
    _, _, frames_state, step_slider, _ = trajectory
    if not catalog.allow_change:
        return  # no handler that loads a model exists at all

    def check_load(text: str):
        catalog.resolve(text)

    @model_call
    def on_load(text: str):
        ref, pipe = _load_checked(catalog, text, kind)
        cfg = pipe.transformer.config
        return (
            ref,
            ref.name,
            describe(pipe, ref.name),
            *page_updates(pipe),
            gr.Slider(maximum=cfg.num_blocks + 1, value=0, label="Sampling step (0 = noise)"),
            [],
        )

    guarded(
        load_button.click,
        check_load,
        on_load,
        [model_box],
        [model_state, model_box, model_info, *page_outputs, step_slider, frames_state],
        "load_model",
        **MODEL_EVENTS,
    )


def _tarflow_page(pipe: TarFlowPipeline, header: tuple[Any, ...]) -> None:
    model_state = header[1]
    config = pipe.transformer.config
    conditional = config.num_classes > 0
    choices = class_choices(pipe)
    class_options = [*choices, UNCONDITIONAL_CHOICE] if conditional else [UNCONDITIONAL_CHOICE]
    canvas = min(512, max(280, 2 * config.image_size))

    with gr.Tab("Generate"), gr.Row():
        with gr.Column(scale=1):
            class_box = gr.Dropdown(
                class_options,
                value=class_options[0],
                label="Class (type to search)",
                filterable=True,
                allow_custom_value=True,  # checked by parse_class, which suggests close names
                visible=conditional,
            )
            num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
            guidance = gr.Slider(
                *GUIDANCE_RANGE, value=config.default_guidance_scale, step=0.1, label="Guidance scale (1 = none)"
            )
            with gr.Row(equal_height=True):
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=3)
                random_button = gr.Button("Random seed", scale=1, elem_id="random-seed")
            with gr.Accordion("Advanced", open=False):
                target = gr.Radio(list(GUIDANCE_TARGETS), value="both", label="Guidance target")
                schedule = gr.Radio(
                    list(GUIDANCE_SCHEDULES), value="constant", label="Guidance schedule (linear: annealed)"
                )
                temperature = gr.Slider(
                    *TEMPERATURE_RANGE, value=1.0, step=0.05, label="Attention temperature (guidance branch)"
                )
                denoise = gr.Checkbox(value=True, label="Denoise (one score step)")
                strength = gr.Slider(*DENOISE_STRENGTH_RANGE, value=1.0, step=0.05, label="Denoising strength")
                sampler = gr.Radio(
                    list(SAMPLERS),
                    value="sequential",
                    label="Sampler",
                    info="sequential: exact, patch by patch. jacobi, newton: fewer sequential transformer passes "
                    "(same images up to 1e-4); newton costs far more compute per pass.",
                )
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            trajectory = _trajectory_outputs(config.num_blocks)

    with gr.Tab("Likelihood"):
        gr.Markdown(LIKELIHOOD_HELP)
        with gr.Row():
            with gr.Column():
                sketch = DrawingPad(
                    label="Draw or upload",
                    type="pil",
                    image_mode="RGBA",
                    sources=["upload", "clipboard"],
                    transforms=(),
                    canvas_size=(canvas, canvas),
                    brush=gr.Brush(
                        default_size=max(4, canvas // 12),
                        colors=["#000000"],
                        default_color="#000000",
                        color_mode="fixed",
                    ),
                    layers=False,
                )
                with gr.Row():
                    invert = gr.Radio(list(INVERT_CHOICES), value="auto", label="Invert")
                    center = gr.Checkbox(value=config.num_channels == 1, label="Centre like MNIST")
                analyze_button = gr.Button("Score this image", variant="primary", elem_id="analyze-button")
            with gr.Column():
                with gr.Row():
                    fitted = gr.Image(label="Model input", format="png", interactive=False)
                    bits = gr.Number(label="bits / dim (lower = more likely)", precision=4, interactive=False)
                probabilities = gr.Label(label="p(class | image), Bayes' rule", num_top_classes=5, visible=conditional)
                with gr.Row():
                    latent = gr.Image(label="Latent z (±3 std = black..white)", format="png", interactive=False)
                    reconstruction = gr.Image(label="Decoded from z", format="png", interactive=False)
                details = gr.Markdown()

        gr.Markdown("### Walk through latent space")
        with gr.Row():
            with gr.Column():
                source = gr.Radio(list(INTERPOLATION_SOURCES), value="two seeds", label="Between")
                with gr.Row():
                    seed_a = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed A")
                    seed_b = gr.Number(value=1, precision=0, minimum=0, maximum=MAX_SEED, label="Seed B")
                with gr.Row():
                    # image_mode=None keeps an upload's transparency, which fit_to_model flattens onto white.
                    image_a = ImageUpload(
                        label="Image A", type="pil", image_mode=None, sources=["upload", "clipboard"], height=160
                    )
                    image_b = ImageUpload(
                        label="Image B", type="pil", image_mode=None, sources=["upload", "clipboard"], height=160
                    )
                interp_class = gr.Dropdown(
                    class_options,
                    value=class_options[0],
                    label="Class",
                    filterable=True,
                    allow_custom_value=True,
                    visible=conditional,
                )
                with gr.Row():
                    frames = gr.Slider(*FRAMES_RANGE, value=8, step=1, label="Frames")
                    method = gr.Radio(list(INTERPOLATION_METHODS), value="spherical", label="Path")
                interp_guidance = gr.Slider(
                    *GUIDANCE_RANGE, value=config.default_guidance_scale, step=0.1, label="Guidance (seeds only)"
                )
                interp_button = gr.Button("Interpolate", variant="primary", elem_id="interpolate-button")
            with gr.Column():
                strip = gr.Image(label="Interpolation", format="png", interactive=False)

    # ------------------------------------------------------------------------------------------- handlers
    def check_generate(
        model: ModelRef,
        class_choice,
        count,
        scale,
        seed_value,
        guidance_target,
        guidance_schedule,
        attention_temperature,
        do_denoise,
        denoise_strength,
        sampler_name,
    ):
        pipe = loaded_pipeline(model)
        if pipe is not None:
            parse_class(pipe, class_choice)
            check_generation(
                pipe,
                count,
                scale,
                seed_value,
                guidance_target,
                guidance_schedule,
                attention_temperature,
                denoise_strength,
                sampler_name,
            )

    @model_call
    def on_generate(
        model: ModelRef,
        class_choice: str,
        count: float,
        scale: float,
        seed_value: float,
        guidance_target: str,
        guidance_schedule: str,
        attention_temperature: float,
        do_denoise: bool,
        denoise_strength: float,
        sampler_name: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's documented way to get a progress bar)
    ):
        pipe = load_pipeline(model)
        class_id = parse_class(pipe, class_choice)
        progress(0, desc="drawing prior noise")
        result = generate_images(
            pipe,
            class_id,
            count,
            scale,
            seed_value,
            guidance_target,
            guidance_schedule,
            attention_temperature,
            do_denoise,
            denoise_strength,
            sampler_name,
            on_block=lambda done, total, text: progress((done, total), desc=text, unit="blocks"),
        )
        config = pipe.transformer.config
        summary = (
            f"{len(result.images)} image(s) in **{result.seconds:.2f} s** "
            f"({result.seconds / len(result.images):.2f} s each) on {pipe.device.type}: {sampler_name} sampler, "
            f"{config.num_blocks} flow blocks, {result.transformer_passes} sequential transformer passes (patch by "
            f"patch: {config.num_blocks * (config.num_patches - 1)}){', denoised' if do_denoise else ''}."
        )
        return _generation_outputs(result, int(seed_value), model.name, summary)

    def check_analyze(model: ModelRef, drawing: Any, invert_mode: str, centre: bool):
        check_image_given(drawing)
        check_choice("invert", invert_mode, INVERT_CHOICES)

    @model_call
    def on_analyze(model: ModelRef, drawing: Any, invert_mode: str, centre: bool):
        pipe = load_pipeline(model)
        image = drawing.get("composite") if isinstance(drawing, dict) else drawing
        result = analyze_image(pipe, image, invert_mode, bool(centre))
        lines = [f"**{result.bits_per_dim:.3f} bits/dim** under the unconditional branch."]
        if result.best_class is not None:
            lines.append(
                f"Most likely class: **{result.best_class}**, {result.best_bits_per_dim:.3f} bits/dim under it."
            )
        elif pipe.transformer.config.num_classes:
            lines.append("(Too many classes to score each one on this hardware: no class probabilities.)")
        lines.append(
            f"Latent std {result.latent_std:.2f} (the prior's is 1; clean images, without the noise the model was "
            f"trained with, land nearer the centre). Decoding the latent gives the input back to within "
            f"{result.reconstruction_error:.2g} grey levels."
        )
        return (
            for_display(upscale(result.model_input), kind="model input"),
            result.bits_per_dim,
            result.probabilities,
            for_display(upscale(result.latent), kind="latent"),
            for_display(upscale(result.reconstruction), kind="decoded latent"),
            "\n\n".join(lines),
        )

    def check_interpolate(
        model: ModelRef,
        between,
        first_seed,
        second_seed,
        first_image,
        second_image,
        class_choice,
        count,
        path,
        scale,
        invert_mode,
        centre,
    ):
        between = check_choice("interpolate between", between, INTERPOLATION_SOURCES)
        count = check_number("number of frames", count, *FRAMES_RANGE, integer=True)
        check_choice("interpolation", path, INTERPOLATION_METHODS)
        if between == "two images" and (first_image is None or second_image is None):
            raise ValueError("upload two images to interpolate between them")
        pipe = loaded_pipeline(model)
        if pipe is not None:
            parse_class(pipe, class_choice)
            if between == "two seeds":
                for value in (first_seed, second_seed):
                    check_number("seed", value, 0, MAX_SEED, integer=True)
                scale = check_number("guidance scale", scale, *GUIDANCE_RANGE)
                per_frame = sampling_rows(pipe, "sequential", 1, scale != 1)
                check_budget(per_frame * count, per_frame, "frames")

    @model_call
    def on_interpolate(
        model: ModelRef,
        between: str,
        first_seed: float,
        second_seed: float,
        first_image: Any,
        second_image: Any,
        class_choice: str,
        count: float,
        path: str,
        scale: float,
        invert_mode: str,
        centre: bool,
    ):
        pipe = load_pipeline(model)
        images = interpolate(
            pipe,
            between,
            parse_class(pipe, class_choice),
            count,
            path,
            seeds=(first_seed, second_seed),
            images=(first_image, second_image),
            guidance_scale=scale,
            invert=invert_mode,
            center=bool(centre),
        )
        return for_display(
            make_grid([upscale(image, 96) for image in images], columns=len(images)), kind="interpolation"
        )

    _wire_generation(
        generate_button,
        check_generate,
        on_generate,
        [model_state, class_box, num_images, guidance, seed, target, schedule, temperature, denoise, strength, sampler],
        trajectory,
        random_button,
        seed,
    )
    guarded(
        analyze_button.click,
        check_analyze,
        on_analyze,
        [model_state, sketch, invert, center],
        [fitted, bits, probabilities, latent, reconstruction, details],
        "analyze",
        **MODEL_EVENTS,
    )
    guarded(
        interp_button.click,
        check_interpolate,
        on_interpolate,
        [
            model_state,
            source,
            seed_a,
            seed_b,
            image_a,
            image_b,
            interp_class,
            frames,
            method,
            interp_guidance,
            invert,
            center,
        ],
        [strip],
        "interpolate",
        **MODEL_EVENTS,
    )

    def page_updates(pipe: TarFlowPipeline) -> tuple[Any, ...]:
        cfg = pipe.transformer.config
        options = [*class_choices(pipe), UNCONDITIONAL_CHOICE] if cfg.num_classes else [UNCONDITIONAL_CHOICE]
        return (
            gr.Dropdown(choices=options, value=options[0], visible=cfg.num_classes > 0),
            gr.Dropdown(choices=options, value=options[0], visible=cfg.num_classes > 0),
            gr.Slider(value=cfg.default_guidance_scale),
            gr.Slider(value=cfg.default_guidance_scale),
            gr.Checkbox(value=cfg.num_channels == 1),
            gr.Label(value=None, visible=cfg.num_classes > 0),
        )

    _wire_model_loading(
        header,
        "tarflow",
        page_updates,
        [class_box, interp_class, guidance, interp_guidance, center, probabilities],
        trajectory,
    )


_ESTIMATORS: dict[str, TimeEstimator] = {}
_CALIBRATIONS: dict[str, Calibration] = {}


def estimator_for(model: ModelRef) -> TimeEstimator:
    return _ESTIMATORS.setdefault(model.location, TimeEstimator())


def _starflow_page(pipe: StarFlowPipeline, header: tuple[Any, ...]) -> None:
    catalog, model_state = header[:2]
    config = pipe.transformer.config
    startup = catalog.startup
    if startup.location not in _CALIBRATIONS:
        _CALIBRATIONS[startup.location] = calibrate_starflow(pipe, estimator_for(startup))
    calibration = _CALIBRATIONS[startup.location]
    default_images = 1

    def generation_estimate(model: ModelRef, count: Any, sampler_name: Any, scale: Any) -> str:
        try:
            count = check_number("number of images", count, 1, MAX_IMAGES, integer=True)
            sampler_name = check_choice("sampler", sampler_name, STARFLOW_SAMPLERS)
            scale = check_number("guidance scale", scale, *STARFLOW_GUIDANCE_RANGE)
            pipe = loaded_pipeline(model)
            if pipe is not None:
                check_sampling_budget(pipe, sampler_name, count, scale != 1)
        except ValueError as error:
            return f"Not possible as set: {error}."
        what = f"{count} image(s) with the {sampler_name} sampler"
        return describe_estimate(estimator_for(model).sampling_seconds(sampler_name, count), what)

    def ranking_estimate(model: ModelRef, captions_text: Any) -> str:
        try:
            captions = parse_captions(captions_text)
        except ValueError as error:
            return f"Not possible yet: {error}."
        what = f"ranking {len(captions)} captions"
        return describe_estimate(estimator_for(model).ranking_seconds(len(captions)), what)

    with gr.Tab("Generate"), gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(
                value=PROMPT_EXAMPLES[0], label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt"
            )
            gr.Examples([[text] for text in PROMPT_EXAMPLES], inputs=[prompt], label="Example prompts")
            num_images = gr.Slider(1, MAX_IMAGES, value=default_images, step=1, label="Number of images")
            guidance = gr.Slider(
                *STARFLOW_GUIDANCE_RANGE,
                value=config.default_guidance_scale,
                step=0.1,
                label="Guidance scale (1 = none)",
            )
            with gr.Row(equal_height=True):
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=3)
                random_button = gr.Button("Random seed", scale=1, elem_id="random-seed")
            with gr.Accordion("Advanced", open=False):
                sampler = gr.Radio(
                    list(STARFLOW_SAMPLERS),
                    value=calibration.default_sampler,
                    label="Sampler",
                    info=calibration.summary().replace("**", ""),
                )
                denoise = gr.Checkbox(value=True, label="Denoise (one score step)")
                temperature = gr.Slider(*TEMPERATURE_RANGE, value=1.0, step=0.05, label="Attention temperature")
            estimate = gr.Markdown(
                generation_estimate(
                    startup, default_images, calibration.default_sampler, config.default_guidance_scale
                ),
                elem_id="estimate",
            )
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
        with gr.Column(scale=2):
            trajectory = _trajectory_outputs(config.num_blocks)

    with gr.Tab("Likelihood"):
        gr.Markdown(RANKING_HELP)
        with gr.Row():
            with gr.Column():
                upload = ImageUpload(label="Image", type="pil", image_mode=None, sources=["upload", "clipboard"])
                captions = gr.Textbox(
                    value="\n".join(PROMPT_EXAMPLES[:3]), label="Candidate captions, one per line", lines=5
                )
                rank_estimate = gr.Markdown(
                    ranking_estimate(startup, "\n".join(PROMPT_EXAMPLES[:3])), elem_id="rank-estimate"
                )
                rank_button = gr.Button("Rank the captions", variant="primary", elem_id="rank-button")
            with gr.Column():
                fitted = gr.Image(label="Model input", format="png", interactive=False)
                ranking = gr.Label(label="p(caption | image), Bayes' rule", num_top_classes=MAX_CAPTIONS)
                details = gr.Markdown()

    # ------------------------------------------------------------------------------------------- handlers
    def check_generate(model: ModelRef, text, count, scale, seed_value, sampler_name, do_denoise, temp):
        pipe = loaded_pipeline(model)
        if pipe is not None:
            check_starflow_generation(pipe, text, count, scale, seed_value, sampler_name)
            check_number("attention temperature", temp, *TEMPERATURE_RANGE)

    @model_call
    def on_generate(
        model: ModelRef,
        text: str,
        count: float,
        scale: float,
        seed_value: float,
        sampler_name: str,
        do_denoise: bool,
        temp: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's documented way to get a progress bar)
    ):
        pipe = load_pipeline(model)
        progress(0, desc="encoding the prompt, drawing prior noise")
        result = generate_starflow(
            pipe,
            text,
            count,
            scale,
            seed_value,
            sampler_name,
            denoise=bool(do_denoise),
            attention_temperature=temp,
            on_block=lambda done, total, desc: progress((done, total), desc=desc, unit="blocks"),
        )
        estimator_for(model).observe_sampling(sampler_name, len(result.images), result.seconds)
        summary = (
            f"{len(result.images)} image(s) in **{result.seconds:.2f} s** "
            f"({result.seconds / len(result.images):.2f} s each) on {pipe.device.type}: {sampler_name} sampler, "
            f"{pipe.transformer.config.num_blocks} flow blocks, {result.transformer_passes} sequential transformer "
            f"passes{', denoised' if do_denoise else ''}."
        )
        return _generation_outputs(result, int(seed_value), model.name, summary)

    def check_rank(model: ModelRef, image: Any, captions_text: Any):
        check_image_given(image)
        found = parse_captions(captions_text)
        pipe = loaded_pipeline(model)
        if pipe is not None:
            check_budget(ranking_rows(pipe, len(found)), ranking_rows(pipe, 1), "captions")

    @model_call
    def on_rank(model: ModelRef, image: Any, captions_text: Any):
        pipe = load_pipeline(model)
        check_image_given(image)
        start = time.perf_counter()
        result = rank_captions(pipe, image, captions_text)
        seconds = time.perf_counter() - start
        estimator_for(model).observe_ranking(len(result.probabilities), seconds)
        details_text = (
            f"Best caption: **{result.best}** ({result.probabilities[result.best]:.1%}); the image's latent has "
            f"{result.bits_per_dim:.3f} bits/dim under it. {len(result.probabilities)} captions ranked in "
            f"{seconds:.2f} s."
        )
        shown = for_display(upscale(result.model_input, 256), kind="model input")
        return shown, result.probabilities, details_text

    estimate_inputs = [model_state, num_images, sampler, guidance]
    for component in (num_images, sampler, guidance):
        component.change(
            generation_estimate,
            estimate_inputs,
            estimate,
            queue=False,
            show_progress="hidden",
            api_name=False if component is not num_images else "estimate",
        )
    captions.change(
        ranking_estimate,
        [model_state, captions],
        rank_estimate,
        queue=False,
        show_progress="hidden",
        api_name="estimate_ranking",
    )
    _wire_generation(
        generate_button,
        check_generate,
        on_generate,
        [model_state, prompt, num_images, guidance, seed, sampler, denoise, temperature],
        trajectory,
        random_button,
        seed,
        after=lambda event: event.success(
            generation_estimate, estimate_inputs, estimate, queue=False, show_progress="hidden", api_name=False
        ),
    )
    guarded(
        rank_button.click,
        check_rank,
        on_rank,
        [model_state, upload, captions],
        [fitted, ranking, details],
        "rank",
        **MODEL_EVENTS,
    )

    _wire_model_loading(
        header,
        "starflow",
        lambda pipe: (gr.Slider(value=pipe.transformer.config.default_guidance_scale),),
        [guidance],
        trajectory,
    )


def theme() -> gr.themes.Base:
    # System fonts: the stock themes fetch web fonts, which an offline machine (or a test browser) cannot reach.
    return gr.themes.Soft(
        primary_hue="indigo",
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


def launch(demo: gr.Blocks, **kwargs: Any) -> Any:
    """`demo.launch` with the demo's theme and upload size limit (MAX_UPLOAD_MB) unless given otherwise."""
    kwargs.setdefault("max_file_size", f"{MAX_UPLOAD_MB}mb")
    kwargs.setdefault("theme", theme())
    return demo.launch(**kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Serve the TarFlow / STARFlow demo (settings: see app.py's docstring)."
    )
    parser.add_argument("model", nargs="?", help="pipeline folder or Hub id (default: $TARFLOW_MODEL, then bundled)")
    parser.add_argument(
        "--allow-model-change",
        action="store_true",
        default=None,
        help="let visitors load Hub ids and folders under --model-root (default: $TARFLOW_ALLOW_MODEL_CHANGE, off)",
    )
    parser.add_argument(
        "--model-root", help="folder of pipeline folders visitors may load (default: $TARFLOW_MODEL_ROOT)"
    )
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    return parser.parse_args(argv)


def configure_logging() -> None:
    """One line per event: the demo's INFO messages, no progress bars from loading, no per-request HTTP lines."""
    import diffusers.utils.logging
    import transformers.utils.logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()
    demo = build_demo(args.model, allow_model_change=args.allow_model_change, model_root=args.model_root)
    launch(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main(sys.argv[1:])
