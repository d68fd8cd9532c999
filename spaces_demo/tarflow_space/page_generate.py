"""The TarFlow Generate tab: a class (searchable; hidden for unconditional models), the number of images, guidance,
a seed, and the sampler with its options; the samples, and the trajectory of prior noise becoming images block by
block."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import torch

from .components import generation_outputs, generation_view
from .generation import generate_controls, parse_sampling, summary, wire_estimate, wire_generate
from .images import model_space_to_pil
from .limits import GUIDANCE_RANGE
from .models import ModelRef, ModelStore, class_options, parse_class
from .sampling import Generation, ProgressReport, SamplingRequest, Trajectory, check_sampling_budget, finite_images
from .space import Page, Space

DEFAULT_IMAGES = 4


@dataclass(frozen=True)
class ClassSampling:
    """A TarFlow Generate request, checked: the class (None: the unconditional branch) and the sampling."""

    class_id: int | None
    sampling: SamplingRequest


def parse_request(space: Space, pipe: Any, values: dict[str, Any]) -> ClassSampling:
    """The request from the page's (or an API client's) values; `ValueError` naming the first bad one, the
    budget included."""
    class_id = parse_class(pipe, values.get("class_name"))
    sampling = parse_sampling(space, pipe, values, GUIDANCE_RANGE)
    check_sampling_budget(pipe, sampling)
    return ClassSampling(class_id, sampling)


def generate_images(
    pipe: Any, class_id: int | None, request: SamplingRequest, report: ProgressReport | None = None, record: bool = True
) -> Generation:
    """Sample `request.num_images` images, image i from seed `seed + i`, recording the trajectory: the prior noise,
    the images after each flow block (`callback_on_step_end`), the denoised ones."""
    num_blocks = pipe.transformer.config.num_blocks
    trajectory = Trajectory(
        functools.partial(model_space_to_pil, pipe), num_blocks, request.denoise != 0, report, record
    )
    start = time.perf_counter()
    latents = pipe.prepare_latents(request.num_images, request.generators(), None, torch.device("cpu"))
    if record:
        prior = pipe.transformer.unpatchify(latents * pipe.transformer.prior_variance.detach().float().cpu().sqrt())
        trajectory.add("prior noise", model_space_to_pil(pipe, prior))
    output = pipe(
        class_labels=None if class_id is None else [class_id],
        num_images_per_label=request.num_images,
        guidance_scale=request.guidance_scale,
        guidance_rule=request.guidance_rule,
        attention_temperature=request.attention_temperature,
        sampler=request.sampler,
        denoise=request.denoise,
        latents=latents,
        callback_on_step_end=trajectory.on_step_end,
        output_type="np",
    )
    images = finite_images(pipe, output.images)
    if request.denoise:
        trajectory.add("denoised (final)", images)
    return Generation(images, trajectory.frames, time.perf_counter() - start, output.stats.transformer_passes)


def sample_task(store: ModelStore, model: ModelRef, request: ClassSampling, progress: Any) -> Generation:
    """The model's part of a Generate click (what runs under `spaces.GPU`)."""

    def report(done: int, total: int, text: str) -> None:
        progress((done, total), desc=text, unit="blocks")

    return generate_images(store.load(model), request.class_id, request.sampling, report=report)


def build(space: Space, pipe: Any) -> Page:
    options = class_options(pipe)
    conditional = pipe.transformer.config.num_classes > 0
    with gr.Tab("Generate"), gr.Row():
        with gr.Column(scale=1):
            class_box = gr.Dropdown(
                options,
                value=options[0],
                label="Class (type to search)",
                filterable=True,
                allow_custom_value=True,  # checked by parse_class, which suggests close names
                visible=conditional,
            )
            controls = generate_controls(space, pipe, GUIDANCE_RANGE, "class", DEFAULT_IMAGES)
        with gr.Column(scale=2):
            view = generation_view(pipe.transformer.config.num_blocks)
    run = space.on_gpu(functools.partial(sample_task, space.store))

    @space.active_calls.counted
    def on_generate(model: ModelRef, progress: gr.Progress = gr.Progress(), **values: Any) -> tuple[Any, ...]:  # noqa: B008 (Gradio's documented way to get a progress bar)
        pipe = space.pipeline(model)
        request = parse_request(space, pipe, values)
        progress(0, desc="drawing prior noise")
        result = run(model, request, progress)
        sampling = request.sampling
        space.estimator_for(model).observe_sampling(sampling.sampler.name, sampling.num_images, result.seconds)
        return generation_outputs(result, sampling.seed, model.name, summary(result, pipe, sampling))

    after, estimate = wire_estimate(space, controls, GUIDANCE_RANGE)
    check = functools.partial(parse_request, space)
    wire_generate(space, controls, view, ("class_name", class_box), check, on_generate, after)

    def updates(pipe: Any) -> tuple[Any, ...]:
        options = class_options(pipe)
        picker = gr.Dropdown(choices=options, value=options[0], visible=pipe.transformer.config.num_classes > 0)
        return (picker, *view.reset(pipe.transformer.config.num_blocks))

    return Page([class_box, *view.resettable], updates, [after], {"estimate": estimate})
