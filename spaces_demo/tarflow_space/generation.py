"""What both Generate tabs share (TarFlow's class picker and STARFlow's prompt aside): the controls, the cost
estimate shown before a click, which also caps the number of images to what the budget allows (and turns the
button off when not even one image fits), the checked Generate button, and the summary of a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from tarflow_hf.samplers import FlowSampler, get_sampler

from .components import GenerationView, SamplerPanel, guidance_fields, sampler_panel, seed_field
from .events import guarded
from .limits import check_number, max_images
from .models import ModelRef
from .sampling import Generation, SamplingRequest, images_within_budget, parse_sampler, work_ratio
from .space import Space
from .timing import describe_estimate

GUIDANCE_HELP = "how closely the images follow the {condition}: 1 = not at all (most varied), higher = more typical."


@dataclass
class GenerateControls:
    num_images: gr.Slider
    guidance: gr.Slider
    estimate: gr.Markdown
    button: gr.Button
    seed: gr.Number
    panel: SamplerPanel
    advanced: dict[str, Any]

    def fields(self) -> dict[str, Any]:
        """The Generate handler's parameters (its API), by name."""
        return {
            "num_images": self.num_images,
            "guidance_scale": self.guidance,
            "seed": self.seed,
            "sampler": self.panel.spec,
            **self.advanced,
        }

    def page_fields(self) -> dict[str, Any]:
        """What the page's own check reads: the sampler's option fields in place of its spec."""
        fields = {**self.fields(), **self.panel.inputs()}
        del fields["sampler"]
        return fields


def generate_controls(
    space: Space, pipe: Any, guidance_range: tuple[float, float], condition: str, default_images: int
) -> GenerateControls:
    """The controls, in the order a phone shows them: the essentials and the Generate button first."""
    default = get_sampler(space.calibration.default_sampler)
    fit = images_within_budget(pipe, default, guided=False)
    num_images = gr.Slider(1, max(fit, 1), value=min(default_images, max(fit, 1)), step=1, label="Number of images")
    guidance = gr.Slider(
        *guidance_range,
        value=1.0,
        step=0.1,
        label="Guidance scale",
        info=GUIDANCE_HELP.format(condition=condition),
    )
    button = gr.Button("Generate", variant="primary", elem_id="generate-button", interactive=fit > 0)
    text, _ = estimate_text(space, space.startup, min(default_images, fit), False, default)
    estimate = gr.Markdown(text, elem_id="estimate")
    seed, _ = seed_field()
    with gr.Accordion("Advanced", open=False):
        panel = sampler_panel(list(space.offered_samplers), default.name, space.calibration.summary())
        advanced = guidance_fields(with_target=not space.family.text_to_image)
    return GenerateControls(num_images, guidance, estimate, button, seed, panel, advanced)


# ------------------------------------------------------------------------------------------------ estimate
def estimate_text(space: Space, ref: ModelRef, num_images: int, guided: bool, sampler: FlowSampler) -> tuple[str, int]:
    """What the page says before a click, and how many images fit the budget."""
    pipe = space.store.loaded(ref) or space.served()
    fit = images_within_budget(pipe, sampler, guided)
    name = sampler.name
    if fit == 0:
        return (
            f"The {name} sampler is over this server's limit even for one image: choose another sampler (the "
            "sequential one does the least work per image).",
            0,
        )
    lines = []
    if fit < max_images():
        ratio = "" if name == "sequential" else f" (about {work_ratio(pipe, sampler):.0f} times the sequential work)"
        lines.append(f"With the {name} sampler{ratio}, at most {fit} image(s) per request on this server.")
    count = min(num_images, fit)
    seconds = space.estimator_for(ref).sampling_seconds(name, count)
    lines.append(describe_estimate(seconds, f"{count} image(s) with the {name} sampler"))
    return " ".join(lines), fit


def wire_estimate(
    space: Space, controls: GenerateControls, guidance_range: tuple[float, float]
) -> tuple[Callable[[Any], Any], Callable[..., str]]:
    """The estimate follows every control it depends on; it caps the number of images and turns the button off
    when not even one image fits. Returns what refreshes it after another event (`after(event)`) and the
    `/estimate` endpoint for API clients (the served model)."""

    def refresh(model: ModelRef, **values: Any) -> tuple[Any, ...]:
        try:
            spec = controls.panel.compose(values)
            sampler = get_sampler(spec)
            count = check_number("number of images", values["num_images"], 1, max_images(), integer=True)
            guided = check_number("guidance scale", values["guidance_scale"], *guidance_range) != 1
        except ValueError as error:
            return gr.Textbox(), f"Not possible as set: {error}.", gr.Slider(), gr.Button(interactive=False)
        text, fit = estimate_text(space, model, count, guided, sampler)
        cap = max(fit, 1)
        return spec, text, gr.Slider(maximum=cap, value=min(count, cap)), gr.Button(interactive=fit > 0)

    inputs = {"num_images": controls.num_images, "guidance_scale": controls.guidance, **controls.panel.inputs()}
    outputs = [controls.panel.spec, controls.estimate, controls.num_images, controls.button]
    listener = dict(inputs_kwargs=inputs, queue=False, show_progress="hidden", api_visibility="private")
    for component in inputs.values():
        component.input(refresh, [space.model_state], outputs, **listener)

    def after(event: Any) -> Any:
        return event.then(refresh, [space.model_state], outputs, **listener)

    def estimate(num_images: int, guidance_scale: float, sampler: str) -> str:
        """The expected time of a request to the served model, and how many images its sampler allows."""
        count = check_number("number of images", num_images, 1, max_images(), integer=True)
        guided = check_number("guidance scale", guidance_scale, *guidance_range) != 1
        return estimate_text(space, space.startup, count, guided, parse_sampler(sampler, space.offered_samplers))[0]

    return after, estimate


# ---------------------------------------------------------------------------------------------- generating
def wire_generate(
    space: Space,
    controls: GenerateControls,
    view: GenerationView,
    condition: tuple[str, Any],
    check_request: Callable[[Any, dict[str, Any]], Any],
    handler: Callable[..., Any],
    after: Callable[[Any], Any],
) -> None:
    """The Generate button: the page's check (every field, the sampler's options composed into its spec, the
    budget), then `handler` (the `/generate` API, with `condition`, the class or prompt field, first), then a
    fresh estimate (the run was measured)."""
    name, component = condition

    def check(model: ModelRef, **values: Any) -> str:
        spec = controls.panel.compose(values)
        check_request(space.pipeline(model), {**values, "sampler": spec})
        return spec

    event = guarded(
        controls.button.click,
        check,
        handler,
        [space.model_state],
        view.outputs,
        "generate",
        fields={name: component, **controls.fields()},
        check_fields={name: component, **controls.page_fields()},
        check_outputs=[controls.panel.spec],
        progress_on=view.gallery,
    )
    after(event)


def parse_sampling(
    space: Space, pipe: Any, values: dict[str, Any], guidance_range: tuple[float, float]
) -> SamplingRequest:
    rule = pipe.transformer.config.default_guidance_rule
    return SamplingRequest.parse(values, space.family, rule, guidance_range, space.offered_samplers)


def summary(result: Generation, pipe: Any, request: SamplingRequest) -> str:
    """One line about a run: time, sampler, and the steps that ran one after another."""
    config = pipe.transformer.config
    count = len(result.images)
    exact_steps = config.num_blocks * (config.num_patches - 1)
    return (
        f"{count} image(s) in **{result.seconds:.2f} s** ({result.seconds / count:.2f} s each) on "
        f"{pipe._execution_device.type}: {request.sampler.name} sampler, {config.num_blocks} flow blocks, "
        f"{result.transformer_passes} model steps one after another (one patch at a time: {exact_steps})"
        f"{', denoised' if request.denoise else ''}."
    )
