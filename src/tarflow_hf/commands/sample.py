"""`tarflow-hf sample`: draw images from a TarFlow or STARFlow pipeline, into one captioned grid or a folder of images.

```bash
tarflow-hf sample path/to/pipeline --class-label 207 --class-label "tabby" --num-images 4 --seed 0 --output grid.png
tarflow-hf sample starflow-3b --prompt "a corgi" --num-images 1000 --output corgis/   # streamed, a file per image
accelerate launch -m tarflow_hf sample starflow-3b --prompt "a corgi" --num-images 1000 --output corgis/
```

Image i is drawn from its own generator seeded `seed + i`, so a seed gives the same images whatever the device (noise
is drawn on the CPU), the batch size, or the number of processes (`accelerate launch` splits the images between them
with accelerate's `split_between_processes`). A grid is refused before sampling when it would be too large to open;
a folder takes any number of images, written batch by batch (`000000.png`, ... and `metadata.jsonl` with each
file's caption, the layout of datasets' `imagefolder`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..fileio import atomic_file, write_text_atomic
from ..grids import MAX_GRID_PIXELS, grid_size, make_grid
from ..labels import display_name, parse_label, resolve_class_ids
from ..processes import process_state
from ..registry import AutoFlowPipeline, loading_progress_bars
from . import CommandError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FOLDER_METADATA = "metadata.jsonl"


@dataclass
class Item:
    """One image to draw: its index (seed offset), what conditions it, and its caption."""

    index: int
    condition: dict[str, Any]
    caption: str | None


def run(args: argparse.Namespace) -> int:
    state = process_state()
    _check_args(args)
    folder = _output_folder(args.output)
    output = None if folder else _check_output_file(args.output)
    device = _device(args.device) if state.num_processes == 1 else state.device
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)  # the global generator repeats

    with loading_progress_bars(enabled=not args.quiet and state.is_main_process):
        pipe = AutoFlowPipeline.from_pretrained(args.model, revision=args.revision, dtype=DTYPES[args.dtype])
    _check_weights(pipe.transformer, args.model)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet or not state.is_main_process, leave=False)
    items, groups = _text_items(pipe, args) if hasattr(pipe, "text_encoder") else _label_items(pipe, args)
    if hasattr(pipe, "check_image_size"):  # STARFlow: any size on its latent grid that fits in memory
        pipe.check_image_size(*reversed(_image_size(pipe, args)))
    if folder is None:
        columns = args.columns or (args.num_images if groups > 1 else math.ceil(math.sqrt(len(items))))
        _check_grid_fits(pipe, args, len(items), columns, [item.caption or "" for item in items])
    else:
        _check_folder_free(folder, items)
        state.wait_for_everyone()  # every process checks before any writes
        folder.mkdir(parents=True, exist_ok=True)
    options = _sampling_options(args)
    drawn: list[tuple[int, PIL.Image.Image]] = []
    with state.split_between_processes(items) as mine:
        for start in range(0, len(mine), args.batch_size):
            batch = mine[start : start + args.batch_size]
            images = _draw(pipe, batch, options, seed)
            if folder is not None:
                _write_images(folder, batch, images)
            else:
                drawn += [(item.index, image) for item, image in zip(batch, images, strict=True)]
    if folder is not None:
        state.wait_for_everyone()
        if state.is_main_process:
            _write_metadata(folder, items)
            print(f"wrote {len(items)} image{'s' if len(items) != 1 else ''} to {folder} (seed {seed})")
        return 0
    from accelerate.utils import gather_object

    drawn = sorted(gather_object(drawn) if state.num_processes > 1 else drawn, key=lambda pair: pair[0])
    if state.is_main_process:
        captions = [item.caption or "" for item in items] if args.captions and items[0].caption is not None else None
        _write_grid(output, make_grid([image for _, image in drawn], columns, captions))
        print(f"wrote {output} ({len(items)} image{'s' if len(items) != 1 else ''}, seed {seed})")
    return 0


# ------------------------------------------------------------------------------------------------- checks
def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value < 1:
            raise CommandError(f"{flag} must be >= 1, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2**62:
        raise CommandError(f"--seed must be between 0 and 2**62, got {args.seed}")
    if args.columns is not None and args.columns < 1:
        raise CommandError(f"--columns must be >= 1, got {args.columns}")
    for flag, value in (("--guidance-scale", args.guidance_scale), ("--denoise-strength", args.denoise_strength)):
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
    for flag, texts in (("--prompt", args.prompts or []), ("--negative-prompt", args.negative_prompts or [])):
        for number, text in enumerate(texts, start=1):
            _check_utf8(flag, number, text)


def _check_utf8(flag: str, number: int, text: str) -> None:
    """Command-line text Python could not decode reaches us as lone surrogates (`surrogateescape`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = os.fsencode(text[error.start])[0]
        raise CommandError(
            f"{flag} {number} is not UTF-8 text (byte 0x{byte:02x} at character {error.start}); pass the prompt in "
            "UTF-8 (check the terminal's or the file's encoding)"
        ) from None


def _output_folder(path: str) -> Path | None:
    """The folder `--output` names (an existing folder, or a path ending in a slash), else None (a grid file)."""
    output = Path(path)
    if output.is_dir() or path.endswith(("/", os.sep)):
        if output.exists() and not output.is_dir():
            raise CommandError(f"--output {path!r} is a file, not a folder")
        return output
    return None


def _check_folder_free(folder: Path, items: list[Item]) -> None:
    """Never overwrite what is already in the folder: the files this run would write must not exist yet."""
    taken = [name for name in (FOLDER_METADATA, *map(_file_name, items)) if (folder / name).exists()]
    if taken:
        shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise CommandError(f"--output {str(folder)!r} already holds {shown}; give a new or empty folder")


def _check_output_file(path: str) -> Path:
    output = Path(path)
    extensions = PIL.Image.registered_extensions()
    writable = [ext for ext, image_format in extensions.items() if image_format in PIL.Image.SAVE]
    if output.suffix.lower() not in writable:
        common = ", ".join(ext for ext in (".png", ".jpg", ".webp", ".bmp", ".tiff") if ext in writable)
        what = f"extension {output.suffix!r}" if output.suffix else "no extension"
        raise CommandError(
            f"--output {path!r}: PIL cannot write images with {what}; use one of {common}, or a folder (ending in /)"
        )
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
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CommandError(f"--device {name!r} cannot hold images to sample; use cpu, cuda, mps or xpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return device


def _check_weights(model: torch.nn.Module, name: str) -> None:
    """NaN or infinite weights make every sample non-finite: say so up front, naming them, rather than let
    sampling fail with a message about numeric overflow."""
    from ..convert import non_finite_weights

    bad = non_finite_weights(model.state_dict())
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CommandError(f"the weights of {name!r} hold NaN or infinite values: {shown}; the model is broken")


def _check_grid_fits(pipe: Any, args: argparse.Namespace, count: int, columns: int, captions: list[str]) -> None:
    """Refuse, before sampling, a grid too large to be opened again."""
    size = _image_size(pipe, args)
    width, height = grid_size(count, columns, size, captions if args.captions else None)
    if width * height > MAX_GRID_PIXELS:
        raise CommandError(
            f"a grid of {count} images of {size[0]}x{size[1]} is {width}x{height} pixels, over the {MAX_GRID_PIXELS:,} "
            "an image can have to be opened again; write them to a folder instead: --output FOLDER/ (streamed in "
            "batches, any number of images)"
        )


def _image_size(pipe: Any, args: argparse.Namespace) -> tuple[int, int]:
    config = pipe.transformer.config
    if hasattr(pipe, "text_encoder"):
        side = config.sample_size * pipe.vae_scale_factor
        return args.width or side, args.height or side
    return config.image_size, config.image_size


# ------------------------------------------------------------------------------------------------ what to draw
def _label_items(pipe: Any, args: argparse.Namespace) -> tuple[list[Item], int]:
    """TarFlow: `--num-images` per class label (or unconditional), captioned with the class names."""
    if args.prompts:
        raise CommandError("this TarFlow model is not text-to-image; drop --prompt (use --class-label)")
    if args.height is not None or args.width is not None:
        raise CommandError("--height/--width apply to STARFlow models; a TarFlow model has one image size")
    num_classes = pipe.transformer.config.num_classes
    labels = [parse_label(label) for label in args.class_labels or []]
    if labels and not num_classes:
        raise CommandError("this model is unconditional (num_classes=0); drop --class-label")
    ids = resolve_class_ids(pipe.id2label, num_classes, labels) if labels else [None]
    items = [
        Item(
            index * args.num_images + copy,
            {"class_labels": None if class_id is None else [class_id]},
            display_name(pipe.id2label, -1 if class_id is None else class_id) if num_classes else None,
        )
        for index, class_id in enumerate(ids)
        for copy in range(args.num_images)
    ]
    return items, len(ids)


def _text_items(pipe: Any, args: argparse.Namespace) -> tuple[list[Item], int]:
    """STARFlow: `--num-images` per `--prompt`, captioned with their prompts."""
    if args.class_labels:
        raise CommandError("this STARFlow model is text-to-image; give --prompt TEXT instead of --class-label")
    if not args.prompts:
        raise CommandError("this STARFlow model is text-to-image; give --prompt TEXT (repeat for several prompts)")
    negatives = args.negative_prompts or [None]
    negatives = negatives * len(args.prompts) if len(negatives) == 1 else negatives
    items = [
        Item(
            index * args.num_images + copy,
            {"prompt": prompt, "negative_prompt": negative, "height": args.height, "width": args.width},
            prompt,
        )
        for index, (prompt, negative) in enumerate(zip(args.prompts, negatives, strict=True))
        for copy in range(args.num_images)
    ]
    return items, len(args.prompts)


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline arguments both families take from the command line."""
    denoise = args.denoise if args.denoise_strength is None or not args.denoise else args.denoise_strength
    return {
        "guidance_scale": args.guidance_scale,
        "guidance_rule": args.guidance_rule,
        "attention_temperature": args.attention_temperature,
        "sampler": args.sampler,
        "denoise": denoise,
    }


def _draw(pipe: Any, batch: list[Item], options: dict[str, Any], seed: int) -> list[PIL.Image.Image]:
    """The images of one batch: items with the same condition options run together, image i drawn from a generator
    seeded `seed + i`."""
    keys = sorted({key for item in batch for key in item.condition})
    if "prompt" in keys:
        condition = {
            "prompt": [item.condition["prompt"] for item in batch],
            "negative_prompt": None
            if batch[0].condition["negative_prompt"] is None
            else [item.condition["negative_prompt"] for item in batch],
            "height": batch[0].condition["height"],
            "width": batch[0].condition["width"],
        }
    elif batch[0].condition["class_labels"] is None:
        condition = {"class_labels": None, "num_images_per_label": len(batch)}
    else:
        condition = {"class_labels": [item.condition["class_labels"][0] for item in batch]}
    generators = [torch.Generator().manual_seed(seed + item.index) for item in batch]
    return pipe(**condition, **options, generator=generators).images


# ---------------------------------------------------------------------------------------------------- writing
def _write_grid(output: Path, grid: PIL.Image.Image) -> None:
    try:
        with atomic_file(output) as temporary:  # readers never see a half-written file
            grid.save(temporary, format=PIL.Image.registered_extensions()[output.suffix.lower()])
    except OSError as error:  # a full disk, a permission refused...: the user's environment, not a bug
        raise CommandError(f"could not write --output {str(output)!r}: {error.strerror or error}") from None


def _file_name(item: Item) -> str:
    return f"{item.index:06d}.png"


def _write_images(folder: Path, batch: list[Item], images: list[PIL.Image.Image]) -> None:
    for item, image in zip(batch, images, strict=True):
        try:
            with atomic_file(folder / _file_name(item)) as temporary:
                image.save(temporary, format="PNG")
        except OSError as error:
            raise CommandError(f"could not write {folder / _file_name(item)}: {error.strerror or error}") from None


def _write_metadata(folder: Path, items: list[Item]) -> None:
    """`metadata.jsonl`: each image's file name and caption (datasets' `imagefolder` reads it)."""
    rows = [{"file_name": _file_name(item), "text": item.caption or ""} for item in items]
    write_text_atomic(folder / FOLDER_METADATA, "".join(json.dumps(row) + "\n" for row in rows))
