"""The TarFlow Likelihood tab: what only a flow gives for any image, drawn or uploaded: its exact bits per
dimension, the class probabilities by Bayes' rule, its latent, and the image decoded back from that latent."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import torch

from tarflow_hf.labels import menu_names

from .components import image_input, image_upload
from .events import guarded
from .images import INVERT_CHOICES, fit_to_model, for_display, latents_to_pil, the_image, upscale
from .limits import check_choice, env_int
from .models import ModelRef, ModelStore
from .space import Page, Space

HELP = """Draw, or upload an image (or click an example), and score it. It is fitted to the model's size and channels
first; the picture on the right is what the model scores."""
INVERT_HELP = "MNIST-like models see light strokes on black; auto inverts a drawing whose border is light."
CENTER_HELP = "crop to the strokes, scale and centre them as MNIST's digits were prepared (grey models)."
BITS_HELP = "lower = more likely under the model"


@dataclass(frozen=True)
class LikelihoodRequest:
    """A Score click, checked: the image, and how to fit it to the model."""

    image: PIL.Image.Image
    invert: str = "auto"
    center: bool = False

    @classmethod
    def parse(cls, values: dict[str, Any]) -> LikelihoodRequest:
        return cls(
            the_image(values.get("image")),
            check_choice("invert", values.get("invert", "auto"), INVERT_CHOICES),
            bool(values.get("center", False)),
        )


@dataclass
class Analysis:
    model_input: PIL.Image.Image
    bits_per_dim: float
    probabilities: dict[str, float] | None
    best_class: str | None
    best_bits_per_dim: float | None
    latent: PIL.Image.Image
    latent_std: float
    reconstruction: PIL.Image.Image
    reconstruction_error: float  # largest pixel difference, in 8-bit grey levels


def analyze_image(pipe: Any, request: LikelihoodRequest) -> Analysis:
    """Fit the image to the model, then: its bits/dim (unconditional branch, dequantized with a fixed seed), class
    probabilities by Bayes' rule, its latent and the image decoded back from that latent."""
    config = pipe.transformer.config
    model_input = fit_to_model(request.image, config.image_size, config.num_channels, request.invert, request.center)
    bits = pipe.bits_per_dim([model_input], generator=torch.Generator().manual_seed(0)).item()
    probabilities = best_class = best_bits = None
    max_classes = env_int("TARFLOW_MAX_CLASSIFY", 1000 if pipe._execution_device.type == "cuda" else 100)
    if 0 < config.num_classes <= max_classes:
        scores = pipe.classify([model_input])[0].tolist()
        names = menu_names(pipe.id2label)  # in class order, names that occur twice told apart
        probabilities = dict(zip(names, scores, strict=True))
        best = int(np.argmax(scores))
        best_class = names[best]
        best_bits = pipe.bits_per_dim(
            [model_input], class_labels=[best], generator=torch.Generator().manual_seed(0)
        ).item()
    latents = pipe.encode([model_input])
    reconstruction = pipe.decode(latents, output_type="pt").cpu()
    error = (reconstruction - pipe.preprocess([model_input])).abs().max().item() * 255
    return Analysis(
        model_input=model_input,
        bits_per_dim=bits,
        probabilities=probabilities,
        best_class=best_class,
        best_bits_per_dim=best_bits,
        latent=latents_to_pil(pipe, latents)[0],
        latent_std=latents.float().std().item(),
        reconstruction=pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(reconstruction))[0],
        reconstruction_error=error,
    )


def analyze_task(store: ModelStore, model: ModelRef, request: LikelihoodRequest) -> Analysis:
    """The model's part of a Score click (what runs under `spaces.GPU`)."""
    return analyze_image(store.load(model), request)


def describe_analysis(result: Analysis, conditional: bool) -> str:
    lines = [f"**{result.bits_per_dim:.3f} bits/dim** under the unconditional branch."]
    if result.best_class is not None:
        lines.append(f"Most likely class: **{result.best_class}**, {result.best_bits_per_dim:.3f} bits/dim under it.")
    elif conditional:
        lines.append("(Too many classes to score each one on this hardware: no class probabilities.)")
    lines.append(
        f"Latent std {result.latent_std:.2f} (the prior's is 1; clean images, without the noise the model was "
        f"trained with, land nearer the centre). Decoding the latent gives the input back to within "
        f"{result.reconstruction_error:.2g} grey levels."
    )
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------------ examples
def example_images(pipe: Any, sample: PIL.Image.Image | None) -> list[PIL.Image.Image]:
    """Clickable examples for any model: a sample of the model itself (low bits/dim), uniform noise (high), and
    for grey models a stroke drawn dark on light, as a visitor draws (inverted and centred before scoring)."""
    config = pipe.transformer.config
    size, mode = config.image_size, "L" if config.num_channels == 1 else "RGB"
    noise = np.random.default_rng(0).integers(0, 256, (size, size, config.num_channels), dtype=np.uint8)
    examples = [] if sample is None else [sample]
    examples.append(PIL.Image.fromarray(noise.squeeze(-1) if mode == "L" else noise, mode))
    if mode == "L":
        stroke = np.full((140, 140), 255, dtype=np.uint8)
        stroke[20:120, 60:75] = 0
        examples.append(PIL.Image.fromarray(stroke, "L"))
    return examples


# ---------------------------------------------------------------------------------------------------- page
@dataclass
class ImageSources:
    """Where the scored image comes from: a drawing pad (its brush ready) or an upload field (with examples),
    in tabs of their own; `source` says which tab is shown, `image` is the chosen picture the handler reads."""

    source: gr.State
    pad: gr.Sketchpad
    upload: gr.Image
    image: gr.Image


def image_sources(space: Space, pipe: Any) -> ImageSources:
    config = pipe.transformer.config
    canvas = min(512, max(280, 2 * config.image_size))
    source = gr.State("draw")
    with gr.Tabs():
        with gr.Tab("Draw") as draw_tab:
            pad = gr.Sketchpad(
                value=PIL.Image.new("RGB", (canvas, canvas), "white"),  # with a background the brush is ready
                label="Draw here",
                type="pil",
                image_mode="RGBA",
                transforms=(),
                canvas_size=(canvas, canvas),
                brush=gr.Brush(default_size=max(4, canvas // 12), colors=["#000000"], color_mode="fixed"),
                layers=False,
                elem_id="drawing",
            )
        with gr.Tab("Upload") as upload_tab:
            upload = image_upload("Upload an image", elem_id="upload")
            examples = example_images(pipe, space.calibration.sample)
            gr.Examples([[image] for image in examples], inputs=[upload], label="Examples (click one)")
    draw_tab.select(lambda: "draw", None, source, queue=False, api_visibility="private")
    upload_tab.select(lambda: "upload", None, source, queue=False, api_visibility="private")
    return ImageSources(source, pad, upload, image_input("image", format="png", visible=False))


@dataclass
class Scores:
    """What a Score click shows."""

    fitted: gr.Image
    bits: gr.Textbox
    probabilities: gr.Label
    latent: gr.Image
    reconstruction: gr.Image
    details: gr.Markdown

    @property
    def outputs(self) -> list[Any]:
        return [self.fitted, self.bits, self.probabilities, self.latent, self.reconstruction, self.details]


def scores(conditional: bool) -> Scores:
    picture = {"format": "png", "interactive": False, "elem_classes": ["labelled"]}
    with gr.Row():
        fitted = gr.Image(label="Model input", **picture)
        bits = gr.Textbox(
            label="bits / dim", info=BITS_HELP, placeholder="not scored yet", interactive=False, elem_id="bits"
        )
    probabilities = gr.Label(label="p(class | image), Bayes' rule", num_top_classes=5, visible=conditional)
    with gr.Row():
        latent = gr.Image(label="Latent z (±3 std = black..white)", **picture)
        reconstruction = gr.Image(label="Decoded from z", **picture)
    return Scores(fitted, bits, probabilities, latent, reconstruction, gr.Markdown())


def build(space: Space, pipe: Any) -> Page:
    config = pipe.transformer.config
    grey = config.num_channels == 1
    with gr.Tab("Likelihood"):
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column():
                sources = image_sources(space, pipe)
                with gr.Row(visible=grey) as fitting:
                    invert = gr.Radio(list(INVERT_CHOICES), value="auto", label="Invert", info=INVERT_HELP)
                    center = gr.Checkbox(value=grey, label="Centre like MNIST", info=CENTER_HELP)
                button = gr.Button("Score this image", variant="primary", elem_id="analyze-button")
            with gr.Column():
                shown = scores(config.num_classes > 0)
    run = space.on_gpu(functools.partial(analyze_task, space.store))

    def check(model: ModelRef, source: str, drawing: Any, upload: Any, **values: Any) -> PIL.Image.Image:
        chosen = drawing if source == "draw" else upload
        LikelihoodRequest.parse({**values, "image": chosen})
        return the_image(chosen)

    @space.active_calls.counted
    def on_analyze(model: ModelRef, **values: Any) -> tuple[Any, ...]:
        pipe = space.pipeline(model)
        result = run(model, LikelihoodRequest.parse(values))
        return (
            for_display(upscale(result.model_input), kind="model input"),
            f"{result.bits_per_dim:.4f}",
            result.probabilities,
            for_display(upscale(result.latent), kind="latent"),
            for_display(upscale(result.reconstruction), kind="decoded latent"),
            describe_analysis(result, pipe.transformer.config.num_classes > 0),
        )

    options = {"invert": invert, "center": center}
    guarded(
        button.click,
        check,
        on_analyze,
        [space.model_state],
        shown.outputs,
        "analyze",
        fields={"image": sources.image, **options},
        check_fields={"source": sources.source, "drawing": sources.pad, "upload": sources.upload, **options},
        check_outputs=[sources.image],
    )

    def updates(pipe: Any) -> tuple[Any, ...]:
        config = pipe.transformer.config
        grey = config.num_channels == 1
        return gr.Row(visible=grey), gr.Checkbox(value=grey), gr.Label(value=None, visible=config.num_classes > 0)

    return Page([fitting, center, shown.probabilities], updates)
