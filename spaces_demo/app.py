"""TarFlow demo (a Gradio app, also a Hugging Face Space).

Three things a normalizing flow can show: it samples images (block by block, with classifier-free guidance), it
gives the exact likelihood of any image (bits per dimension, and class probabilities by Bayes' rule), and it maps
images to latents and back without loss (so latent interpolation is exact at the ends).

    python spaces_demo/app.py                              # the MNIST model bundled with tarflow-hf
    TARFLOW_MODEL=path/or/hub-id python spaces_demo/app.py  # any TarFlow pipeline folder or Hub repository

Settings (environment variables, all optional):

- `TARFLOW_MODEL`: the model loaded at start (default: `tarflow_hf.BUNDLED_MODEL`).
- `TARFLOW_ALLOW_MODEL_CHANGE`: `0` hides the "load another model" field (default `1`).
- `TARFLOW_DEVICE` / `TARFLOW_DTYPE`: default `cuda` when available, else `cpu`; `float32`.
- `TARFLOW_CONCURRENCY`: model calls that run at once (default 1); `TARFLOW_QUEUE_SIZE`: requests that may wait
  (default 32; more are turned away with "queue is full").
- `TARFLOW_MAX_IMAGES`: images per request (default 16); `TARFLOW_MAX_CLASSIFY`: the largest number of classes the
  Bayes classifier scores (one forward pass per class; default 1000 on GPU, 100 on CPU).
- `TARFLOW_TORCH_THREADS`: CPU threads for torch.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
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
    from tarflow_hf.labels import id_from_text, menu_names
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


def resolve_model(model: str) -> str:
    """A model reference as typed -> a local folder (absolute) or a Hub id; ValueError when it is neither."""
    model = (model or "").strip()
    if not model:
        raise ValueError("no model given: type a local pipeline folder or a Hub id such as `owner/name`")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model!r} is not a TarFlow pipeline folder (it has no model_index.json)")
        return str(path.resolve())
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        return model
    raise ValueError(f"no folder at {model!r}, and it is not a Hub id (`owner/name`)")


_PIPELINES: OrderedDict[str, TarFlowPipeline] = OrderedDict()
_PIPELINES_LOCK = threading.Lock()


def load_pipeline(model: str) -> TarFlowPipeline:
    """The pipeline for `model` (see `resolve_model`), loaded once and kept (the most recently used few)."""
    key = resolve_model(model)
    with _PIPELINES_LOCK:
        if key in _PIPELINES:
            _PIPELINES.move_to_end(key)
            return _PIPELINES[key]
    # Loaded outside the lock: a slow Hub download must not block sessions using models already loaded.
    device = default_device()
    dtype = getattr(torch, os.environ.get("TARFLOW_DTYPE", "float32"))
    try:
        pipe = TarFlowPipeline.from_pretrained(key, dtype=dtype).to(device)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"could not load a TarFlow pipeline from {key!r}: {first_line}") from error
    pipe.set_progress_bar_config(disable=True)
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.setdefault(key, pipe)
        _PIPELINES.move_to_end(key)
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


def describe(pipe: TarFlowPipeline, model: str) -> str:
    config = pipe.transformer.config
    classes = f"{config.num_classes} classes" if config.num_classes else "unconditional"
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    size = f"{parameters / 1e6:.1f}M" if parameters >= 100_000 else f"{parameters:,}"
    return (
        f"**Model** `{Path(model).name or model}`: {config.image_size}x{config.image_size}x{config.num_channels}, "
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


def tile(images: list[PIL.Image.Image], columns: int | None = None, gap: int = 2) -> PIL.Image.Image:
    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    size = (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap)
    grid = PIL.Image.new(images[0].mode, size, "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * (width + gap), (index // columns) * (height + gap)))
    return grid


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

    - Transparency is flattened onto white (as Gradio flattens drawings).
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
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
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


# -------------------------------------------------------------------------------------------------- work
def _frame(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """One trajectory frame: all images of a request side by side (4 a row), each enlarged."""
    return tile([upscale(image, DISPLAY_SIZE // 2) for image in images])


@dataclass
class Generation:
    images: list[PIL.Image.Image]
    frames: list[tuple[str, PIL.Image.Image]]  # (caption, all images enlarged and tiled) per sampling step
    seconds: float
    transformer_passes: int  # transformer evaluations that ran one after another


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
    num_images = check_number("number of images", num_images, 1, MAX_IMAGES, integer=True)
    guidance_scale = check_number("guidance scale", guidance_scale, *GUIDANCE_RANGE)
    seed = check_number("seed", seed, 0, MAX_SEED, integer=True)
    guidance_target = check_choice("guidance target", guidance_target, GUIDANCE_TARGETS)
    guidance_schedule = check_choice("guidance schedule", guidance_schedule, GUIDANCE_SCHEDULES)
    attention_temperature = check_number("attention temperature", attention_temperature, *TEMPERATURE_RANGE)
    denoise_strength = check_number("denoising strength", denoise_strength, *DENOISE_STRENGTH_RANGE)
    sampler = check_choice("sampler", sampler, SAMPLERS)
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


def build_demo(
    model: str | None = None, concurrency_limit: int | None = None, queue_size: int | None = None
) -> gr.Blocks:
    """The app, with its queue configured. `model` defaults to $TARFLOW_MODEL, then the bundled MNIST model;
    `concurrency_limit` / `queue_size` to $TARFLOW_CONCURRENCY / $TARFLOW_QUEUE_SIZE (1 / 32).

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
    model = resolve_model(model)
    pipe = load_pipeline(model)
    config = pipe.transformer.config
    allow_change = os.environ.get("TARFLOW_ALLOW_MODEL_CHANGE", "1").strip() not in ("0", "false", "no")
    conditional = config.num_classes > 0
    choices = class_choices(pipe)
    class_options = [*choices, UNCONDITIONAL_CHOICE] if conditional else [UNCONDITIONAL_CHOICE]
    canvas = min(512, max(280, 2 * config.image_size))

    # Output files are cached per response (see for_display): every 30 minutes drop those older than an hour.
    with gr.Blocks(title="TarFlow demo", delete_cache=(1800, 3600)) as demo:
        model_state = gr.State(model)
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            model_box = gr.Textbox(
                value=model,
                label="Model: a local pipeline folder or a Hub id (a converted AFHQ or ImageNet TarFlow works too)",
                scale=4,
                interactive=allow_change,
            )
            load_button = gr.Button("Load model", scale=1, visible=allow_change)
        model_info = gr.Markdown(describe(pipe, model))

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
                    *GUIDANCE_RANGE,
                    value=config.default_guidance_scale,
                    step=0.1,
                    label="Guidance scale (1 = none)",
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
                gallery = gr.Gallery(
                    label="Samples", columns=4, format="png", object_fit="contain", elem_id="samples", height=330
                )
                timing = gr.Markdown(elem_id="timing")
                frames_state = gr.State([])
                step_slider = gr.Slider(
                    0, config.num_blocks + 1, value=0, step=1, label="Sampling step (0 = noise)", interactive=True
                )
                step_image = gr.Image(
                    label="The images forming, block by block",
                    format="png",
                    interactive=False,
                    height=240,
                    elem_id="trajectory",
                )

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
                    probabilities = gr.Label(
                        label="p(class | image), Bayes' rule", num_top_classes=5, visible=conditional
                    )
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
                        image_a = ImageUpload(label="Image A", type="pil", sources=["upload", "clipboard"], height=160)
                        image_b = ImageUpload(label="Image B", type="pil", sources=["upload", "clipboard"], height=160)
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

        # --------------------------------------------------------------------------------------- handlers
        @model_call
        def on_generate(
            model_key: str,
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
            pipe = load_pipeline(model_key)
            progress(0, desc="drawing prior noise")
            result = generate_images(
                pipe,
                parse_class(pipe, class_choice),
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
            seed_int = int(seed_value)
            gallery_items = [
                (for_display(upscale(image), seed=seed_int + i, model=Path(model_key).name), f"seed {seed_int + i}")
                for i, image in enumerate(result.images)
            ]
            last = len(result.frames) - 1
            per_image = result.seconds / len(result.images)
            config = pipe.transformer.config
            summary = (
                f"{len(result.images)} image(s) in **{result.seconds:.2f} s** ({per_image:.2f} s each) on "
                f"{pipe.device.type}: {sampler_name} sampler, {config.num_blocks} flow blocks, "
                f"{result.transformer_passes} sequential transformer passes (patch by patch: "
                f"{config.num_blocks * (config.num_patches - 1)}){', denoised' if do_denoise else ''}."
            )
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

        @model_call
        def on_analyze(model_key: str, drawing: Any, invert_mode: str, centre: bool):
            pipe = load_pipeline(model_key)
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

        @model_call
        def on_interpolate(
            model_key: str,
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
            pipe = load_pipeline(model_key)
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
                tile([upscale(image, 96) for image in images], columns=len(images)), kind="interpolation"
            )

        @model_call
        def on_load(text: str):
            key = resolve_model(text)
            pipe = load_pipeline(key)
            cfg = pipe.transformer.config
            options = [*class_choices(pipe), UNCONDITIONAL_CHOICE] if cfg.num_classes else [UNCONDITIONAL_CHOICE]
            dropdown = gr.Dropdown(choices=options, value=options[0], visible=cfg.num_classes > 0)
            guidance_update = gr.Slider(value=cfg.default_guidance_scale)
            return (
                key,
                key,
                describe(pipe, key),
                dropdown,
                gr.Dropdown(choices=options, value=options[0], visible=cfg.num_classes > 0),
                guidance_update,
                gr.Slider(value=cfg.default_guidance_scale),
                gr.Checkbox(value=cfg.num_channels == 1),
                gr.Label(value=None, visible=cfg.num_classes > 0),
                gr.Slider(maximum=cfg.num_blocks + 1, value=0, label="Sampling step (0 = noise)"),
                [],
            )

        model_events = {"concurrency_id": "model"}
        generate_button.click(
            on_generate,
            [
                model_state,
                class_box,
                num_images,
                guidance,
                seed,
                target,
                schedule,
                temperature,
                denoise,
                strength,
                sampler,
            ],
            [gallery, timing, frames_state, step_slider, step_image],
            api_name="generate",
            **model_events,
        )
        step_slider.release(
            on_step, [frames_state, step_slider], [step_slider, step_image], api_name="show_step", queue=False
        )
        random_button.click(
            lambda: random.randint(0, MAX_SEED), None, seed, api_name="random_seed", queue=False, show_progress="hidden"
        )
        analyze_button.click(
            on_analyze,
            [model_state, sketch, invert, center],
            [fitted, bits, probabilities, latent, reconstruction, details],
            api_name="analyze",
            **model_events,
        )
        interp_button.click(
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
            strip,
            api_name="interpolate",
            **model_events,
        )
        load_button.click(
            on_load,
            model_box,
            [
                model_state,
                model_box,
                model_info,
                class_box,
                interp_class,
                guidance,
                interp_guidance,
                center,
                probabilities,
                step_slider,
                frames_state,
            ],
            api_name="load_model" if allow_change else False,
            **model_events,
        )

    concurrency = concurrency_limit or _env_int("TARFLOW_CONCURRENCY", 1)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size or _env_int("TARFLOW_QUEUE_SIZE", 32))
    return demo


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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch(build_demo())
