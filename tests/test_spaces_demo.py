"""The Gradio Space (spaces_demo/: `app.py` and the `tarflow_space` package beside it), served on loopback and driven
through `gradio_client` as a visitor's browser or script would: generation through the samplers and guidance rules
as objects, the trajectory, the budget, errors, the likelihood tools, models and sessions, the queue, ZeroGPU and the
offloaded GPU configuration, and the Space's Hub metadata.

The served model is a tiny class-conditional TarFlow (8x8 grey images, 3 classes) trained here for a few seconds
on synthetic "bar" images (horizontal, vertical, diagonal), so that the likelihood checks compare things with a
known answer: a new bar image against uniform noise, a vertical bar against the other classes.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import types
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no traffic off loopback

import gradio as gr
import httpx
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from conftest import random_model
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tarflow_hf import StarFlowPipeline, TarFlowPipeline, registry
from tarflow_hf.guidance import GuidanceRule
from tarflow_hf.samplers import SAMPLERS, JacobiSampler

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "spaces_demo"
sys.path.insert(0, str(SPACE))  # the Space's package sits beside app.py, as it does on the Hub

from tarflow_space import (  # noqa: E402
    components,
    events,
    gpu,
    images,
    limits,
    models,
    page_generate,
    page_interpolation,
    page_likelihood,
    sampling,
)
from tarflow_space import demo as space_demo  # noqa: E402

CLASS_NAMES = {0: "horizontal bar", 1: "vertical bar", 2: "diagonal"}
SIZE = 8
TRAIN_STEPS = 120
CONCURRENCY = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(demo: gr.Blocks) -> str:
    port = free_port()
    space_demo.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def bars(labels: list[int], generator: torch.Generator) -> torch.Tensor:
    """Light bars on black in [0, 1], (N, 1, 8, 8): a horizontal or vertical bar at a random row / column, or the
    diagonal."""
    images = torch.zeros(len(labels), 1, SIZE, SIZE)
    positions = torch.randint(1, SIZE - 1, (len(labels),), generator=generator).tolist()
    inner = torch.arange(1, SIZE - 1)
    for i, (label, position) in enumerate(zip(labels, positions, strict=True)):
        if label == 0:
            images[i, 0, position, 1 : SIZE - 1] = 1
        elif label == 1:
            images[i, 0, 1 : SIZE - 1, position] = 1
        else:
            images[i, 0, inner, inner] = 1
    return images


def to_png(image: torch.Tensor | np.ndarray, path: Path) -> Path:
    """An (1, H, W) tensor or (H, W) array in [0, 1] -> an 8-bit greyscale PNG."""
    array = image.squeeze().numpy() if isinstance(image, torch.Tensor) else image
    PIL.Image.fromarray(np.round(array * 255).astype(np.uint8), mode="L").save(path)
    return path


def read(path: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def read_grey(path: str) -> np.ndarray:
    """A grid (tarflow_hf.grids draws RGB) of grey images, as grey levels (exact: R = G = B)."""
    image = PIL.Image.open(path)
    assert image.mode == "RGB" and np.ptp(np.asarray(image), axis=-1).max() == 0
    return np.asarray(image.convert("L"))


def generate_args(class_name="vertical bar", count=2, guidance=1.0, seed=0, sampler="sequential", **overrides):
    """`/generate`'s parameters (the others keep the page's defaults)."""
    values = dict(class_name=class_name, num_images=count, guidance_scale=guidance, seed=seed, sampler=sampler)
    return values | overrides


def interpolate_args(between="two seeds", class_name="horizontal bar", frames=5, path="spherical", **overrides):
    values = dict(between=between, class_name=class_name, frames=frames, path=path, image_a=None, image_b=None)
    return values | overrides


def save_tiny_starflow(folder: Path) -> Path:
    """A tiny random STARFlow pipeline (32x32 images, 4x4x4 latents) with the T5 fixture and a word-level
    tokenizer."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    from tarflow_hf import StarFlowConfig, StarFlowModel

    words = "a photo of cat dog red blue car fox in the snow sitting on sofa".split()  # noqa: SIM905
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = StarFlowConfig(sample_size=4, hidden_size=32, layers_per_block=[1, 1], head_dim=32, text_hidden_size=32,
                            max_text_length=8, default_guidance_scale=2.0)  # fmt: skip
    transformer = StarFlowModel(config).eval()
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "proj_out" in name:
                parameter.normal_(0.0, 0.05)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=32, scaling_factor=0.18215).eval()  # fmt: skip
    text_encoder = T5EncoderModel.from_pretrained(REPO / "tests" / "fixtures" / "starflow" / "t5_tiny").eval()
    StarFlowPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae).save_pretrained(
        folder
    )
    return folder


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """The operator's model root: the folders visitors may load by name when model change is on."""
    return tmp_path_factory.mktemp("models-root")


@pytest.fixture(scope="module")
def model_dir(models_root) -> Path:
    """A tiny conditional TarFlow fit to bar images for TRAIN_STEPS steps (about 3 s), saved as a pipeline."""
    model = random_model(seed=0, id2label=dict(CLASS_NAMES), default_guidance_scale=2.0).train()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(TRAIN_STEPS):
        labels = torch.randint(0, 3, (64,), generator=generator)
        images = bars(labels.tolist(), generator) * 2 - 1
        images = images + model.config.noise_std * torch.randn(images.shape, generator=generator)
        loss = model(images, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = models_root / "bars"
    TarFlowPipeline(transformer=model.eval()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rgb_unconditional_dir(models_root) -> Path:
    folder = models_root / "rgb-uncond"
    TarFlowPipeline(transformer=random_model(seed=3, num_classes=0, num_channels=3)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def starflow_dir(tmp_path_factory) -> Path:
    return save_tiny_starflow(tmp_path_factory.mktemp("starflow") / "tiny-starflow")


@pytest.fixture(scope="module")
def pipe(model_dir) -> TarFlowPipeline:
    """The served model loaded independently of the Space, to compute expected outputs."""
    pipe = TarFlowPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def demo(model_dir, models_root, rgb_unconditional_dir):
    """The Space with model change on (visitors may load the folders under `models_root`, by name)."""
    demo = space_demo.build_demo(
        str(model_dir), concurrency_limit=CONCURRENCY, queue_size=64, allow_model_change=True,
        model_root=str(models_root),
    )  # fmt: skip
    demo.url = serve(demo)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def server(demo) -> str:
    return demo.url


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("client-downloads")


@pytest.fixture
def client(server, downloads) -> Client:
    """A new browser session (its own model choice and trajectory)."""
    return Client(server, verbose=False, analytics_enabled=False, download_files=str(downloads))


@pytest.fixture
def calls_to(monkeypatch):
    """`calls_to(cls)`: the keyword arguments of every `cls.__call__` from now on (the pipeline calls the Space
    makes)."""

    def spy(cls) -> list[dict]:
        recorded = []
        real = cls.__call__

        def call(self, *args, **kwargs):
            recorded.append(kwargs)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", call)
        return recorded

    return spy


def upscale_factor() -> int:
    return images.DISPLAY_SIZE // SIZE


def test_app_py_is_the_small_entry_point_of_the_package():
    spec = importlib.util.spec_from_file_location("tarflow_space_app", SPACE / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.build_demo is space_demo.build_demo and app.main.__module__ == "tarflow_space.cli"
    assert (SPACE / "app.py").read_text().count("\n") < 60


# ------------------------------------------------------------------------------------------------ generate
def test_generate_returns_the_requested_images_with_timing(client):
    for count in (1, 3):
        gallery, timing, slider, step_image = client.predict(**generate_args(count=count), api_name="/generate")
        assert [item["caption"] for item in gallery] == [f"seed {i}" for i in range(count)]
        side = SIZE * upscale_factor()
        for item in gallery:
            image = PIL.Image.open(item["image"])
            assert image.mode == "L" and image.size == (side, side)
        seconds = re.search(rf"^{count} image\(s\) in \*\*(\d+\.\d+) s\*\*", timing)
        assert seconds and 0 < float(seconds.group(1)) < 60, timing
        assert "30 model steps one after another (one patch at a time: 30)" in timing  # 2 blocks x 15 steps
        # Trajectory: prior noise, after each of the 2 blocks, denoised; the slider ends on the last frame.
        assert slider["maximum"] == 3 and slider["value"] == 3
        assert Path(step_image).is_file()


def test_random_seed_button_gives_seeds_in_range(client):
    seeds = {client.predict(api_name="/random_seed") for _ in range(3)}
    assert all(isinstance(seed, int) and 0 <= seed <= limits.MAX_SEED for seed in seeds)
    assert len(seeds) > 1


def test_generated_images_are_the_pipelines_and_reproducible(client, pipe):
    first, *_ = client.predict(**generate_args(count=2, seed=5, guidance=2.0), api_name="/generate")
    again, *_ = client.predict(**generate_args(count=2, seed=5, guidance=2.0), api_name="/generate")
    later, *_ = client.predict(**generate_args(count=1, seed=6, guidance=2.0), api_name="/generate")
    first_images = [read(item["image"]) for item in first]
    assert all(np.array_equal(a, read(b["image"])) for a, b in zip(first_images, again, strict=True))
    # ... in files of their own: Gradio rewrites a cached image in place, so equal responses must not share one.
    assert not {Path(item["image"]).parent.name for item in first} & {Path(item["image"]).parent.name for item in again}
    assert PIL.Image.open(first[0]["image"]).info["tarflow:seed"] == "5"
    # Image i comes from seed + i whatever the batch: seed 6 alone is the second image of seed 5's pair (up to
    # float rounding, which may differ with the batch size, and so a grey level).
    assert np.abs(first_images[1].astype(int) - read(later[0]["image"])).max() <= 1
    assert not np.array_equal(first_images[0], first_images[1])
    # ... and it is exactly what the pipeline gives for those seeds, shown enlarged by whole pixels.
    expected = pipe(
        class_labels=["vertical bar"],
        num_images_per_label=2,
        guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(seed) for seed in (5, 6)],
    ).images
    factor = upscale_factor()
    for shown, image in zip(first_images, expected, strict=True):
        assert np.array_equal(shown[::factor, ::factor], np.asarray(image))


def test_the_pipeline_gets_a_sampler_object_and_a_guidance_rule(client, calls_to):
    """The new API: the sampler is an object built from its spec (options included), the guidance rule a
    `GuidanceRule` with the page's target, schedule and unguided-branch temperature; the trajectory comes from
    `callback_on_step_end`."""
    calls = calls_to(TarFlowPipeline)
    options = dict(guidance_target="scale", guidance_schedule="linear", unconditional_temperature=0.5, denoise=0.5)
    client.predict(**generate_args(count=1, guidance=2.0, sampler="jacobi:tolerance=0.001,window=4", **options),
                   api_name="/generate")  # fmt: skip
    (call,) = calls
    assert call["sampler"] == JacobiSampler(tolerance=1e-3, window=4)
    assert call["guidance_rule"] == GuidanceRule("extrapolate", "scale", "linear", 0.5)
    assert call["denoise"] == 0.5 and callable(call["callback_on_step_end"])
    assert not {"return_trajectory", "guidance_target", "guidance_schedule", "noise_std"} & set(call)


def test_trajectory_slider_shows_each_step(client):
    *_, slider, final_frame = client.predict(**generate_args(count=2, seed=1), api_name="/generate")
    frames = [read(client.predict(step, api_name="/show_step")[1]) for step in range(slider["maximum"] + 1)]
    assert np.array_equal(frames[-1], read(final_frame))
    # Every step changes the picture: noise -> block 1 -> block 2 -> denoised.
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(frames))


def test_trajectory_frames_are_the_images_the_callback_sees(pipe):
    """The frame after block k holds the images `callback_on_step_end` gives after block k (model space)."""
    request = sampling.SamplingRequest(2, 1.0, 4, JacobiSampler(), GuidanceRule(), denoise=0.0)
    result = page_generate.generate_images(pipe, 1, request)
    seen = []
    pipe(class_labels=[1], num_images_per_label=2, guidance_scale=1.0, sampler=JacobiSampler(), denoise=False,
         generator=request.generators(),
         callback_on_step_end=lambda p, step, block, kw: seen.append(kw["latents"]))  # fmt: skip
    captions = [caption for caption, _ in result.frames]
    assert captions == ["prior noise", "after flow block 1 of 2", "after flow block 2 of 2"]
    for (_, frame), latents in zip(result.frames[1:], seen, strict=True):
        expected = images.tile(images.model_space_to_pil(pipe, latents))
        assert np.array_equal(np.asarray(frame), np.asarray(expected))


def test_progress_bar_advances_per_flow_block(client, monkeypatch):
    """gr.Progress is fed from the pipeline's per-block callback. The server runs in this process, so each block
    waits here until the client has seen its update (or 10 s): no update can be missed by polling too late on a
    busy machine, and a server that never sends one still fails the assertions."""
    real = page_generate.generate_images
    seen = set()
    seen_changed = threading.Condition()

    def slow_generate(*args, report=None, **kwargs):
        def until_seen(done, total, text):
            report(done, total, text)
            with seen_changed:
                seen_changed.wait_for(lambda: any(index == done for index, *_ in seen), timeout=10)

        return real(*args, report=until_seen, **kwargs)

    monkeypatch.setattr(page_generate, "generate_images", slow_generate)
    job = client.submit(**generate_args(count=1), api_name="/generate")
    while not job.done():
        status = job.status()
        with seen_changed:
            seen.update((unit.index, unit.length, unit.desc) for unit in status.progress_data or [])
            seen_changed.notify_all()
        time.sleep(0.02)
    assert len(job.result()[0]) == 1
    steps = {(index, length) for index, length, _ in seen}
    assert {(1, 3), (2, 3)} <= steps, seen  # 2 flow blocks + the denoising step
    assert any("flow block 1/2" in desc for *_, desc in seen), seen


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"class_name": "vertical bra"}, "did you mean 'vertical bar'"),
        ({"class_name": "7"}, "class id 7 is out of range"),
        ({"count": 0}, "less than minimum value 1"),
        ({"count": 17}, "greater than maximum value"),
        ({"guidance": 50.0}, "greater than maximum value 12"),
        ({"seed": -1}, "less than minimum value 0"),
        ({"sampler": "euler"}, "sampler must be one of sequential, jacobi, newton, block_jacobi; got 'euler'"),
        ({"sampler": "jacobi:tolerance=-1"}, "tolerance must be a finite number > 0, got -1"),
        ({"sampler": "jacobi:speed=2"}, "expected key=value with a key among max_iterations, sequential_blocks"),
        ({"class_name": " "}, "pick a class"),
        ({"guidance_target": "everything"}, "'everything'"),
    ],
)
def test_bad_generate_inputs_give_readable_errors(client, overrides, message):
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(**generate_args(**overrides), api_name="/generate")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"denoise": float("nan")}, "denoising strength must be between 0 and 2, got nan"),
        ({"guidance_scale": float("inf")}, "guidance scale must be between 0.1 and 12, got inf"),
        ({"num_images": 2.5}, "number of images must be a whole number"),
        ({"num_images": True}, "number of images must be a number"),
        ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
        ({"unconditional_temperature": 0}, "unconditional temperature must be between 0.1 and 4"),
        ({"sampler": 3}, "sampler must be one of"),
    ],
)
def test_generation_requests_are_checked_on_the_server(demo, pipe, overrides, message):
    """The server-side checks behind the page's own (which a direct call, or NaN, would get past)."""
    values = dict(class_name="vertical bar", num_images=1, guidance_scale=1.0, seed=0, sampler="sequential")
    with pytest.raises(ValueError, match=re.escape(message)):
        page_generate.parse_request(demo.space, pipe, values | overrides)


def test_an_overflowing_sample_is_refused_not_shown(pipe, monkeypatch):
    """NaN pixels would be cast to arbitrary grey levels and shown as an image: the Space refuses them."""
    real = TarFlowPipeline.__call__

    def overflowing(self, *args, **kwargs):
        output = real(self, *args, **kwargs)
        output.images[0, 0, 0] = np.nan
        return output

    monkeypatch.setattr(TarFlowPipeline, "__call__", overflowing)
    request = sampling.SamplingRequest(2, 1.0, 0, JacobiSampler(), GuidanceRule())
    with pytest.raises(FloatingPointError, match="non-finite values"):
        page_generate.generate_images(pipe, 1, request)


@pytest.mark.parametrize("sampler", ["jacobi", "newton"])
def test_parallel_samplers_report_their_passes(pipe, sampler):
    def run(name: str) -> sampling.Generation:
        request = sampling.SamplingRequest(2, 2.0, 3, SAMPLERS[name](), GuidanceRule(), denoise=0.0)
        return page_generate.generate_images(pipe, 1, request)

    exact, parallel = run("sequential"), run(sampler)
    assert exact.transformer_passes == 30
    assert 2 <= parallel.transformer_passes < 30
    for a, b in zip(exact.images, parallel.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # same up to rounding


# ---------------------------------------------------------------------------------------- samplers on the page
def test_each_samplers_options_come_from_its_constructor():
    for name, cls in SAMPLERS.items():
        parameters = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        parameters = [p for p in parameters if p.name not in sampling.SERVER_ONLY_OPTIONS]
        options = sampling.sampler_options(name)
        assert [(o.name, o.default) for o in options] == [(p.name, p.default) for p in parameters]
        assert all(option.help for option in options), name  # a one-line explanation for each
        assert sampling.SAMPLER_HELP[name]
    assert not {option.name for option in sampling.sampler_options("sequential")} & sampling.SERVER_ONLY_OPTIONS
    assert sampling.build_sampler("sequential", {"compile_mode": "max-autotune"}).compile_mode is None
    jacobi = {option.name: option for option in sampling.sampler_options("jacobi")}
    assert jacobi["window"].kind is int and jacobi["window"].optional and jacobi["tolerance"].kind is float


def test_the_page_shows_the_chosen_samplers_options_with_their_defaults(demo):
    """One group of fields per offered sampler, holding its options at their defaults; only the default
    sampler's group is visible, and picking another shows its own (and its one-line explanation)."""
    panel = next(c for c in demo.blocks.values() if getattr(c, "label", None) == "Sampler")
    assert panel.value == demo.space.calibration.default_sampler
    assert set(panel.choices) == {(name, name) for name in demo.space.offered_samplers}
    fields = {c.label: c for c in demo.blocks.values() if isinstance(c, gr.Number) and c.info}
    for option in sampling.sampler_options("block_jacobi"):
        field = fields[option.name.replace("_", " ")]
        assert field.value == option.default or option.name in ("max_iterations", "sequential_blocks")
    choose = next(fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "show")
    explanation, *groups = choose.fn("block_jacobi")
    assert "approximate" in explanation
    visible = [group.get("visible", None) if isinstance(group, dict) else group.visible for group in groups]
    assert visible.count(True) == 1


def test_the_sampler_panel_composes_the_chosen_samplers_spec():
    values = {"sampler_choice": "jacobi", "jacobi__tolerance": 0.001, "jacobi__window": 4.0,
              "jacobi__max_iterations": None, "jacobi__sequential_blocks": None, "newton__tolerance": 5.0}  # fmt: skip
    assert components.compose_sampler(values) == "jacobi:tolerance=0.001,window=4"
    every_block = components.compose_sampler(values | {"jacobi__sequential_blocks": 0})
    assert every_block == "jacobi:tolerance=0.001,window=4,sequential_blocks=0"
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        components.compose_sampler(values | {"jacobi__window": 0.5})
    with pytest.raises(ValueError, match="needs a value"):
        components.compose_sampler({"sampler_choice": "newton", "newton__tolerance": None})


def test_one_progress_bar_on_the_gallery_and_no_other_spinner(demo):
    generate = next(fn for fn in demo.fns.values() if fn.api_name == "generate")
    gallery = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "samples")
    assert generate.show_progress_on == [gallery] and len(generate.outputs) > 1
    checks = [fn for fn in demo.fns.values() if fn.api_visibility == "undocumented"]  # the page's checks
    assert checks and all(fn.show_progress == "hidden" for fn in checks)


def descendants(block) -> list:
    children = getattr(block, "children", [])
    return [*children, *(grandchild for child in children for grandchild in descendants(child))]


def test_every_advanced_control_has_a_one_line_explanation_and_guidance_starts_at_1(demo):
    (advanced,) = [
        block for block in demo.blocks.values() if isinstance(block, gr.Accordion) and block.label == "Advanced"
    ]
    controls = [b for b in descendants(advanced) if isinstance(b, gr.Radio | gr.Slider | gr.Number | gr.Checkbox)]
    assert len(controls) >= 9  # sampler, its options, guidance target, schedule, two temperatures, denoising
    assert all(control.info and "\n" not in control.info for control in controls), [c.label for c in controls]
    guidance = next(c for c in demo.blocks.values() if getattr(c, "label", None) == "Guidance scale")
    assert guidance.value == 1.0 != demo.space.served().transformer.config.default_guidance_scale


# ------------------------------------------------------------------------------------------------- budget
def test_expensive_requests_are_refused_before_any_work_in_plain_words(client, monkeypatch):
    """The newton sampler computes ~72x the rows of the sequential one here: 16 newton images are over a budget
    that 16 sequential ones fit. The refusal says how many fit, at once and without jargon, and that many do."""
    monkeypatch.setenv("TARFLOW_MAX_ROWS", "20000")
    start = time.perf_counter()
    with pytest.raises(AppError) as error:
        client.predict(**generate_args(count=16, guidance=2.0, sampler="newton"), api_name="/generate")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "times the work this server allows per request" in message and "rows" not in message, message
    fit = int(re.search(r"ask for at most (\d+) image\(s\) with the newton sampler", message).group(1))
    assert "or choose the sequential sampler" in message
    gallery, *_ = client.predict(**generate_args(count=fit, guidance=2.0, sampler="newton"), api_name="/generate")
    assert len(gallery) == fit
    with pytest.raises(AppError, match=f"at most {fit} image"):
        client.predict(**generate_args(count=fit + 1, guidance=2.0, sampler="newton"), api_name="/generate")
    assert len(client.predict(**generate_args(count=16, guidance=2.0), api_name="/generate")[0]) == 16


def test_the_estimate_is_shown_in_tarflow_mode_and_caps_what_exceeds_the_budget(client, monkeypatch):
    monkeypatch.setenv("TARFLOW_MAX_ROWS", "20000")
    sequential = client.predict(4, 2.0, "sequential", api_name="/estimate")
    assert "Expected time for 4 image(s) with the sequential sampler" in sequential and "at most" not in sequential
    newton = client.predict(4, 2.0, "newton", api_name="/estimate")
    fit = int(re.search(r"at most (\d+) image", newton).group(1))
    assert 0 < fit < 16 and f"Expected time for {min(4, fit)} image(s) with the newton sampler" in newton
    assert "times the sequential work" in newton


def test_samplers_over_the_budget_for_one_image_are_not_offered(model_dir, monkeypatch):
    monkeypatch.setenv("TARFLOW_MAX_ROWS", "1000")  # newton needs 2304 rows for one unguided image here
    monkeypatch.setenv("TARFLOW_CALIBRATE", "0")
    demo = space_demo.build_demo(str(model_dir))
    assert "newton" not in demo.space.offered_samplers and "sequential" in demo.space.offered_samplers


# ------------------------------------------------------------------------------------------------ uploads
def test_bad_uploads_give_readable_errors_at_once(client, tmp_path):
    not_an_image = tmp_path / "digit.png"
    not_an_image.write_text("this is not a PNG")
    wide = tmp_path / "wide.png"
    PIL.Image.new("L", (5000, 4)).save(wide)
    huge = tmp_path / "huge.png"
    PIL.Image.new("L", (5000, 5000), 255).save(huge)  # small on disk, 25 megapixels decoded
    cases = [
        (not_an_image, "could not read the upload as an image"),
        (wide, "the image is too large: at most 4096x4096 pixels, got 5000x4"),
        (huge, "the image is too large: at most 4096x4096 pixels, got 5000x5000"),
    ]
    for path, message in cases:
        start = time.perf_counter()
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(handle_file(str(path)), "no", False, api_name="/analyze")
        assert time.perf_counter() - start < 3
    with pytest.raises(AppError, match="no image: upload or draw one first"):
        client.predict(None, "no", False, api_name="/analyze")
    with pytest.raises(AppError, match="upload two images"):
        client.predict(**interpolate_args("two images", image_a=None, image_b=None), api_name="/interpolate")


def test_upload_headers_are_checked_without_decoding(tmp_path):
    huge = tmp_path / "huge.png"
    PIL.Image.new("L", (20000, 20000), 255).save(huge)  # a decompression bomb: 400 megapixels
    start = time.perf_counter()
    with pytest.raises(ValueError, match="too large"):
        images.check_image_file(huge)
    assert time.perf_counter() - start < 0.5
    images.check_image_file(to_png(np.zeros((SIZE, SIZE)), tmp_path / "fine.png"))


def test_server_refuses_uploads_over_the_size_limit(server):
    """Checked by the server itself (gradio_client would refuse before sending): raw HTTP over loopback."""
    limit = limits.MAX_UPLOAD_MB * 1024 * 1024
    for size, status in ((limit + 1024, 413), (1024, 200)):
        response = httpx.post(f"{server}gradio_api/upload", files={"files": ("x.png", b"\0" * size, "image/png")})
        assert response.status_code == status, response.text
    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("x.png", b"\0" * (limit + 1), "image/png")})
    assert f"maximum allowed size of {limit} bytes" in response.text


def test_refusals_stay_until_dismissed():
    """Gradio's error toasts vanish after 10 s by default; the Space's stay until the visitor closes them."""
    assert events.refusal("x").duration is None

    @events.ActiveCalls().counted
    def handler():
        raise ValueError("bad input")

    with pytest.raises(gr.Error) as error:
        handler()
    assert error.value.duration is None and error.value.message == "bad input"


# ---------------------------------------------------------------------------------------------- likelihood
def test_likelihood_prefers_a_training_like_image_to_noise(client, pipe, tmp_path):
    """A vertical bar drawn fresh (the model saw bars of this kind in training) against uniform noise: the model
    must give the bar far fewer bits/dim, classify it as a vertical bar, and decode its latent back to it."""
    generator = torch.Generator().manual_seed(123)
    bar = to_png(bars([1], generator)[0], tmp_path / "bar.png")
    noise = to_png(torch.rand(1, SIZE, SIZE, generator=generator), tmp_path / "noise.png")
    results = {}
    for name, path in (("bar", bar), ("noise", noise)):
        fitted, bits, label, latent, reconstruction, details = client.predict(
            handle_file(str(path)), "no", False, api_name="/analyze"
        )
        shown = read(fitted)
        factor = shown.shape[0] // SIZE
        assert np.array_equal(shown[::factor, ::factor], read(path))  # no preprocessing at the model's size
        assert abs(read(reconstruction)[::factor, ::factor].astype(int) - read(path)).max() <= 1
        assert read(latent).shape == shown.shape
        expected = pipe.bits_per_dim([PIL.Image.open(path)], generator=torch.Generator().manual_seed(0)).item()
        assert float(bits) == pytest.approx(expected, abs=1e-3)
        assert float(re.search(r"(\d+\.\d+) bits/dim", details).group(1)) == pytest.approx(expected, abs=1e-3)
        results[name] = (float(bits), label)
    assert results["bar"][0] + 5 < results["noise"][0], results
    label = results["bar"][1]
    assert label["label"] == "vertical bar"
    confidences = {item["label"]: item["confidence"] for item in label["confidences"]}
    assert set(confidences) == set(CLASS_NAMES.values())
    assert confidences["vertical bar"] > 0.9 and sum(confidences.values()) == pytest.approx(1, abs=1e-4)


def test_a_drawing_is_inverted_centred_and_recognised(client, tmp_path):
    """A dark stroke on a light canvas, off-centre and far larger than the model (what a person draws): fitted to
    a light bar on black in the middle of an 8x8 image, and recognised."""
    canvas = np.full((280, 280), 255, dtype=np.uint8)
    canvas[40:250, 20:50] = 0  # a vertical stroke near the left edge
    drawing = tmp_path / "drawing.png"
    PIL.Image.fromarray(canvas).save(drawing)
    fitted, _, label, *_ = client.predict(handle_file(str(drawing)), "auto", True, api_name="/analyze")
    shown = read(fitted)
    small = shown[:: shown.shape[0] // SIZE, :: shown.shape[0] // SIZE]
    assert small[0].max() == 0 and small[:, 0].max() == 0  # dark background
    columns = np.nonzero(small.max(axis=0) > 128)[0]
    assert len(columns) == 1 and 3 <= columns[0] <= 4  # one light column, centred
    assert label["label"] == "vertical bar"


def test_the_likelihood_tab_offers_clickable_examples(demo):
    examples = [c for c in demo.blocks.values() if isinstance(c, gr.Dataset) and "Examples" in (c.label or "")]
    upload = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "upload")
    (dataset,) = [d for d in examples if upload in d._components]
    assert len(dataset.samples) >= 2  # a sample of the model and noise, at least


def test_bits_per_dim_is_empty_before_scoring(demo):
    bits = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "bits")
    assert not bits.value and "not scored" in bits.placeholder


def test_fit_to_model_handles_sizes_modes_and_transparency():
    exact = PIL.Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    assert np.array_equal(np.asarray(images.fit_to_model(exact, 8, 1, invert="no")), np.asarray(exact))
    # A transparent canvas with one opaque black stroke: flattened on white, then inverted for a grey model.
    drawing = PIL.Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    drawing.paste((0, 0, 0, 255), (30, 0, 34, 32))
    fitted = images.fit_to_model(drawing, 8, 1, invert="auto")
    assert fitted.mode == "L" and fitted.size == (8, 8)
    pixels = np.asarray(fitted)
    # Centre-cropped to a square (x 16..48), resized: the stroke (x 30..34) lands on columns 3-4, light on dark.
    assert pixels[:, 3:5].min() > 100
    assert np.delete(pixels, [3, 4], axis=1).max() < 10
    rgb = images.fit_to_model(drawing, 4, 3, invert="auto")  # colour models are never inverted automatically
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="invert must be one of"):
        images.fit_to_model(exact, 8, 1, invert="sometimes")


# -------------------------------------------------------------------------------------------- interpolation
def test_interpolation_between_seeds_starts_and_ends_at_their_samples(client, demo):
    sampler = demo.space.calibration.default_sampler
    strip = client.predict(**interpolate_args(seed_a=3, seed_b=4, guidance_scale=2.0), api_name="/interpolate")
    strip = read_grey(strip)
    tile = page_interpolation.FRAME_SIDE // SIZE * SIZE
    assert strip.shape == (tile, 5 * tile)  # tarflow_hf.grids.make_grid: tiles side by side
    samples, *_ = client.predict(**generate_args("horizontal bar", count=2, seed=3, guidance=2.0, sampler=sampler),
                                 api_name="/generate")  # fmt: skip
    factor = upscale_factor()
    step = tile // SIZE
    for sample, offset in ((samples[0], 0), (samples[1], 4 * tile)):
        expected = read(sample["image"])[::factor, ::factor].astype(int)
        assert np.abs(strip[::step, offset : offset + tile : step] - expected).max() <= 1  # batches of 5 and 2
    middle = strip[::step, 2 * tile : 3 * tile : step]
    assert not np.array_equal(middle, read(samples[0]["image"])[::factor, ::factor])


def test_interpolation_between_images_is_exact_at_the_ends(client, tmp_path):
    generator = torch.Generator().manual_seed(7)
    first, second = bars([0, 2], generator)
    paths = [to_png(first, tmp_path / "a.png"), to_png(second, tmp_path / "b.png")]
    for method in ("spherical", "linear"):
        strip = read_grey(client.predict(**interpolate_args(
            "two images", "(no class: unconditional branch)", 4, method, image_a=handle_file(str(paths[0])),
            image_b=handle_file(str(paths[1])), invert="no", center=False), api_name="/interpolate"))  # fmt: skip
        tile = strip.shape[0]
        step = tile // SIZE
        ends = (strip[::step, :tile:step], strip[::step, -tile::step])
        for end, path in zip(ends, paths, strict=True):
            assert np.abs(end.astype(int) - read(path)).max() <= 1


def test_transparent_uploads_are_flattened_onto_white(client, tmp_path):
    """An RGBA upload (a black bar on a transparent background whose hidden colour is black) is seen on white, as
    the pipelines' preprocess sees it (tarflow_hf.images.flatten_alpha)."""
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[2:6, 3, 3] = 255  # an opaque black bar; everything else fully transparent black
    path = tmp_path / "transparent.png"
    PIL.Image.fromarray(rgba, mode="RGBA").save(path)
    strip = read_grey(client.predict(**interpolate_args(
        "two images", "(no class: unconditional branch)", 3, "linear", image_a=handle_file(str(path)),
        image_b=handle_file(str(path)), invert="no", center=False), api_name="/interpolate"))  # fmt: skip
    step = strip.shape[0] // SIZE
    first = strip[::step, : strip.shape[0] : step].astype(int)
    expected = np.full((SIZE, SIZE), 255)
    expected[2:6, 3] = 0
    assert np.abs(first - expected).max() <= 1, first


def test_slerp_keeps_the_ends_and_the_norm():
    generator = torch.Generator().manual_seed(0)
    start, end = torch.randn(2, 1, 16, 4, generator=generator)
    path = page_interpolation.slerp(start, end, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], start[0])
    torch.testing.assert_close(path[-1], end[0])
    norms = path.flatten(1).norm(dim=1)
    assert norms.min() > torch.lerp(start, end, 0.5).norm()  # the arc stays near the typical norm
    assert torch.allclose(page_interpolation.slerp(start, start, torch.tensor([0.3])), start)


def test_interpolation_shows_only_the_inputs_of_its_mode(demo):
    toggle = next(fn for fn in demo.fns.values() if fn.fn is page_interpolation.inputs_for)
    seeds_group, images_group = toggle.outputs
    assert seeds_group.visible and not images_group.visible  # the default mode, two seeds
    for choice, seeds_shown in (("two images", False), ("two seeds", True)):
        seeds, images_ = page_interpolation.inputs_for(choice)
        assert seeds.visible is seeds_shown and images_.visible is not seeds_shown


# ------------------------------------------------------------------------------------------ models, sessions
def test_each_session_loads_its_own_model(client, server, downloads, rgb_unconditional_dir, models_root):
    """Model change is on here: a visitor loads a folder of the operator's model root by its name, and sees that
    name only (never the server's absolute path)."""
    shown, info, *_ = client.predict("rgb-uncond", api_name="/load_model")
    assert shown == "rgb-uncond"
    assert "unconditional" in info and "8x8x3" in info and str(models_root) not in info
    gallery, *_ = client.predict(**generate_args(class_name=None, count=2), api_name="/generate")
    assert [PIL.Image.open(item["image"]).mode for item in gallery] == ["RGB", "RGB"]
    assert PIL.Image.open(gallery[0]["image"]).info["tarflow:model"] == "rgb-uncond"
    # Another session still has the default (grey, conditional) model.
    other = Client(server, verbose=False, analytics_enabled=False, download_files=str(downloads))
    gallery, *_ = other.predict(**generate_args(count=1), api_name="/generate")
    assert PIL.Image.open(gallery[0]["image"]).mode == "L"


@pytest.fixture
def hub(monkeypatch, tmp_path) -> list[str]:
    """The Hub client intercepted: every repository is a copy of a TarFlow pipeline here; returns the calls."""
    folder = tmp_path / "hub-snapshot"
    TarFlowPipeline(transformer=random_model(seed=6)).save_pretrained(folder)
    calls = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, **kw: calls.append(repo) or str(folder / name))  # fmt: skip
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append(repo) or str(folder))
    return calls


def test_visitors_load_only_hub_ids_and_folders_under_the_root(client, models_root, tmp_path, hub):
    """Anything else gets one message, the same whether the path exists or not, with no server path in it."""
    outside = tmp_path / "outside"
    TarFlowPipeline(transformer=random_model(seed=5)).save_pretrained(outside)  # a real pipeline, not offered
    (models_root / "escape").symlink_to(outside, target_is_directory=True)  # a link out of the root
    (models_root / "broken").mkdir()
    (models_root / "broken" / "model_index.json").write_text('{"_class_name": "SomethingElse"}')
    messages = {}
    for text in (str(outside), str(tmp_path / "missing"), "../" + outside.name, "escape", "~", "/etc", "no such model"):
        with pytest.raises(AppError) as error:
            client.predict(text, api_name="/load_model")
        messages[text] = str(error.value)
        assert str(tmp_path) not in messages[text] and str(models_root) not in messages[text]
        assert messages[text].startswith("not a model this server offers")
    assert len(set(messages.values())) == 1, messages  # existing or not, inside or outside: one answer
    with pytest.raises(AppError, match=re.escape("could not load 'broken' (not a TarFlow or STARFlow pipeline)")):
        client.predict("broken", api_name="/load_model")
    # A Hub id goes to the Hub (intercepted here), never to a folder of that name on the server.
    shown, info, *_ = client.predict("someone/tarflow-model", api_name="/load_model")
    assert set(hub) == {"someone/tarflow-model"} and shown == "someone/tarflow-model"
    assert str(tmp_path) not in info


def test_a_model_of_the_other_family_is_refused_before_loading(client, demo, models_root, calls_to, monkeypatch):
    """A STARFlow folder offered to a TarFlow page: refused from its model_index.json (tarflow_hf.registry),
    nothing loaded, and the served model stays in memory."""
    save_tiny_starflow(models_root / "other-family")
    served = demo.space.served()
    loads = []
    real = StarFlowPipeline.from_pretrained.__func__
    monkeypatch.setattr(StarFlowPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: loads.append(a) or real(cls, *a, **kw)))  # fmt: skip
    refusal = "'other-family' is a STARFlow model; this page serves TarFlow models"
    with pytest.raises(AppError, match=re.escape(refusal)):
        client.predict("other-family", api_name="/load_model")
    assert not loads and demo.space.served() is served


def test_a_model_name_of_any_length_gets_a_clear_answer(client):
    with pytest.raises(AppError, match=re.escape("a model name is at most 1024 characters, got 100,000")):
        client.predict("x" * 100_000, api_name="/load_model")
    with pytest.raises(AppError, match="not a model this server offers"):
        client.predict("a" * 300, api_name="/load_model")  # a file name too long for the file system


def test_the_store_loads_a_model_once_for_visitors_asking_at_the_same_time(rgb_unconditional_dir, monkeypatch):
    startup = models.ModelRef("local", str(rgb_unconditional_dir), "rgb-uncond")
    store = models.ModelStore(startup, models.ServingOptions("cpu", torch.float32))
    loads = []
    real = TarFlowPipeline.from_pretrained.__func__

    def slow(cls, *args, **kwargs):
        loads.append(args)
        time.sleep(0.3)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "from_pretrained", classmethod(slow))
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.load(startup))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(results) == 4 and all(result is results[0] for result in results)


def test_model_change_is_off_by_default_even_for_raw_requests(model_dir, rgb_unconditional_dir, monkeypatch):
    """With the defaults there is no model field, and no handler on the server loads a model: every registered
    function, called by a raw queue request (fn_index over HTTP on loopback) with another model's folder for each
    input, loads nothing."""
    for name in ("TARFLOW_ALLOW_MODEL_CHANGE", "TARFLOW_MODEL_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TARFLOW_CALIBRATE", "0")
    loads = []
    real = TarFlowPipeline.from_pretrained.__func__

    def spy(cls, location, *args, **kwargs):
        loads.append(str(location))
        return real(cls, location, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "from_pretrained", classmethod(spy))
    demo = space_demo.build_demo(str(model_dir))
    assert not [block for block in demo.blocks.values() if isinstance(block, gr.Textbox) and "Model" in block.label]
    url = serve(demo)
    try:
        base = f"{url}gradio_api"
        target = str(rgb_unconditional_dir)
        for fn_index, fn in demo.fns.items():
            session = f"raw-{fn_index}"
            body = {"data": [target] * len(fn.inputs), "fn_index": fn_index, "session_hash": session}
            joined = httpx.post(f"{base}/queue/join", json=body, timeout=30)
            if joined.status_code != 200:
                continue
            deadline = time.monotonic() + 30
            with httpx.stream("GET", f"{base}/queue/data", params={"session_hash": session}, timeout=30) as stream:
                for line in stream.iter_lines():
                    if '"process_completed"' in line or time.monotonic() > deadline:
                        break
        assert not [location for location in loads if Path(location).resolve() == rgb_unconditional_dir.resolve()]
    finally:
        demo.close()


def test_model_comes_from_the_environment(rgb_unconditional_dir, monkeypatch):
    monkeypatch.setenv("TARFLOW_MODEL", str(rgb_unconditional_dir))
    monkeypatch.setenv("TARFLOW_ALLOW_MODEL_CHANGE", "1")
    monkeypatch.setenv("TARFLOW_CALIBRATE", "0")
    demo = space_demo.build_demo()
    model_box = next(c for c in demo.blocks.values() if isinstance(c, gr.Textbox) and c.label.startswith("Model"))
    assert model_box.value == "rgb-uncond"  # its name: no server path on the page
    dropdowns = [block for block in demo.blocks.values() if isinstance(block, gr.Dropdown)]
    assert dropdowns and not any(dropdown.visible for dropdown in dropdowns)  # no class picker: unconditional


# ------------------------------------------------------------------------------------------------- queue
def test_queue_serves_20_concurrent_requests_within_its_limit(client, demo, monkeypatch, tmp_path):
    """20 requests at once, generations and likelihoods mixed: all answered, never more than CONCURRENCY model
    calls at a time across both kinds (each call is held for 0.15 s so that, without the limit, they would
    overlap far more)."""
    for module, name in ((page_generate, "generate_images"), (page_likelihood, "analyze_image")):
        real = getattr(module, name)

        def held(*args, real=real, **kwargs):
            time.sleep(0.15)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, held)
    bar = to_png(bars([0], torch.Generator().manual_seed(1))[0], tmp_path / "bar.png")
    calls = demo.space.active_calls
    calls.reset()
    start = time.perf_counter()
    jobs = [
        client.submit(handle_file(str(bar)), "no", False, api_name="/analyze")
        if i % 4 == 3
        else client.submit(**generate_args(count=1 + i % 3, seed=i), api_name="/generate")
        for i in range(20)
    ]
    results = [job.result(timeout=120) for job in jobs]
    elapsed = time.perf_counter() - start
    for i, result in enumerate(results):
        if i % 4 == 3:
            assert result[2]["label"] == "horizontal bar"
        else:
            assert [item["caption"] for item in result[0]] == [f"seed {i + j}" for j in range(1 + i % 3)]
    assert calls.total == 20
    assert calls.peak == CONCURRENCY  # used in parallel, and no further
    assert elapsed >= 20 * 0.15 / CONCURRENCY


def test_concurrent_visitors_get_the_images_they_would_get_alone(server, downloads, pipe):
    """Several visitors on one pipeline at once (the queue runs CONCURRENCY calls together): each gets exactly
    the images the pipeline gives for its seeds alone."""
    seeds = (0, 10, 30, 40)  # (20 and 21 overflow in this tiny model's denoising step: refused, not compared)
    clients = [Client(server, verbose=False, analytics_enabled=False, download_files=str(downloads)) for _ in seeds]
    jobs = [c.submit(**generate_args(count=2, seed=seed, guidance=2.0, sampler="jacobi"), api_name="/generate")
            for seed, c in zip(seeds, clients, strict=True)]  # fmt: skip
    for seed, job in zip(seeds, jobs, strict=True):
        gallery = job.result(timeout=120)[0]
        expected = pipe(class_labels=["vertical bar"], num_images_per_label=2, guidance_scale=2.0, sampler="jacobi",
                        generator=[torch.Generator().manual_seed(seed + j) for j in range(2)]).images  # fmt: skip
        for item, image in zip(gallery, expected, strict=True):
            assert np.array_equal(read(item["image"])[:: upscale_factor(), :: upscale_factor()], np.asarray(image))


def test_time_estimates_stay_consistent_under_concurrent_observations():
    from tarflow_space.timing import TimeEstimator

    estimator = TimeEstimator()
    threads = [
        threading.Thread(target=lambda n=n: [estimator.observe_sampling("jacobi", n, 0.1 * n) for _ in range(200)])
        for n in (1, 2, 3, 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert estimator.sampling_seconds("jacobi", 10) == pytest.approx(1.0, rel=1e-6)  # every point on 0.1 s/image


# ------------------------------------------------------------------------------------------------ startup
def test_startup_prints_one_line_per_event(model_dir, tmp_path):
    """`python spaces_demo/app.py MODEL`: no progress bars (diffusers printed "Loading pipeline components" twice)
    and no INFO line per HTTP request from httpx."""
    port = free_port()
    log = tmp_path / "startup.log"
    env = {**os.environ, "TARFLOW_MODEL": str(model_dir), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "TARFLOW_TORCH_THREADS": "1"}  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, str(SPACE / "app.py")], stdout=out, stderr=subprocess.STDOUT,
                                   env=env)  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and "Running on local URL" not in log.read_text():
                assert process.poll() is None, log.read_text()
                time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
            time.sleep(1.0)
        finally:
            process.terminate()
            process.wait(timeout=20)
    text = log.read_text()
    assert "Running on local URL" in text, text
    assert text.count("Loading pipeline components") <= 1, text
    assert "Loading weights" not in text and "it/s]" not in text, text
    assert "INFO:httpx" not in text and "HTTP Request:" not in text, text
    assert "loaded model bars (tarflow)" in text and "Measured at startup" in text, text


# ------------------------------------------------------------------------------------------------- STARFlow
def test_starflow_mode_prompts_estimates_and_ranks_captions(starflow_dir, tmp_path, downloads, monkeypatch):
    """The operator serves a STARFlow model: a prompt box with examples replaces the class picker, the expected
    time is shown before running (from the startup calibration), the default sampler is the fastest exact-enough
    one measured, and the likelihood tab ranks typed captions exactly as `pipe.classify` does."""
    monkeypatch.setenv("TARFLOW_MODEL", str(starflow_dir))
    monkeypatch.delenv("TARFLOW_ALLOW_MODEL_CHANGE", raising=False)
    demo = space_demo.build_demo()
    assert not [c for c in demo.blocks.values() if isinstance(c, gr.Dropdown)]  # no class picker
    assert any(getattr(block, "elem_id", None) == "prompt" for block in demo.blocks.values())
    calibration = demo.space.calibration
    assert set(calibration.seconds) == set(demo.space.offered_samplers) and calibration.deviation["sequential"] == 0
    exact = [name for name in calibration.seconds if calibration.deviation[name] <= 2.0]
    assert calibration.default_sampler == min(exact, key=calibration.seconds.__getitem__)
    guidance = next(c for c in demo.blocks.values() if getattr(c, "label", None) == "Guidance scale")
    assert guidance.value == 1.0 != demo.space.served().transformer.config.default_guidance_scale
    client = Client(serve(demo), verbose=False, analytics_enabled=False, download_files=str(downloads))
    try:
        one = client.predict(1, 2.0, "sequential", api_name="/estimate")
        four = client.predict(4, 2.0, "sequential", api_name="/estimate")
        seconds = [float(re.search(r"about (\d+\.\d+) s", text).group(1)) for text in (one, four)]
        assert 0 < seconds[0] < seconds[1], (one, four)
        gallery, timing, slider, _ = client.predict(prompt="a red car", num_images=2, guidance_scale=2.0, seed=7,
                                                    sampler="jacobi", api_name="/generate")  # fmt: skip
        assert len(gallery) == 2 and PIL.Image.open(gallery[0]["image"]).size == (192, 192)  # 32 px, x6 for display
        assert "2 image(s) in" in timing and "jacobi sampler" in timing and slider["maximum"] == 3
        pipe = StarFlowPipeline.from_pretrained(starflow_dir)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe("a red car", num_images_per_prompt=2, guidance_scale=2.0, sampler="sequential",
                        generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images  # fmt: skip
        shown = read(gallery[1]["image"])[::6, ::6].astype(int)
        assert np.abs(shown - np.asarray(expected[1], dtype=int)).max() <= 2
        with pytest.raises(AppError, match="type a prompt"):
            client.predict(prompt="  ", num_images=1, api_name="/generate")
        check_caption_ranking(client, pipe, tmp_path)
    finally:
        demo.close()


def check_caption_ranking(client: Client, pipe: StarFlowPipeline, tmp_path: Path) -> None:
    """Ranking typed captions for an upload with transparency (flattened onto white first); a huge upload is
    refused as in TarFlow mode."""
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 10:30] = (200, 30, 30, 255)
    path = tmp_path / "upload.png"
    PIL.Image.fromarray(rgba, mode="RGBA").save(path)
    captions = "a photo of a cat\n\na red car\na photo of a cat\na fox in the snow"
    assert "ranking 3 captions" in client.predict(captions, api_name="/estimate_ranking")
    fitted, ranking, details = client.predict(handle_file(str(path)), captions, api_name="/rank")
    model_input = PIL.Image.open(fitted).convert("RGB").resize((32, 32), PIL.Image.Resampling.NEAREST)
    assert np.asarray(model_input)[0, 0].tolist() == [255, 255, 255]  # the transparent corner, on white
    flat = PIL.Image.alpha_composite(PIL.Image.new("RGBA", (40, 40), "white"), PIL.Image.fromarray(rgba))
    reference = PIL.ImageOps.fit(flat.convert("RGB"), (32, 32), method=PIL.Image.Resampling.LANCZOS)
    candidates = ["a photo of a cat", "a red car", "a fox in the snow"]
    probabilities = pipe.classify([reference], candidates)[0]
    confidences = {item["label"]: item["confidence"] for item in ranking["confidences"]}
    assert list(confidences) == sorted(confidences, key=confidences.get, reverse=True)
    for caption, probability in zip(candidates, probabilities.tolist(), strict=True):
        assert confidences[caption] == pytest.approx(probability, abs=1e-4)
    assert ranking["label"] in details
    with pytest.raises(AppError, match="at least two different captions"):
        client.predict(handle_file(str(path)), "a red car\na red car", api_name="/rank")
    huge = tmp_path / "huge.png"
    PIL.Image.new("RGB", (5000, 5000), "white").save(huge)
    with pytest.raises(AppError, match=re.escape("at most 4096x4096 pixels, got 5000x5000")):
        client.predict(handle_file(str(huge)), captions, api_name="/rank")


# ---------------------------------------------------------------------------------------------- Hub hardware
class GpuRuns(list):
    """Names of the functions run under the stand-in `spaces.GPU`; `holding.gpu`: whether this thread is in one."""

    holding = threading.local()


@pytest.fixture
def stand_in_spaces(monkeypatch) -> GpuRuns:
    """A `spaces` module as ZeroGPU's: `spaces.GPU(duration=...)` runs the function with its arguments and result
    pickled (ZeroGPU hands them to a forked worker) and marks the thread as holding the GPU."""
    runs = GpuRuns()
    holding = runs.holding

    def GPU(task=None, *, duration=None):  # the real one's name
        assert duration == gpu.DEFAULT_GPU_SECONDS

        def decorate(fn):
            @functools.wraps(fn)
            def run(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                runs.append(getattr(fn, "func", fn).__name__)
                holding.gpu = True
                try:
                    return pickle.loads(pickle.dumps(fn(*args, **kwargs)))
                finally:
                    holding.gpu = False

            return run

        return decorate if task is None else decorate(task)

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    return runs


def test_model_work_runs_under_spaces_gpu_when_spaces_is_importable(model_dir, stand_in_spaces, monkeypatch, tmp_path):
    pipeline_calls = []
    real = TarFlowPipeline.__call__
    monkeypatch.setattr(TarFlowPipeline, "__call__", lambda self, *a, **kw: pipeline_calls.append(
        getattr(stand_in_spaces.holding, "gpu", False)) or real(self, *a, **kw))  # fmt: skip
    demo = space_demo.build_demo(str(model_dir))
    assert set(stand_in_spaces) == {"one_image"}  # the startup calibration, on the GPU
    client = Client(serve(demo), verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    try:
        gallery, *_ = client.predict(**generate_args(count=2), api_name="/generate")
        assert len(gallery) == 2
        client.predict(handle_file(str(to_png(np.zeros((SIZE, SIZE)), tmp_path / "a.png"))), "no", False,
                       api_name="/analyze")  # fmt: skip
        client.predict(**interpolate_args(frames=3), api_name="/interpolate")
    finally:
        demo.close()
    assert {"sample_task", "analyze_task", "interpolate_task"} <= set(stand_in_spaces)
    assert pipeline_calls and all(pipeline_calls)  # every pipeline call held the GPU


def test_model_work_runs_plainly_without_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError

    def work():
        return 1

    assert gpu.gpu_decorator()(work) is work


def documented_gpu_configuration() -> dict[str, str]:
    """The environment variables of the README's 3.8B STARFlow configuration (its ```env block)."""
    readme = (SPACE / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```env\n(.*?)```", readme, re.S).group(1)
    return dict(line.split("=", 1) for line in block.splitlines() if line.strip() and not line.startswith("#"))


def test_the_documented_gpu_configuration_offloads_bf16_weights(starflow_dir, monkeypatch, tmp_path):
    """The README's configuration for a converted 3.8B STARFlow, applied to a tiny one (on the CPU here): the
    pipeline is loaded in bfloat16 and offloaded (accelerate's hooks on every component), and serves."""
    settings = documented_gpu_configuration()
    assert settings["TARFLOW_DTYPE"] == "bfloat16" and settings["TARFLOW_OFFLOAD"] == "1"
    assert registry.is_hub_repo_id(settings["TARFLOW_MODEL"])
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TARFLOW_MODEL", str(starflow_dir))
    monkeypatch.setenv("TARFLOW_DEVICE", "cpu")  # the GPU Space's device is cuda, found by itself
    demo = space_demo.build_demo()
    pipe = demo.space.served()
    for component in (pipe.transformer, pipe.text_encoder, pipe.vae):
        assert component.dtype == torch.bfloat16
        assert type(component._hf_hook).__name__ == "CpuOffload"
    client = Client(serve(demo), verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    try:
        gallery, timing, *_ = client.predict(prompt="a red car", num_images=1, api_name="/generate")
        assert len(gallery) == 1 and settings["TARFLOW_SAMPLER"] in timing
    finally:
        demo.close()


def front_matter() -> dict:
    from huggingface_hub import SpaceCard

    return SpaceCard.load(SPACE / "README.md").data.to_dict()


# The keys the Hub accepts in a Space's README (https://huggingface.co/docs/hub/spaces-config-reference), and
# `license` (a repository card's).
HUB_SPACE_KEYS = {
    "title", "emoji", "colorFrom", "colorTo", "sdk", "python_version", "sdk_version", "suggested_hardware",
    "suggested_storage", "app_file", "app_port", "base_path", "fullWidth", "header", "short_description", "models",
    "datasets", "tags", "thumbnail", "pinned", "hf_oauth", "hf_oauth_scopes", "hf_oauth_expiration_minutes",
    "hf_oauth_authorized_org", "disable_embedding", "startup_duration_timeout", "custom_headers", "preload_from_hub",
    "license",
}  # fmt: skip
HUB_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


def test_the_front_matter_is_what_the_hub_accepts():
    data = front_matter()
    assert set(data) <= HUB_SPACE_KEYS, set(data) - HUB_SPACE_KEYS
    assert data["sdk"] == "gradio" and data["sdk_version"] == gr.__version__  # the version these tests ran
    assert (SPACE / data["app_file"]).is_file() and data["app_file"] == "app.py"
    assert {data["colorFrom"], data["colorTo"]} <= HUB_COLORS
    assert len(data["short_description"]) <= 60 and data["license"] == "apache-2.0"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={data['python_version']}"
    assert all(registry.is_hub_repo_id(model) for model in data["models"])
    # The models the documented GPU configuration runs: Apple's weights, converted with these components.
    assert {registry.STARFLOW_TEXT_ENCODER, registry.STARFLOW_VAE, "apple/starflow"} == set(data["models"])


def test_requirements_install_the_packages_dependencies():
    from packaging.requirements import Requirement

    lines = [line for line in (SPACE / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {str(Requirement(line)) for line in lines} == {str(Requirement(line)) for line in wanted}
