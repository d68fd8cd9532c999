"""Sampling as the Space offers it, for both families: the samplers and their options (read from each sampler
class's constructor, so a new option shows up on the page by itself), what a sampling request holds, its budget,
and the trajectory recorded block by block through the pipelines' `callback_on_step_end`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from tarflow_hf import registry
from tarflow_hf.guidance import GUIDANCE_SCHEDULES, GUIDANCE_TARGETS, GuidanceRule
from tarflow_hf.samplers import SAMPLERS, FlowSampler, get_sampler

from .images import tile
from .limits import (
    DENOISE_RANGE,
    MAX_SEED,
    TEMPERATURE_RANGE,
    check_budget,
    check_choice,
    check_number,
    fitting,
    max_images,
    sampling_rows,
)

# One line per sampler, for someone who has never heard of it.
SAMPLER_HELP = {
    "sequential": "exact: one patch after another. The reference, and the least work per image.",
    "jacobi": "guesses every patch at once, then corrects the guesses until they stop changing: the same images "
    "(to about 1e-4) in far fewer steps.",
    "block_jacobi": "Apple's STARFlow shortcut: corrects chunks of patches until they change by less than a "
    "threshold. Fast, but approximate: the images differ slightly from the exact ones.",
    "newton": "like jacobi with smarter corrections: fewer steps, but each one is many times the work (at most a "
    "few images per request).",
}
# One line per sampler option; (sampler, option) where one name means different things to different samplers.
OPTION_HELP = {
    "tolerance": "how still a patch must be to count as settled: smaller is closer to exact, and slower.",
    "window": "patches corrected together after the settled ones; empty: all of them.",
    "max_iterations": "correction passes before it falls back to one patch at a time; empty: no limit.",
    ("block_jacobi", "max_iterations"): "correction passes per chunk, at most.",
    "sequential_blocks": "flow blocks (in sampling order) decoded exactly, one patch at a time, before the sampler "
    "takes over; empty: the model's choice (STARFlow's deep block, none of TarFlow's).",
    "block_size": "patches per chunk.",
    "threshold": "a chunk stops once its relative change is below this: smaller is closer to exact, and slower.",
}
# How steps run on the server's hardware is the server's choice: a visitor never triggers a compile (tens of
# seconds and a graph cache per choice), so these constructor arguments are not on the page.
SERVER_ONLY_OPTIONS = frozenset({"compile_mode", "compile_backend", "freeze_weights"})
GUIDANCE_TARGET_HELP = "what guidance changes: each patch's scale, its shift, or both (TarFlow's default)."
GUIDANCE_SCHEDULE_HELP = "constant: the same guidance for every patch; linear: growing from none at the first patch."
UNCONDITIONAL_TEMPERATURE_HELP = (
    "softens (above 1) or sharpens (below 1) the attention of the unguided branch that guidance pushes away from."
)
ATTENTION_TEMPERATURE_HELP = (
    "softens (above 1) or sharpens (below 1) the model's attention everywhere; 1 is as trained."
)
DENOISE_HELP = "the model was trained on slightly noisy images; one step of its own score removes that noise (0 = off)."


# ------------------------------------------------------------------------------------------------ samplers
@dataclass(frozen=True)
class SamplerOption:
    """One constructor argument of a sampler class, as the page shows it."""

    name: str
    kind: type  # int or float
    optional: bool  # None (an empty field) is allowed
    default: Any
    help: str


def sampler_options(name: str) -> list[SamplerOption]:
    """The options of sampler `name` a visitor sets: its class's constructor arguments (but the server's own,
    `SERVER_ONLY_OPTIONS`), with their types and defaults."""
    init = SAMPLERS[name].__init__
    hints = typing.get_type_hints(init)
    options = []
    for parameter in list(inspect.signature(init).parameters.values())[1:]:
        if parameter.name in SERVER_ONLY_OPTIONS:
            continue
        hint = hints.get(parameter.name, type(parameter.default))
        arguments = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kind = next(argument for argument in arguments if argument is not type(None))
        help_text = OPTION_HELP.get((name, parameter.name), OPTION_HELP.get(parameter.name, ""))
        options.append(SamplerOption(parameter.name, kind, type(None) in arguments, parameter.default, help_text))
    return options


def build_sampler(name: Any, values: dict[str, Any]) -> FlowSampler:
    """A sampler from the page's fields (`values` by option name; an empty field is None): whole numbers become
    ints where the option is one; the sampler class checks the rest (a one-line `ValueError`)."""
    name = check_choice("sampler", name, tuple(SAMPLERS))
    given = {}
    for option in sampler_options(name):
        value = values.get(option.name)
        if value is None and not option.optional:
            raise ValueError(f"the {name} sampler's {option.name} needs a value")
        if option.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        given[option.name] = value
    return SAMPLERS[name](**given)


def parse_sampler(spec: Any, offered: tuple[str, ...]) -> FlowSampler:
    """A sampler from its spec (`"jacobi:tolerance=0.001"`, the command line's form), among `offered`."""
    if not isinstance(spec, str):
        raise ValueError(f"sampler must be one of {', '.join(offered)} (with options: name:key=value,...)")
    check_choice("sampler", spec.partition(":")[0].strip(), offered)
    return get_sampler(spec)


# ------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class SamplingRequest:
    """What both families' Generate buttons ask for, checked."""

    num_images: int
    guidance_scale: float
    seed: int
    sampler: FlowSampler
    guidance_rule: GuidanceRule
    attention_temperature: float = 1.0
    denoise: float = 1.0  # the denoising step's strength; 0 is none

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1

    @classmethod
    def parse(
        cls,
        values: dict[str, Any],
        family: registry.ModelFamily,
        rule_name: str,
        guidance_range: tuple[float, float],
        offered: tuple[str, ...],
    ) -> SamplingRequest:
        """The request from the page's (or an API client's) values by field name; `ValueError` naming the first
        bad one."""
        rule = GuidanceRule(
            rule_name,
            target=check_choice("guidance target", values.get("guidance_target", "both"), GUIDANCE_TARGETS),
            schedule=check_choice("guidance schedule", values.get("guidance_schedule", "constant"), GUIDANCE_SCHEDULES),
            unconditional_temperature=check_number(
                "unconditional temperature", values.get("unconditional_temperature", 1.0), *TEMPERATURE_RANGE
            ),
        )
        return cls(
            num_images=check_number("number of images", values.get("num_images"), 1, max_images(), integer=True),
            guidance_scale=check_number("guidance scale", values.get("guidance_scale"), *guidance_range),
            seed=check_number("seed", values.get("seed"), 0, MAX_SEED, integer=True),
            sampler=parse_sampler(values.get("sampler"), offered),
            guidance_rule=rule,
            attention_temperature=check_number(
                "attention temperature", values.get("attention_temperature", 1.0), *TEMPERATURE_RANGE
            ),
            denoise=check_number("denoising strength", values.get("denoise", 1.0), *DENOISE_RANGE),
        )

    def generators(self) -> list[torch.Generator]:
        """Image i from seed `seed + i`, so an image does not depend on how many are asked for."""
        return [torch.Generator().manual_seed(self.seed + i) for i in range(self.num_images)]


# --------------------------------------------------------------------------------------------------- budget
def rows_per_image(pipe: Any, sampler: FlowSampler, guided: bool) -> int:
    family = registry.family_of_model(pipe)
    return sampling_rows(pipe.transformer.config, family.text_to_image, sampler, 1, guided)


def images_within_budget(pipe: Any, sampler: FlowSampler, guided: bool) -> int:
    """How many images of this kind one request may ask for (at most max_images())."""
    return min(max_images(), fitting(rows_per_image(pipe, sampler, guided)))


def check_sampling_budget(pipe: Any, request: SamplingRequest) -> None:
    name = request.sampler.name
    advice = "" if name == "sequential" else ", or choose the sequential sampler (the least work per image)"
    per_image = rows_per_image(pipe, request.sampler, request.guided)
    check_budget(per_image, request.num_images, f"image(s) with the {name} sampler", advice)


def work_ratio(pipe: Any, sampler: FlowSampler) -> float:
    """How many times the sequential sampler's work this sampler does per image."""
    return rows_per_image(pipe, sampler, False) / rows_per_image(pipe, get_sampler("sequential"), False)


# ----------------------------------------------------------------------------------------------- trajectory
@dataclass
class Generation:
    images: list[PIL.Image.Image]
    frames: list[tuple[str, PIL.Image.Image]]  # (caption, every image of the request tiled) per sampling step
    seconds: float
    transformer_passes: int  # transformer evaluations that ran one after another


def finite_images(pipe: Any, images: np.ndarray) -> list[PIL.Image.Image]:
    """A pipeline's images (channels-last floats in [0, 1]) as PIL images; `FloatingPointError` when a sample
    overflowed (NaN would otherwise be cast to arbitrary grey levels and shown as if it were an image)."""
    if not np.isfinite(images).all():
        raise FloatingPointError(
            "sampling produced non-finite values (the model's output overflowed): try another seed or a lower "
            "guidance scale"
        )
    return pipe.image_processor.numpy_to_pil(images)


ProgressReport = Callable[[int, int, str], None]  # (steps done, steps in all, what happens next)


@dataclass
class Trajectory:
    """The frames of a sampling run: the prior noise, the images after each flow block (recorded by the pipeline's
    `callback_on_step_end`, whose `latents` are model-space images for TarFlow and VAE latents for STARFlow,
    hence `to_pil`), and the denoised result; also reports progress once per block."""

    to_pil: Callable[[torch.Tensor], list[PIL.Image.Image]]
    num_blocks: int
    denoise: bool
    report: ProgressReport | None = None
    record: bool = True
    frames: list[tuple[str, PIL.Image.Image]] = field(default_factory=list)

    def add(self, caption: str, images: list[PIL.Image.Image]) -> None:
        if self.record:
            self.frames.append((caption, tile(images)))

    def on_step_end(self, pipe: Any, step: int, block_index: int, tensors: dict[str, Any]) -> dict[str, Any]:
        """The pipelines' `callback_on_step_end`."""
        if self.record:
            with torch.no_grad():
                self.add(f"after flow block {step + 1} of {self.num_blocks}", self.to_pil(tensors["latents"]))
        if self.report is not None:
            done = step + 1
            after = f"flow block {done + 1}" if done < self.num_blocks else ("denoising" if self.denoise else "done")
            total = self.num_blocks + int(self.denoise)
            self.report(done, total, f"inverted flow block {done}/{self.num_blocks}; next: {after}")
        return {}
