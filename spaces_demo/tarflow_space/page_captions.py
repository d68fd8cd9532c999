"""The STARFlow Likelihood tab: candidate captions ranked for an image by Bayes' rule over the exact likelihoods of
the image's latent under each caption (`pipe.classify`: no CLIP involved)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image

from .components import image_upload
from .events import guarded
from .images import fit_to_model, for_display, the_image, upscale
from .limits import MAX_CAPTIONS, check_budget, parse_captions, ranking_rows
from .models import ModelRef, ModelStore
from .page_text_to_image import PROMPT_EXAMPLES, image_size
from .space import Page, Space
from .timing import describe_estimate

HELP = """Upload an image (or click an example) and type candidate captions, one per line: each caption gets
p(caption | image) by Bayes' rule over the exact likelihoods of the image's latent under every caption (a uniform
prior over them). Transparency is flattened onto white; the image is centre-cropped and resized to the model's
size."""
DISPLAY_SIDE = 256


@dataclass(frozen=True)
class RankingRequest:
    """A Rank click, checked."""

    image: PIL.Image.Image
    captions: tuple[str, ...]

    @classmethod
    def parse(cls, pipe: Any, values: dict[str, Any]) -> RankingRequest:
        captions = tuple(parse_captions(values.get("captions")))
        config = pipe.transformer.config
        check_budget(ranking_rows(config, 1), len(captions), "captions")
        return cls(the_image(values.get("image")), captions)


@dataclass
class Ranking:
    model_input: PIL.Image.Image
    probabilities: dict[str, float]  # caption -> p(caption | image), over the candidates
    best: str
    bits_per_dim: float  # of the image's latent under the best caption
    seconds: float


def rank_captions(pipe: Any, request: RankingRequest) -> Ranking:
    start = time.perf_counter()
    model_input = fit_to_model(request.image, image_size(pipe), 3, invert="no")
    scores = pipe.classify([model_input], list(request.captions))[0].tolist()
    probabilities = dict(zip(request.captions, scores, strict=True))
    best = request.captions[int(np.argmax(scores))]
    bits = pipe.bits_per_dim([model_input], best).item()
    return Ranking(model_input, probabilities, best, bits, time.perf_counter() - start)


def rank_task(store: ModelStore, model: ModelRef, request: RankingRequest) -> Ranking:
    """The model's part of a Rank click (what runs under `spaces.GPU`)."""
    return rank_captions(store.load(model), request)


def ranking_estimate(space: Space, model: ModelRef, captions_text: Any) -> str:
    try:
        captions = parse_captions(captions_text)
    except ValueError as error:
        return f"Not possible yet: {error}."
    seconds = space.estimator_for(model).ranking_seconds(len(captions))
    return describe_estimate(seconds, f"ranking {len(captions)} captions")


def examples(sample: PIL.Image.Image | None, side: int) -> list[list[Any]]:
    """Clickable examples: the model's own image for the first example prompt (from the startup calibration),
    and uniform noise, each with the same candidate captions."""
    captions = "\n".join(PROMPT_EXAMPLES[:3])
    noise = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
    return [[image, captions] for image in ([sample] if sample is not None else []) + [noise]]


def build(space: Space, pipe: Any) -> Page:
    default_captions = "\n".join(PROMPT_EXAMPLES[:3])
    with gr.Tab("Likelihood"):
        gr.Markdown(HELP)
        with gr.Row():
            with gr.Column():
                upload = image_upload("Image", elem_id="upload")
                captions = gr.Textbox(value=default_captions, label="Candidate captions, one per line", lines=5)
                gr.Examples(examples(space.calibration.sample, image_size(pipe)), inputs=[upload, captions],
                            label="Examples (click one)")  # fmt: skip
                estimate = gr.Markdown(
                    ranking_estimate(space, space.startup, default_captions), elem_id="rank-estimate"
                )
                button = gr.Button("Rank the captions", variant="primary", elem_id="rank-button")
            with gr.Column():
                fitted = gr.Image(
                    label="Model input",
                    format="png",
                    interactive=False,
                    elem_id="rank-input",
                    elem_classes=["labelled"],
                )
                ranking = gr.Label(
                    label="p(caption | image), Bayes' rule", num_top_classes=MAX_CAPTIONS, elem_id="ranking"
                )
                details = gr.Markdown(elem_id="rank-details")
    run = space.on_gpu(functools.partial(rank_task, space.store))

    def check(model: ModelRef, **values: Any) -> None:
        RankingRequest.parse(space.pipeline(model), values)

    @space.active_calls.counted
    def on_rank(model: ModelRef, **values: Any) -> tuple[Any, ...]:
        result = run(model, RankingRequest.parse(space.pipeline(model), values))
        space.estimator_for(model).observe_ranking(len(result.probabilities), result.seconds)
        text = (
            f"Best caption: **{result.best}** ({result.probabilities[result.best]:.1%}); the image's latent has "
            f"{result.bits_per_dim:.3f} bits/dim under it. {len(result.probabilities)} captions ranked in "
            f"{result.seconds:.2f} s."
        )
        return for_display(upscale(result.model_input, DISPLAY_SIDE), kind="model input"), result.probabilities, text

    captions.change(
        functools.partial(ranking_estimate, space),
        [space.model_state, captions],
        estimate,
        queue=False,
        show_progress="hidden",
        api_name="estimate_ranking",
    )
    guarded(
        button.click,
        check,
        on_rank,
        [space.model_state],
        [fitted, ranking, details],
        "rank",
        fields={"image": upload, "captions": captions},
    )
    return Page([], lambda pipe: ())
