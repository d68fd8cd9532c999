"""`tarflow-hf sample`: draw images from a TarFlow pipeline and write them as one captioned grid.

Example:

```bash
tarflow-hf sample path/to/pipeline --class-label 207 --class-label "tabby" --num-images 4 \
    --guidance-scale 3 --seed 0 --output grid.png
```

Image i is drawn from its own generator seeded `seed + i`, so a seed gives the same images whatever the device
(noise is drawn on the CPU) and however many images are asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import ImageDraw, ImageFont
from transformers.utils import logging as transformers_logging

from .arguments import sample as add_arguments  # noqa: F401 (re-exported: the sub-command's arguments)
from .cli import CommandError
from .fileio import atomic_file
from .hub import REPO_ID
from .labels import display_name, parse_label, resolve_class_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PADDING = 2


def run(args: argparse.Namespace) -> int:
    output = _check_output(args.output)
    if args.num_images < 1:
        raise CommandError(f"--num-images must be >= 1, got {args.num_images}")
    if args.seed is not None and not 0 <= args.seed < 2**62:
        raise CommandError(f"--seed must be between 0 and 2**62, got {args.seed}")
    if args.columns is not None and args.columns < 1:
        raise CommandError(f"--columns must be >= 1, got {args.columns}")
    for flag, value in (("--guidance-scale", args.guidance_scale), ("--noise-std", args.noise_std)):
        if value is not None and not math.isfinite(value):
            raise CommandError(f"{flag} must be a finite number, got {value}")
    device = _device(args.device)
    labels = [parse_label(label) for label in args.class_labels or []]
    # Not torch's global generator: it starts from the same seed in every process.
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    with _progress_bars(enabled=not args.quiet):
        pipe = _load(args.model, args.revision, DTYPES[args.dtype]).to(device)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    ids = _class_ids(pipe, labels)
    num_images = (len(ids) if ids else 1) * args.num_images
    generator = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    try:
        images = pipe(
            class_labels=ids,
            num_images_per_label=args.num_images,
            guidance_scale=args.guidance_scale,
            guidance_target=args.guidance_target,
            guidance_schedule=args.guidance_schedule,
            attention_temperature=args.attention_temperature,
            sampler=args.sampler,
            jacobi_tolerance=args.jacobi_tolerance,
            jacobi_window=args.jacobi_window,
            denoise=args.denoise,
            noise_std=args.noise_std,
            generator=generator,
        ).images
    except FloatingPointError as error:
        raise CommandError(str(error)) from None

    captions = None
    if args.captions and pipe.transformer.config.num_classes:
        captions = [_caption(pipe, class_id) for class_id in ids or [-1] for _ in range(args.num_images)]
    columns = args.columns or (args.num_images if ids and len(ids) > 1 else math.ceil(math.sqrt(num_images)))
    grid = make_grid(images, columns, captions)
    with atomic_file(output) as temporary:  # readers never see a half-written file
        grid.save(temporary, format=PIL.Image.registered_extensions()[output.suffix.lower()])
    print(f"wrote {output} ({num_images} image{'s' if num_images != 1 else ''}, seed {seed})")
    return 0


def make_grid(images: list[PIL.Image.Image], columns: int, captions: list[str] | None = None) -> PIL.Image.Image:
    """Tile images row by row on a white background, with a caption under each when given (PIL's default font).
    Cells widen to fit the longest caption."""
    font = ImageFont.load_default()
    width = images[0].width
    caption_height = 0
    if captions:
        boxes = [font.getbbox(text) for text in captions]
        width = max(width, *(box[2] - box[0] + 2 * PADDING for box in boxes))
        caption_height = max(box[3] for box in boxes) + 2 * PADDING
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = width + PADDING, images[0].height + caption_height + PADDING
    grid = PIL.Image.new("RGB", (columns * cell_w + PADDING, rows * cell_h + PADDING), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        left = PADDING + (index % columns) * cell_w
        top = PADDING + (index // columns) * cell_h
        grid.paste(image.convert("RGB"), (left + (width - image.width) // 2, top))
        if captions:
            text_width = draw.textlength(captions[index], font=font)
            draw.text((left + (width - text_width) / 2, top + image.height + PADDING), captions[index], "black", font)
    return grid


def _check_output(path: str) -> Path:
    output = Path(path)
    if output.is_dir():
        raise CommandError(f"--output {path!r} is a folder; give an image file name")
    extensions = PIL.Image.registered_extensions()
    if output.suffix.lower() not in extensions:
        common = ", ".join(ext for ext in (".png", ".jpg", ".webp", ".bmp", ".tiff") if ext in extensions)
        raise CommandError(f"--output {path!r} has no image extension PIL can write; use one of {common}")
    return output


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Loading bars of diffusers and transformers on or off, restored afterwards (they are process-wide)."""
    libraries = (diffusers_logging, transformers_logging)
    before = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.enable_progress_bar() if enabled else library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_enabled in zip(libraries, before, strict=True):
            library.enable_progress_bar() if was_enabled else library.disable_progress_bar()


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a torch device (for example cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return device


def _load(model: str, revision: str | None, dtype: torch.dtype) -> Any:
    from . import BUNDLED_MODEL
    from .pipeline_tarflow import TarFlowPipeline

    if model == "bundled":
        model = BUNDLED_MODEL
        if not Path(model).is_dir():
            raise CommandError(f"the bundled model is missing from this installation ({model}); reinstall tarflow-hf")
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CommandError(
                f"MODEL {model!r} is not a pipeline folder (no model_index.json); make one with "
                "TarFlowPipeline.save_pretrained or `tarflow-hf convert`"
            )
    elif not REPO_ID.match(model):
        raise CommandError(f"MODEL {model!r} is neither an existing folder nor a Hub repo id (owner/name)")
    try:
        return TarFlowPipeline.from_pretrained(model, revision=revision, dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"could not load {model!r}: {first_line}") from None


def _class_ids(pipe: Any, labels: list[int | str]) -> list[int] | None:
    """`--class-label` values (ids and names, mixed) -> class ids, through the package's one label path."""
    if not labels:
        return None
    num_classes = pipe.transformer.config.num_classes
    if not num_classes:
        raise CommandError("this model is unconditional (num_classes=0); drop --class-label")
    return resolve_class_ids(pipe.id2label, num_classes, labels)


def _caption(pipe: Any, class_id: int) -> str:
    return display_name(pipe.id2label, class_id)
