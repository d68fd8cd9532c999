"""The TarFlow Interpolation tab: a walk through latent space, between the prior noise of two seeds (sampled and
denoised, as in Generate) or between the exact latents of two uploaded images (decoded exactly: the walk starts and
ends on the images). Only the inputs of the chosen kind are shown."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gradio as gr
import PIL.Image
import torch

from tarflow_hf.grids import make_grid
from tarflow_hf.samplers import FlowSampler, get_sampler

from .components import image_upload
from .events import guarded
from .images import INVERT_CHOICES, fit_to_model, for_display, the_image, upscale
from .limits import FRAMES_RANGE, GUIDANCE_RANGE, MAX_SEED, check_budget, check_choice, check_number
from .models import ModelRef, ModelStore, class_options, parse_class
from .page_likelihood import CENTER_HELP, INVERT_HELP
from .sampling import finite_images, rows_per_image
from .space import Page, Space

SOURCES = ("two seeds", "two images")
PATHS = ("spherical", "linear")
PATH_HELP = "spherical keeps the latents' typical size all the way; linear passes through atypical, low-norm ones."
FRAME_SIDE = 96


@dataclass(frozen=True)
class InterpolationRequest:
    """An Interpolate click, checked."""

    between: str
    class_id: int | None
    frames: int
    path: str
    seeds: tuple[int, int] = (0, 1)
    images: tuple[PIL.Image.Image, PIL.Image.Image] | None = None
    guidance_scale: float = 1.0
    invert: str = "auto"
    center: bool = False

    @classmethod
    def parse(cls, pipe: Any, values: dict[str, Any], sampler: FlowSampler) -> InterpolationRequest:
        between = check_choice("interpolate between", values.get("between"), SOURCES)
        frames = check_number("number of frames", values.get("frames"), *FRAMES_RANGE, integer=True)
        path = check_choice("path", values.get("path"), PATHS)
        class_id = parse_class(pipe, values.get("class_name"))
        if between == "two images":
            pair = values.get("image_a"), values.get("image_b")
            if any(image is None for image in pair):
                raise ValueError("upload two images to interpolate between them")
            invert = check_choice("invert", values.get("invert", "auto"), INVERT_CHOICES)
            images = (the_image(pair[0]), the_image(pair[1]))
            return cls(between, class_id, frames, path, images=images, invert=invert, center=bool(values.get("center")))
        seeds = tuple(check_number("seed", values.get(key), 0, MAX_SEED, integer=True) for key in ("seed_a", "seed_b"))
        scale = check_number("guidance scale", values.get("guidance_scale"), *GUIDANCE_RANGE)
        check_budget(rows_per_image(pipe, sampler, scale != 1), frames, "frames")
        return cls(between, class_id, frames, path, seeds=seeds, guidance_scale=scale)


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


def interpolate(pipe: Any, request: InterpolationRequest, sampler: FlowSampler) -> list[PIL.Image.Image]:
    """The images along the path, as `InterpolationRequest` says."""
    labels = None if request.class_id is None else [request.class_id]
    if request.images is None:
        generators = [torch.Generator().manual_seed(seed) for seed in request.seeds]
        ends = pipe.prepare_latents(2, generators, None, torch.device("cpu"))
    else:
        config = pipe.transformer.config
        fitted = [
            fit_to_model(image, config.image_size, config.num_channels, request.invert, request.center)
            for image in request.images
        ]
        ends = pipe.encode(fitted, class_labels=labels).cpu()
    weights = torch.linspace(0, 1, request.frames)
    if request.path == "spherical":
        path = slerp(ends[:1], ends[1:], weights)
    else:
        path = torch.lerp(ends[:1], ends[1:], weights.view(-1, 1, 1))
    if request.images is None:
        output = pipe(
            class_labels=labels,
            num_images_per_label=request.frames,
            guidance_scale=request.guidance_scale,
            sampler=sampler,
            latents=path,
            output_type="np",
        )
        return finite_images(pipe, output.images)
    return list(pipe.decode(path.to(pipe._execution_device), class_labels=labels))


def inputs_for(between: str) -> tuple[gr.Group, gr.Group]:
    """Updates for (the seeds' group, the images' group): only the inputs of the chosen kind are shown."""
    return gr.Group(visible=between == SOURCES[0]), gr.Group(visible=between == SOURCES[1])


def interpolate_task(
    store: ModelStore, model: ModelRef, request: InterpolationRequest, sampler: str
) -> PIL.Image.Image:
    """The model's part of an Interpolate click (what runs under `spaces.GPU`): the frames in one strip."""
    images = interpolate(store.load(model), request, get_sampler(sampler))
    return make_grid([upscale(image, FRAME_SIDE) for image in images], columns=len(images))


# ---------------------------------------------------------------------------------------------------- page
def build(space: Space, pipe: Any) -> Page:
    config = pipe.transformer.config
    options = class_options(pipe)
    sampler = space.calibration.default_sampler
    with gr.Tab("Interpolation"), gr.Row():
        with gr.Column():
            between = gr.Radio(list(SOURCES), value=SOURCES[0], label="Between")
            with gr.Group(visible=True) as seeds_group:
                with gr.Row():
                    seed_a = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed A")
                    seed_b = gr.Number(value=1, precision=0, minimum=0, maximum=MAX_SEED, label="Seed B")
                guidance = gr.Slider(*GUIDANCE_RANGE, value=1.0, step=0.1, label="Guidance scale (1 = none)")
            with gr.Group(visible=False) as images_group:
                with gr.Row():
                    image_a = image_upload("Image A", height=160)
                    image_b = image_upload("Image B", height=160)
                with gr.Row(visible=config.num_channels == 1) as fitting:
                    invert = gr.Radio(list(INVERT_CHOICES), value="auto", label="Invert", info=INVERT_HELP)
                    center = gr.Checkbox(value=config.num_channels == 1, label="Centre like MNIST", info=CENTER_HELP)
            class_box = gr.Dropdown(
                options, value=options[0], label="Class", filterable=True, allow_custom_value=True,
                visible=config.num_classes > 0,
            )  # fmt: skip
            with gr.Row():
                frames = gr.Slider(*FRAMES_RANGE, value=8, step=1, label="Frames")
                path = gr.Radio(list(PATHS), value=PATHS[0], label="Path", info=PATH_HELP)
            button = gr.Button("Interpolate", variant="primary", elem_id="interpolate-button")
        with gr.Column():
            strip = gr.Image(label="Interpolation", format="png", interactive=False, elem_classes=["labelled"])
    between.input(
        inputs_for,
        between,
        [seeds_group, images_group],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    run = space.on_gpu(functools.partial(interpolate_task, space.store))

    def check(model: ModelRef, **values: Any) -> None:
        InterpolationRequest.parse(space.pipeline(model), values, get_sampler(sampler))

    @space.active_calls.counted
    def on_interpolate(model: ModelRef, **values: Any) -> PIL.Image.Image:
        request = InterpolationRequest.parse(space.pipeline(model), values, get_sampler(sampler))
        return for_display(run(model, request, sampler), kind="interpolation")

    fields = {
        "between": between, "class_name": class_box, "frames": frames, "path": path, "seed_a": seed_a,
        "seed_b": seed_b, "image_a": image_a, "image_b": image_b, "guidance_scale": guidance, "invert": invert,
        "center": center,
    }  # fmt: skip
    guarded(button.click, check, on_interpolate, [space.model_state], [strip], "interpolate", fields=fields)

    def updates(pipe: Any) -> tuple[Any, ...]:
        config = pipe.transformer.config
        options = class_options(pipe)
        grey = config.num_channels == 1
        picker = gr.Dropdown(choices=options, value=options[0], visible=config.num_classes > 0)
        return picker, gr.Row(visible=grey), gr.Checkbox(value=grey)

    return Page([class_box, fitting, center], updates)
