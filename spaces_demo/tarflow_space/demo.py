"""The Space assembled: the served model loaded and calibrated, the header (what is served; the Model field where
the operator allows visitors to load others), the family's tabs, and the queue.

```python
>>> demo = build_demo("path/to/pipeline")
>>> launch(demo, server_name="127.0.0.1", prevent_thread_lock=True)
```
"""

from __future__ import annotations

import functools
import os
from typing import Any

import gradio as gr
import torch

from tarflow_hf import registry
from tarflow_hf.guidance import GuidanceRule
from tarflow_hf.samplers import SAMPLERS, get_sampler

from . import page_captions, page_generate, page_interpolation, page_likelihood, page_text_to_image
from .components import CSS, PAGE_JS, theme
from .events import MODEL_EVENTS, checked
from .gpu import gpu_decorator
from .limits import MAX_UPLOAD_MB, env_flag, env_int
from .models import MAX_NAME_LENGTH, ModelCatalog, ModelRef, ModelStore, ServingOptions, describe, operator_model
from .sampling import Generation, SamplingRequest, images_within_budget
from .space import Page, Space
from .timing import Calibration, TimeEstimator, calibrate

INTRO = {
    "tarflow": "# TarFlow: a normalizing flow that draws\nSample images, score any image exactly, walk between images.",
    "starflow": "# STARFlow: text to image with a normalizing flow\nSample images for a prompt, rank captions exactly.",
}
ABOUT = {
    "tarflow": """[TarFlow](https://arxiv.org/abs/2412.06329) stacks causal transformer blocks into an invertible map
between images and Gaussian noise. Run backwards it **samples**; run forwards it gives the **exact likelihood** of any
image, and an **exact latent**: things a diffusion model or a GAN cannot give you.""",
    "starflow": """[STARFlow](https://arxiv.org/abs/2506.06276) is a normalizing flow over the latents of an
autoencoder, guided by a text prompt. Run backwards it **samples** an image for a prompt; run forwards it gives the
**exact likelihood** of an image's latent under any caption, so it can **rank captions** for an image by Bayes'
rule.""",
}

# The tabs of each family, in order.
CLASS_PAGES = (page_generate.build, page_likelihood.build, page_interpolation.build)
TEXT_TO_IMAGE_PAGES = (page_text_to_image.build, page_captions.build)


# -------------------------------------------------------------------------------------------------- startup
def offered_samplers(pipe: Any) -> tuple[str, ...]:
    """The samplers with at least one unguided image within the budget (the others are not offered at all)."""
    return tuple(name for name in SAMPLERS if images_within_budget(pipe, get_sampler(name), guided=False) > 0)


def one_image(family: registry.ModelFamily, store: ModelStore, model: ModelRef, sampler: str) -> Generation:
    """One unguided image with `sampler`, no trajectory: a calibration run (under `spaces.GPU` on the Hub)."""
    pipe = store.load(model)
    rule = GuidanceRule(pipe.transformer.config.default_guidance_rule)
    request = SamplingRequest(1, 1.0, 0, get_sampler(sampler), rule)
    if family.text_to_image:
        return page_text_to_image.generate_from_prompt(
            pipe, page_text_to_image.PROMPT_EXAMPLES[0], request, record=False
        )
    class_id = 0 if pipe.transformer.config.num_classes else None
    return page_generate.generate_images(pipe, class_id, request, record=False)


def calibrate_served(
    family: registry.ModelFamily, store: ModelStore, on_gpu: Any, offered: tuple[str, ...], estimator: TimeEstimator
) -> Calibration:
    """The startup measurements ($TARFLOW_CALIBRATE=0 skips them); $TARFLOW_SAMPLER forces the default sampler."""
    forced = os.environ.get("TARFLOW_SAMPLER", "").strip() or None
    if forced is not None and forced not in offered:
        raise SystemExit(f"TARFLOW_SAMPLER={forced!r}: use one of {', '.join(offered)} (within this server's budget)")
    if not env_flag("TARFLOW_CALIBRATE", True):
        return Calibration({}, {}, forced or "sequential", None)
    run = on_gpu(functools.partial(one_image, family, store, store.startup))
    calibration = calibrate(lambda sampler: run(sampler.name), list(offered), estimator, forced)
    if family.text_to_image:
        rank = on_gpu(functools.partial(page_captions.rank_task, store, store.startup))
        side = page_text_to_image.image_size(store.load(store.startup))
        image = calibration.sample or page_captions.examples(None, side)[0][0]
        result = rank(page_captions.RankingRequest(image, page_text_to_image.PROMPT_EXAMPLES[:2]))
        estimator.observe_ranking(2, result.seconds)
    return calibration


# --------------------------------------------------------------------------------------------------- header
def header(space: Space, pipe: Any) -> tuple[Any, Any, gr.Markdown]:
    """What is served, with the Model field and its button where visitors may load another model."""
    family = space.family.name
    gr.Markdown(INTRO[family], elem_classes=["intro"])
    with gr.Accordion("About", open=False):
        gr.Markdown(ABOUT[family])
        license_note = space.family.weights_license
        if license_note is not None:
            gr.Markdown(f"{license_note.note} {license_note.attribution}")
    model_box = load_button = None
    if space.catalog.allow_change:
        with gr.Row(equal_height=True):
            offered = "a Hub id" + (" or a model folder offered by this server" if space.catalog.root else "")
            model_box = gr.Textbox(
                value=space.startup.name, label=f"Model: {offered}", max_length=MAX_NAME_LENGTH, scale=4
            )
            load_button = gr.Button("Load model", scale=1)
    return model_box, load_button, gr.Markdown(describe(pipe, space.startup.name))


def wire_model_loading(space: Space, model_box: Any, load_button: Any, info: Any, pages: list[Page]) -> None:
    """The Load model button, only where visitors may change the model (otherwise no handler that loads a model
    exists at all): a model of the served family, for this browser session."""
    if not space.catalog.allow_change:
        return

    def check_load(text: str) -> None:
        space.check_family(space.catalog.resolve(text))

    @space.active_calls.counted
    def on_load(text: str) -> tuple[Any, ...]:
        ref = space.catalog.resolve(text)
        pipe = space.pipeline(ref)
        return ref, ref.name, describe(pipe, ref.name), *(update for page in pages for update in page.updates(pipe))

    outputs = [space.model_state, model_box, info, *(output for page in pages for output in page.outputs)]
    event = load_button.click(checked(check_load), [model_box], None, concurrency_limit=None,
                              api_visibility="undocumented", show_progress="hidden")  # fmt: skip
    event = event.success(on_load, [model_box], outputs, api_name="load_model", **MODEL_EVENTS)
    for page in pages:
        for follow in page.follow:
            follow(event)


# ---------------------------------------------------------------------------------------------------- build
def build_demo(
    model: str | None = None,
    concurrency_limit: int | None = None,
    queue_size: int | None = None,
    allow_model_change: bool | None = None,
    model_root: str | None = None,
) -> gr.Blocks:
    """The app, with its queue configured. `model` (the operator's choice: a pipeline folder, a Hub id or
    "bundled"; TarFlow or STARFlow) defaults to $TARFLOW_MODEL, then the bundled MNIST model; `concurrency_limit`
    / `queue_size` to $TARFLOW_CONCURRENCY / $TARFLOW_QUEUE_SIZE (1 / 32); `allow_model_change` to
    $TARFLOW_ALLOW_MODEL_CHANGE (off); `model_root` to $TARFLOW_MODEL_ROOT. The `Space` behind the pages is
    `demo.space`."""
    threads = env_int("TARFLOW_TORCH_THREADS", 0, minimum=0)
    if threads:
        torch.set_num_threads(threads)
    startup = operator_model(model or os.environ.get("TARFLOW_MODEL") or "bundled")
    store = ModelStore(startup, ServingOptions.from_env())
    pipe = store.load(startup)
    family = registry.family_of_model(pipe)
    allow = env_flag("TARFLOW_ALLOW_MODEL_CHANGE", False) if allow_model_change is None else allow_model_change
    root = model_root if model_root is not None else (os.environ.get("TARFLOW_MODEL_ROOT") or None)
    on_gpu = gpu_decorator()
    offered = offered_samplers(pipe)
    estimator = TimeEstimator()
    calibration = calibrate_served(family, store, on_gpu, offered, estimator)
    catalog = ModelCatalog(startup, bool(allow), root)
    space = Space(catalog, store, family, on_gpu, calibration, offered, estimators={startup.location: estimator})
    # Output files are cached per response (see images.for_display): every 30 minutes drop those older than an hour.
    with gr.Blocks(title=f"{family.title} demo", delete_cache=(1800, 3600)) as demo:
        space.model_state = gr.State(startup)
        model_box, load_button, info = header(space, pipe)
        with gr.Tabs():
            builders = TEXT_TO_IMAGE_PAGES if family.text_to_image else CLASS_PAGES
            pages = [build(space, pipe) for build in builders]
        for page in pages:
            for name, endpoint in page.endpoints.items():
                gr.api(endpoint, api_name=name, queue=False)
        wire_model_loading(space, model_box, load_button, info, pages)
    concurrency = concurrency_limit or env_int("TARFLOW_CONCURRENCY", 1)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size or env_int("TARFLOW_QUEUE_SIZE", 32))
    demo.space = space
    return demo


def launch(demo: gr.Blocks, **kwargs: Any) -> Any:
    """`demo.launch` with the demo's theme, style and upload size limit (MAX_UPLOAD_MB) unless given otherwise."""
    kwargs.setdefault("max_file_size", f"{MAX_UPLOAD_MB}mb")
    kwargs.setdefault("theme", theme())
    kwargs.setdefault("css", CSS)
    kwargs.setdefault("js", PAGE_JS)
    return demo.launch(**kwargs)
