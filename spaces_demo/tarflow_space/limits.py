"""What one request may ask for: the bounds of every input, the compute budget, and the environment variables that
set them. Every input is checked here, on the server, whatever the browser sends: the page's sliders only help.

The budget: a request may not hold the worker for long, so its cost is estimated before any work, in transformer
rows (one row: one patch through one flow block, for one image and one guidance branch), and refused above
$TARFLOW_MAX_ROWS. Visitors never see that unit: refusals say how many images (captions, frames) fit, and how
many times the server's allowance a request would take.
"""

from __future__ import annotations

import math
import os
from typing import Any

from tarflow_hf.samplers import FlowSampler


# ----------------------------------------------------------------------------------------------- settings
def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An integer environment variable (an operator's setting); a bad one stops the server with one line."""
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


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={raw!r}: use 1 or 0")


def env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip() or default
    if raw not in allowed:
        raise SystemExit(f"{name}={raw!r}: use one of {', '.join(allowed)}")
    return raw


MAX_SEED = 2**32 - 1
GUIDANCE_RANGE = (0.1, 12.0)  # the pipelines take a scale > 0; below 1 pushes away from the class
STARFLOW_GUIDANCE_RANGE = (1.0, 12.0)  # STARFlow's rule (a product of Gaussians) needs a scale >= 1
TEMPERATURE_RANGE = (0.1, 4.0)
DENOISE_RANGE = (0.0, 2.0)
FRAMES_RANGE = (3, 16)
MAX_UPLOAD_SIDE = 4096
MAX_UPLOAD_MB = 10
MAX_PROMPT_CHARS = 500
MAX_CAPTIONS = 32
DEFAULT_MAX_ROWS = 150_000


def max_images() -> int:
    """$TARFLOW_MAX_IMAGES: images per request (default 16)."""
    return env_int("TARFLOW_MAX_IMAGES", 16)


def max_rows() -> int:
    """$TARFLOW_MAX_ROWS, read per request (an operator may lower it for a test without a restart)."""
    return env_int("TARFLOW_MAX_ROWS", DEFAULT_MAX_ROWS)


# ------------------------------------------------------------------------------------------------- checks
def check_number(name: str, value: Any, low: float, high: float, integer: bool = False) -> float | int:
    """`value` as a float (an int with `integer`) within [low, high], else a `ValueError` naming `name`."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
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


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt: a sentence describing the image")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt may be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    return prompt


def parse_captions(text: Any) -> list[str]:
    """Captions typed one per line -> a list without blanks or repeats (in order); `ValueError` unless 2 to
    MAX_CAPTIONS remain."""
    if not isinstance(text, str):
        raise ValueError("type the candidate captions, one per line")
    captions = list(dict.fromkeys(" ".join(line.split()) for line in text.splitlines() if line.strip()))
    if len(captions) < 2:
        raise ValueError("type at least two different captions, one per line, to rank them")
    if len(captions) > MAX_CAPTIONS:
        raise ValueError(f"at most {MAX_CAPTIONS} captions, got {len(captions)}")
    if any(len(caption) > MAX_PROMPT_CHARS for caption in captions):
        raise ValueError(f"captions may be at most {MAX_PROMPT_CHARS} characters each")
    return captions


# ------------------------------------------------------------------------------------------------- budget
# Rows per token of a block a sampler decodes in parallel, measured on the bundled MNIST model: the parallel
# samplers recompute unsettled tokens on every pass (jacobi 7-8x); newton iterates on 2 * patch_dim + 1 copies.
PARALLEL_ROW_FACTOR = 8


def rows_per_token(sampler: FlowSampler, patch_dim: int) -> int:
    """Transformer rows per token of a block the sampler decodes itself (not one of its `sequential_blocks`)."""
    if sampler.name == "sequential":
        return 1
    if sampler.name == "newton":
        return PARALLEL_ROW_FACTOR * (2 * patch_dim + 1)
    return PARALLEL_ROW_FACTOR


def sampling_rows(config: Any, text_to_image: bool, sampler: FlowSampler, num_images: int, guided: bool) -> int:
    """Estimated transformer rows for sampling `num_images` images. Blocks run in sampling order; the first
    `sampler.sequential_blocks` run token by token. Guidance doubles a block's rows: every block of a TarFlow,
    only the first (the deep, text-conditioned block) of a STARFlow."""
    exact_blocks = sampler.sequential_blocks
    if exact_blocks is None:  # the model's choice: STARFlow's deep block, first in sampling order
        exact_blocks = 1 if text_to_image else 0
    per_image = 0
    for step in range(config.num_blocks):
        sequential = step < exact_blocks
        cost = 1 if sequential else rows_per_token(sampler, config.patch_dim)
        branches = 2 if guided and (step == 0 or not text_to_image) else 1
        per_image += cost * branches
    return num_images * per_image * config.num_patches


def ranking_rows(config: Any, num_captions: int) -> int:
    """One forward pass (every block, every patch) per caption."""
    return num_captions * config.num_patches * config.num_blocks


def fitting(per_item: int) -> int:
    """How many items of `per_item` rows fit in one request."""
    return max_rows() // max(per_item, 1)


def check_budget(per_item: int, count: int, items: str, advice: str = "") -> None:
    """`ValueError` when `count` items of `per_item` rows each are over the budget: how many times the
    allowance the request would take, how many `items` fit, and `advice`."""
    limit = max_rows()
    rows = per_item * count
    if rows <= limit:
        return
    fit = fitting(per_item)
    times = math.ceil(10 * rows / limit) / 10  # rounded up: "1.0 times" would read as "fits"
    lower = f"ask for at most {fit} {items}" if fit else f"even one is over it ({items})"
    raise ValueError(
        f"this request would take about {times:g} times the work this server allows per request: {lower}{advice}"
    )
