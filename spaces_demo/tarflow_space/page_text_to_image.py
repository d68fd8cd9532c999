"""The STARFlow Generate tab: a prompt (with examples), the number of images, guidance, a seed and the sampler with
its options; the samples, and the trajectory (each block's latents decoded by the VAE)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import PIL.Image
import torch

from .components import generation_outputs, generation_view
from .generation import generate_controls, parse_sampling, summary, wire_estimate, wire_generate
from .limits import MAX_PROMPT_CHARS, STARFLOW_GUIDANCE_RANGE, check_prompt
from .models import ModelRef, ModelStore
from .sampling import Generation, ProgressReport, SamplingRequest, Trajectory, check_sampling_budget, finite_images
from .space import Page, Space

DEFAULT_IMAGES = 1
PROMPT_EXAMPLES = (
    "a photo of a cat sitting on a sofa",
    "a watercolor painting of a fox in the snow",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table",
)


@dataclass(frozen=True)
class PromptSampling:
    """A STARFlow Generate request, checked."""

    prompt: str
    sampling: SamplingRequest


def parse_request(space: Space, pipe: Any, values: dict[str, Any]) -> PromptSampling:
    prompt = check_prompt(values.get("prompt"))
    sampling = parse_sampling(space, pipe, values, STARFLOW_GUIDANCE_RANGE)
    check_sampling_budget(pipe, sampling)
    return PromptSampling(prompt, sampling)


def image_size(pipe: Any) -> int:
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def decoded(pipe: Any, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Latents shown as the VAE decodes them (on the device the VAE runs on, offloaded or not)."""
    with torch.no_grad():
        return pipe.decode_latents(latents.to(pipe._execution_device))


def generate_from_prompt(
    pipe: Any, prompt: str, request: SamplingRequest, report: ProgressReport | None = None, record: bool = True
) -> Generation:
    """Text to image, image i from seed `seed + i`, recording the trajectory as TarFlow's Generate does."""
    num_blocks = pipe.transformer.config.num_blocks
    trajectory = Trajectory(functools.partial(decoded, pipe), num_blocks, request.denoise != 0, report, record)
    side = image_size(pipe)
    start = time.perf_counter()
    latents = pipe.prepare_latents(request.num_images, side, side, request.generators(), None, torch.device("cpu"))
    if record:
        trajectory.add("prior noise (decoded)", decoded(pipe, latents))
    output = pipe(
        prompt=prompt,
        num_images_per_prompt=request.num_images,
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


def sample_task(store: ModelStore, model: ModelRef, request: PromptSampling, progress: Any) -> Generation:
    """The model's part of a Generate click (what runs under `spaces.GPU`)."""

    def report(done: int, total: int, text: str) -> None:
        progress((done, total), desc=text, unit="blocks")

    return generate_from_prompt(store.load(model), request.prompt, request.sampling, report=report)


def build(space: Space, pipe: Any) -> Page:
    with gr.Tab("Generate"), gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(
                value=PROMPT_EXAMPLES[0], label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt"
            )
            controls = generate_controls(space, pipe, STARFLOW_GUIDANCE_RANGE, "prompt", DEFAULT_IMAGES)
            gr.Examples([[text] for text in PROMPT_EXAMPLES], inputs=[prompt], label="Example prompts")
        with gr.Column(scale=2):
            view = generation_view(pipe.transformer.config.num_blocks)
    run = space.on_gpu(functools.partial(sample_task, space.store))

    @space.active_calls.counted
    def on_generate(model: ModelRef, progress: gr.Progress = gr.Progress(), **values: Any) -> tuple[Any, ...]:  # noqa: B008 (Gradio's documented way to get a progress bar)
        pipe = space.pipeline(model)
        request = parse_request(space, pipe, values)
        progress(0, desc="encoding the prompt, drawing prior noise")
        result = run(model, request, progress)
        sampling = request.sampling
        space.estimator_for(model).observe_sampling(sampling.sampler.name, sampling.num_images, result.seconds)
        return generation_outputs(result, sampling.seed, model.name, summary(result, pipe, sampling))

    after, estimate = wire_estimate(space, controls, STARFLOW_GUIDANCE_RANGE)
    check = functools.partial(parse_request, space)
    wire_generate(space, controls, view, ("prompt", prompt), check, on_generate, after)

    def updates(pipe: Any) -> tuple[Any, ...]:
        return view.reset(pipe.transformer.config.num_blocks)

    return Page(view.resettable, updates, [after], {"estimate": estimate})
