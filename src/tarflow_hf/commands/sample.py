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
import math
import os
import secrets
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..fileio import atomic_file
from ..grids import make_grid
from ..labels import display_name, parse_label, resolve_class_ids
from ..registry import AutoFlowPipeline, loading_progress_bars
from . import CommandError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(args: argparse.Namespace) -> int:
    output = _check_output(args.output)
    if args.num_images < 1:
        raise CommandError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed is not None and not 0 <= args.seed < 2**62:
        raise CommandError(f"--seed must be between 0 and 2**62, got {args.seed}")
    if args.columns is not None and args.columns < 1:
        raise CommandError(f"--columns must be >= 1, got {args.columns}")
    for flag, value in (("--guidance-scale", args.guidance_scale), ("--noise-std", args.noise_std)):
        if value is not None and not math.isfinite(value):
            raise CommandError(f"{flag} must be a finite number, got {value}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be >= 1, got {value}")
    if args.prompts and args.class_labels:
        raise CommandError("give --prompt (text-to-image STARFlow models) or --class-label (TarFlow models), not both")
    if args.negative_prompts and not args.prompts:
        raise CommandError("--negative-prompt goes with --prompt")
    if args.negative_prompts and len(args.negative_prompts) not in (1, len(args.prompts)):
        raise CommandError(
            f"give one --negative-prompt, or one per --prompt ({len(args.prompts)}); got {len(args.negative_prompts)}"
        )
    device = _device(args.device)
    labels = [parse_label(label) for label in args.class_labels or []]
    # Not torch's global generator: it starts from the same seed in every process.
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    with loading_progress_bars(enabled=not args.quiet):
        pipe = AutoFlowPipeline.from_pretrained(args.model, revision=args.revision, dtype=DTYPES[args.dtype])
    _check_weights(pipe.transformer, args.model)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    if _is_text_to_image(pipe):
        images, captions, groups = _sample_text_to_image(pipe, args, seed)
    else:
        images, captions, groups = _sample_class_conditional(pipe, args, labels, seed)

    num_images = len(images)
    columns = args.columns or (args.num_images if groups > 1 else math.ceil(math.sqrt(num_images)))
    grid = make_grid(images, columns, captions if args.captions else None)
    try:
        with atomic_file(output) as temporary:  # readers never see a half-written file
            grid.save(temporary, format=PIL.Image.registered_extensions()[output.suffix.lower()])
    except OSError as error:  # a full disk, a permission refused...: the user's environment, not a bug
        raise CommandError(f"could not write --output {str(output)!r}: {error.strerror or error}") from None
    print(f"wrote {output} ({num_images} image{'s' if num_images != 1 else ''}, seed {seed})")
    return 0


def _batches(count: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _call(pipe: Any, args: argparse.Namespace, seed: int, batch: range, **kwargs: Any) -> list[PIL.Image.Image]:
    """The images of one batch: `pipe` with the sampling options both families take from the command line, image
    i drawn from a generator seeded `seed + i`, and the family's own `kwargs`."""
    try:
        return pipe(
            guidance_scale=args.guidance_scale,
            attention_temperature=args.attention_temperature,
            sampler=args.sampler,
            jacobi_tolerance=args.jacobi_tolerance,
            jacobi_window=args.jacobi_window,
            denoise=args.denoise,
            generator=[torch.Generator().manual_seed(seed + i) for i in batch],
            **kwargs,
        ).images
    except FloatingPointError as error:
        raise CommandError(str(error)) from None


def _sample_class_conditional(
    pipe: Any, args: argparse.Namespace, labels: list[int | str], seed: int
) -> tuple[list[PIL.Image.Image], list[str] | None, int]:
    """TarFlow: `--num-images` per class label (or unconditional), drawn `--batch-size` at a time; image i from a
    generator seeded `seed + i`, so the batch size changes nothing."""
    if args.prompts:
        raise CommandError("this TarFlow model is not text-to-image; drop --prompt (use --class-label)")
    if args.height is not None or args.width is not None:
        raise CommandError("--height/--width apply to STARFlow models; a TarFlow model has one image size")
    ids = _class_ids(pipe, labels)
    per_image = [class_id for class_id in ids for _ in range(args.num_images)] if ids else None
    num_images = len(per_image) if per_image else args.num_images
    images: list[PIL.Image.Image] = []
    for batch in _batches(num_images, args.batch_size):
        images += _call(
            pipe,
            args,
            seed,
            batch,
            class_labels=None if per_image is None else per_image[batch.start : batch.stop],
            num_images_per_label=1 if per_image else len(batch),
            guidance_target=args.guidance_target,
            guidance_schedule=args.guidance_schedule,
            noise_std=args.noise_std,
        )
    captions = None
    if pipe.transformer.config.num_classes:
        captions = [_caption(pipe, class_id) for class_id in ids or [-1] for _ in range(args.num_images)]
    return images, captions, len(ids) if ids else 1


def _sample_text_to_image(
    pipe: Any, args: argparse.Namespace, seed: int
) -> tuple[list[PIL.Image.Image], list[str], int]:
    """STARFlow: `--num-images` per `--prompt`, drawn `--batch-size` at a time, captioned with their prompts."""
    if args.class_labels:
        raise CommandError("this STARFlow model is text-to-image; give --prompt TEXT instead of --class-label")
    if not args.prompts:
        raise CommandError("this STARFlow model is text-to-image; give --prompt TEXT (repeat for several prompts)")
    tarflow_only = [
        flag
        for flag, given in (
            ("--noise-std", args.noise_std is not None),
            ("--guidance-target", args.guidance_target != "both"),
            ("--guidance-schedule", args.guidance_schedule != "constant"),
        )
        if given
    ]
    if tarflow_only:
        raise CommandError(f"{', '.join(tarflow_only)} apply to TarFlow models, not to this STARFlow model")
    prompts = [prompt for prompt in args.prompts for _ in range(args.num_images)]
    negatives = None
    if args.negative_prompts:
        per_prompt = args.negative_prompts * len(args.prompts) if len(args.negative_prompts) == 1 else None
        negatives = [negative for negative in per_prompt or args.negative_prompts for _ in range(args.num_images)]
    images: list[PIL.Image.Image] = []
    for batch in _batches(len(prompts), args.batch_size):
        try:
            images += _call(
                pipe,
                args,
                seed,
                batch,
                prompt=prompts[batch.start : batch.stop],
                negative_prompt=None if negatives is None else negatives[batch.start : batch.stop],
                height=args.height,
                width=args.width,
            )
        except ValueError as error:  # check_inputs: a size the model cannot take, ...
            raise CommandError(str(error).strip().splitlines()[0]) from None
    return images, prompts, len(args.prompts)


def _is_text_to_image(pipe: Any) -> bool:
    return hasattr(pipe, "text_encoder")


def _check_weights(model: torch.nn.Module, name: str) -> None:
    """NaN or infinite weights make every sample non-finite: say so up front, naming them, rather than let
    sampling fail with a message about numeric overflow."""
    from ..convert import non_finite_weights

    bad = non_finite_weights(model.state_dict())
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CommandError(f"the weights of {name!r} hold NaN or infinite values: {shown}; the model is broken")


def _check_output(path: str) -> Path:
    output = Path(path)
    if output.is_dir():
        raise CommandError(f"--output {path!r} is a folder; give an image file name")
    extensions = PIL.Image.registered_extensions()
    writable = [ext for ext, image_format in extensions.items() if image_format in PIL.Image.SAVE]
    if output.suffix.lower() not in writable:
        common = ", ".join(ext for ext in (".png", ".jpg", ".webp", ".bmp", ".tiff") if ext in writable)
        what = f"extension {output.suffix!r}" if output.suffix else "no extension"
        raise CommandError(f"--output {path!r}: PIL cannot write images with {what}; use one of {common}")
    existing = next(folder for folder in output.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise CommandError(f"--output {path!r} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise CommandError(f"--output {path!r} cannot be written: permission denied")
    return output


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
