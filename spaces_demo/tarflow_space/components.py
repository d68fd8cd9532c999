"""Page pieces the tabs share: uploads refused at once when unreadable or too large, the sampler chooser (each
sampler's own options, read from its class), the guidance controls, and the samples gallery with its trajectory.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import gradio as gr
import PIL.Image

from tarflow_hf.guidance import GUIDANCE_SCHEDULES, GUIDANCE_TARGETS
from tarflow_hf.samplers import sampler_spec

from .events import refusal
from .images import DISPLAY_SIZE, UNREADABLE, check_image_file, for_display, upscale
from .limits import DENOISE_RANGE, MAX_SEED, TEMPERATURE_RANGE
from .sampling import (
    ATTENTION_TEMPERATURE_HELP,
    DENOISE_HELP,
    GUIDANCE_SCHEDULE_HELP,
    GUIDANCE_TARGET_HELP,
    SAMPLER_HELP,
    UNCONDITIONAL_TEMPERATURE_HELP,
    Generation,
    build_sampler,
    sampler_options,
)

GALLERY_COLUMNS = 4
# Labels and captions above and below the pictures, never over them; Gradio floats them over the image.
CSS = """
.labelled label[data-testid="block-label"].float { position: static; margin: 0 0 6px 0; }
/* The download and fullscreen buttons in a strip of their own above the picture. */
#samples .grid-container { margin-top: 30px; }
.labelled .image-container { padding-top: 30px; }
/* Columns that shrink to the width there is (Gradio's are at least 100 px: on a phone a fourth went off-screen). */
#samples .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)); }
/* One or two samples shown large (half the width each), more in whole rows of four. */
#samples .gallery-item:only-child,
#samples .gallery-item:first-child:nth-last-child(2),
#samples .gallery-item:first-child:nth-last-child(2) ~ .gallery-item { grid-column: span 2; }
/* The gallery grows with its rows (Gradio would scroll them in a fixed box, cutting rows in half). */
#samples .grid-wrap { min-height: 0; max-height: none; height: auto; overflow: visible; }
#samples .caption-label { position: static; display: block; margin: 4px auto 0; text-align: center; }
#samples .thumbnail-item { height: auto; aspect-ratio: auto; display: flex; flex-direction: column; }
#samples .thumbnail-item img { aspect-ratio: 1 / 1; object-fit: contain; }
#trajectory img { object-fit: contain; max-height: 480px; }
/* On a phone the title takes less room, so that Generate shows without scrolling. */
@media (max-width: 640px) {
  .intro h1 { font-size: 1.4rem; }
  #samples .caption-label { font-size: 0.7rem; padding: 0 2px; }
}
"""

# A file dropped on the drawing pad (which draws, and takes no files) goes to the Upload tab's field, which checks
# it like any upload: an image shows there, anything else gets the same message as an upload.
PAGE_JS = """
() => {
  const forward = (event) => {
    const pad = event.target.closest && event.target.closest('#drawing');
    if (!pad || !event.dataTransfer || !event.dataTransfer.types.includes('Files')) return;
    event.preventDefault();
    event.stopPropagation();
    if (event.type !== 'drop' || !event.dataTransfer.files.length) return;
    const file = event.dataTransfer.files[0];
    const tab = Array.from(document.querySelectorAll('button[role=tab]')).find(b => b.textContent.trim() === 'Upload');
    if (tab) tab.click();
    setTimeout(() => {
      const input = document.querySelector('#upload input[type=file]');
      if (!input) return;
      const files = new DataTransfer();
      files.items.add(file);
      input.files = files.files;
      input.dispatchEvent(new Event('change', {bubbles: true}));
    }, 200);
  };
  for (const type of ["dragover", "drop"]) document.addEventListener(type, forward, true);
  window.tarflowDropForwarding = true;
}
"""


def theme() -> gr.themes.Base:
    # System fonts: the stock themes fetch web fonts, which an offline machine (or a test browser) cannot reach.
    return gr.themes.Soft(
        primary_hue="indigo",
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


# ------------------------------------------------------------------------------------------------- uploads
def refuse_unreadable_uploads(component: gr.Image) -> gr.Image:
    """`component` whose uploads are checked before Gradio decodes them: a file PIL cannot read, or one too
    large, is refused with a message saying what to upload instead (from the file's header: nothing large is
    decoded). Patched on the instance: a subclass of a Gradio component would make Gradio write a type stub
    (`.pyi`) beside this file at run time."""
    preprocess = component.preprocess

    @functools.wraps(preprocess)
    def checked_preprocess(payload: Any) -> Any:
        path = getattr(payload, "path", None)
        try:
            if path is not None:
                check_image_file(path)
        except ValueError as error:
            raise refusal(str(error)) from None
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except (OSError, ValueError, SyntaxError):  # PIL.UnidentifiedImageError is an OSError
            raise refusal(UNREADABLE) from None

    component.preprocess = checked_preprocess
    return component


def image_input(label: str, **options: Any) -> gr.Image:
    """An image input (type "pil") that refuses unreadable or oversized files with a readable message.
    `image_mode=None` keeps an upload's transparency, which `fit_to_model` flattens onto white."""
    options.setdefault("sources", ["upload", "clipboard"])
    return refuse_unreadable_uploads(gr.Image(label=label, type="pil", image_mode=None, **options))


def image_upload(label: str, **options: Any) -> gr.Image:
    """An upload field that refuses a bad file the moment it arrives (and clears itself), not at the next click.
    (Queued: the message of a check run outside the queue does not reach the page.)"""
    upload = image_input(label, **options)
    quiet = {"show_progress": "hidden", "api_visibility": "private"}
    upload.upload(accepted, upload, None, concurrency_limit=None, **quiet).failure(
        lambda: None, None, upload, queue=False, **quiet
    )
    return upload


def accepted(image: Any) -> None:
    """Nothing: the field's own preprocessing (`refuse_unreadable_uploads`) has checked the upload."""


# ------------------------------------------------------------------------------------------------ samplers
def option_field(sampler: str, option: str) -> str:
    """The name of a sampler option's field among the page check's inputs."""
    return f"{sampler}__{option}"


@dataclass
class SamplerPanel:
    """The sampler chooser: a radio, one line about the chosen sampler, its options (one group per sampler,
    only the chosen one's shown, with its defaults), and a hidden field holding the chosen sampler's spec
    (`"jacobi:tolerance=0.001"`), which is what the Generate handler (and an API client) passes."""

    choice: gr.Radio
    explanation: gr.Markdown
    groups: dict[str, gr.Group]
    fields: dict[str, gr.Number]
    spec: gr.Textbox

    def inputs(self) -> dict[str, Any]:
        """The panel's fields, by name, as a check's inputs (see `compose`)."""
        return {"sampler_choice": self.choice, **self.fields}

    def compose(self, values: dict[str, Any]) -> str:
        return compose_sampler(values)

    def show(self, name: str) -> list[Any]:
        """Updates for [explanation, *groups] when `name` is chosen."""
        return [explain_sampler(name), *(gr.Group(visible=key == name) for key in self.groups)]


def compose_sampler(values: dict[str, Any]) -> str:
    """The spec of the sampler a panel shows, from its fields by `SamplerPanel.inputs()` name (the chosen sampler's
    options only); `ValueError` for a bad option."""
    name = values.get("sampler_choice")
    prefix = f"{name}__"
    options = {key.removeprefix(prefix): value for key, value in values.items() if key.startswith(prefix)}
    return sampler_spec(build_sampler(name, options))


def explain_sampler(name: str) -> str:
    return f"**{name}**: {SAMPLER_HELP.get(name, '')}"


def sampler_panel(offered: list[str], default: str, measured: str) -> SamplerPanel:
    choice = gr.Radio(offered, value=default, label="Sampler", info=f"How the flow is run backwards. {measured}")
    explanation = gr.Markdown(explain_sampler(default), elem_id="sampler-help")
    groups, fields = {}, {}
    for name in offered:
        with gr.Group(visible=name == default) as group:
            options = sampler_options(name)
            if not options:
                gr.Markdown(f"The {name} sampler has no options.")
            for option in options:
                fields[option_field(name, option.name)] = gr.Number(
                    value=option.default,
                    label=option.name.replace("_", " "),
                    info=option.help,
                    precision=0 if option.kind is int else None,
                    minimum=0 if option.kind is int else None,
                )
        groups[name] = group
    spec = gr.Textbox(value=default, visible=False, label="sampler")
    panel = SamplerPanel(choice, explanation, groups, fields, spec)
    choice.input(
        panel.show,
        choice,
        [explanation, *groups.values()],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    return panel


# ------------------------------------------------------------------------------------------------ guidance
def guidance_fields(with_target: bool) -> dict[str, Any]:
    """The Advanced controls of guidance and sampling, by request field name."""
    fields = {}
    if with_target:
        fields["guidance_target"] = gr.Radio(
            list(GUIDANCE_TARGETS), value="both", label="Guidance target", info=GUIDANCE_TARGET_HELP
        )
    fields["guidance_schedule"] = gr.Radio(
        list(GUIDANCE_SCHEDULES), value="constant", label="Guidance schedule", info=GUIDANCE_SCHEDULE_HELP
    )
    fields["unconditional_temperature"] = gr.Slider(
        *TEMPERATURE_RANGE,
        value=1.0,
        step=0.05,
        label="Unguided branch temperature",
        info=UNCONDITIONAL_TEMPERATURE_HELP,
    )
    fields["attention_temperature"] = gr.Slider(
        *TEMPERATURE_RANGE, value=1.0, step=0.05, label="Attention temperature", info=ATTENTION_TEMPERATURE_HELP
    )
    fields["denoise"] = gr.Slider(*DENOISE_RANGE, value=1.0, step=0.05, label="Denoising strength", info=DENOISE_HELP)
    return fields


def seed_field() -> tuple[gr.Number, gr.Button]:
    with gr.Row(equal_height=True):
        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=3)
        button = gr.Button("Random seed", scale=1, elem_id="random-seed")
    button.click(
        lambda: random.randint(0, MAX_SEED), None, seed, api_name="random_seed", queue=False, show_progress="hidden"
    )
    return seed, button


# ---------------------------------------------------------------------------------------------- the outputs
@dataclass
class GenerationView:
    """The samples gallery, the timing line and the trajectory (a slider over the recorded frames)."""

    gallery: gr.Gallery
    timing: gr.Markdown
    frames: gr.State
    step: gr.Slider
    step_image: gr.Image

    @property
    def outputs(self) -> list[Any]:
        return [self.gallery, self.timing, self.frames, self.step, self.step_image]

    @property
    def resettable(self) -> list[Any]:
        return [self.frames, self.step]

    def reset(self, num_blocks: int) -> tuple[Any, ...]:
        """Updates for `resettable` when another model (of `num_blocks` blocks) is loaded."""
        return [], gr.Slider(maximum=num_blocks + 1, value=0, label="Sampling step (0 = noise)")


def generation_view(num_blocks: int) -> GenerationView:
    gallery = gr.Gallery(
        label="Samples",
        columns=GALLERY_COLUMNS,
        height="auto",
        format="png",
        object_fit="contain",
        fit_columns=False,
        elem_id="samples",
        elem_classes=["labelled"],
    )
    timing = gr.Markdown(elem_id="timing")
    frames = gr.State([])
    step = gr.Slider(0, num_blocks + 1, value=0, step=1, label="Sampling step (0 = noise)", interactive=True)
    step_image = gr.Image(
        label="The images forming, block by block",
        format="png",
        interactive=False,
        elem_id="trajectory",
        elem_classes=["labelled"],
    )
    view = GenerationView(gallery, timing, frames, step, step_image)
    step.release(show_step, [frames, step], [step, step_image], api_name="show_step", queue=False)
    return view


def show_step(recorded: list[tuple[str, PIL.Image.Image]], step: float) -> tuple[Any, Any]:
    if not recorded:
        return gr.Slider(), None
    index = min(max(int(step), 0), len(recorded) - 1)
    caption, frame = recorded[index]
    return gr.Slider(label=f"Sampling step: {caption}"), for_display(frame, step=caption)


def generation_outputs(result: Generation, seed: int, name: str, summary: str) -> tuple[Any, ...]:
    """What a generation puts in `GenerationView.outputs`."""
    items = [
        (for_display(upscale(image, DISPLAY_SIZE), seed=seed + i, model=name), f"seed {seed + i}")
        for i, image in enumerate(result.images)
    ]
    last = len(result.frames) - 1
    caption, frame = result.frames[last]
    return (
        items,
        summary,
        result.frames,
        gr.Slider(maximum=last, value=last, label=f"Sampling step: {caption}"),
        for_display(frame, step=caption),
    )
