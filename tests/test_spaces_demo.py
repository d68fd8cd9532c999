"""The Gradio demo (spaces_demo/app.py), served on loopback and driven through `gradio_client` as a user's browser
or script would: generation, reproducibility, errors, the likelihood tools, per-session models and the queue.

The served model is a tiny class-conditional TarFlow (8x8 grey images, 3 classes) trained here for a few seconds
on synthetic "bar" images (horizontal, vertical, diagonal), so that the likelihood checks compare things with a
known answer: a new bar image against uniform noise, a vertical bar against the other classes.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no traffic off loopback

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import random_model
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tarflow_hf import TarFlowPipeline

REPO = Path(__file__).resolve().parents[1]
APP_PATH = REPO / "spaces_demo" / "app.py"
CLASS_NAMES = {0: "horizontal bar", 1: "vertical bar", 2: "diagonal"}
SIZE = 8
TRAIN_STEPS = 120
CONCURRENCY = 2


def load_app() -> ModuleType:
    """spaces_demo/app.py as a module (it is a script, not part of the package)."""
    name = "tarflow_spaces_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, APP_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def editor_value(path: Path) -> dict:
    """What the browser's sketchpad sends for an uploaded image."""
    return {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path)), "id": None}


def generate_args(class_name="vertical bar", count=2, guidance=1.0, seed=0, sampler="sequential", **overrides):
    args = dict(
        class_choice=class_name,
        count=count,
        scale=guidance,
        seed_value=seed,
        guidance_target="both",
        guidance_schedule="constant",
        attention_temperature=1.0,
        do_denoise=True,
        denoise_strength=1.0,
        sampler_name=sampler,
    )
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """The operator's model root: the folders visitors may load by name when model change is on."""
    return tmp_path_factory.mktemp("models-root")


@pytest.fixture(scope="module")
def model_dir(models_root) -> Path:
    """A tiny conditional TarFlow fit to bar images for TRAIN_STEPS steps (about 3 s), saved as a pipeline."""
    model = random_model(seed=0, id2label=dict(CLASS_NAMES)).train()
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
def pipe(model_dir) -> TarFlowPipeline:
    """The served model loaded independently of the app, to compute expected outputs."""
    pipe = TarFlowPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def app() -> ModuleType:
    return load_app()


@pytest.fixture(scope="module")
def server(app, model_dir, models_root, rgb_unconditional_dir):
    """The app with model change on (visitors may load the folders under `models_root`, by name)."""
    demo = app.build_demo(
        str(model_dir), concurrency_limit=CONCURRENCY, queue_size=64, allow_model_change=True,
        model_root=str(models_root),
    )  # fmt: skip
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("client-downloads")


@pytest.fixture
def client(server, downloads) -> Client:
    """A new browser session (its own model choice and trajectory)."""
    return Client(server, verbose=False, analytics_enabled=False, download_files=str(downloads))


def upscale_factor(app) -> int:
    return app.DISPLAY_SIZE // SIZE


# ------------------------------------------------------------------------------------------------ generate
def test_generate_returns_the_requested_images_with_timing(client, app):
    for count in (1, 3):
        gallery, timing, slider, step_image = client.predict(**generate_args(count=count), api_name="/generate")
        assert len(gallery) == count
        assert [item["caption"] for item in gallery] == [f"seed {i}" for i in range(count)]
        side = SIZE * upscale_factor(app)
        for item in gallery:
            image = PIL.Image.open(item["image"])
            assert image.mode == "L" and image.size == (side, side)
        seconds = re.search(rf"^{count} image\(s\) in \*\*(\d+\.\d+) s\*\*", timing)
        assert seconds and 0 < float(seconds.group(1)) < 60, timing
        assert "30 sequential transformer passes (patch by patch: 30)" in timing  # 2 blocks x 15 steps
        # Trajectory: prior noise, after each of the 2 blocks, denoised; the slider ends on the last frame.
        assert slider["maximum"] == 3 and slider["value"] == 3
        assert Path(step_image).is_file()


def test_random_seed_button_gives_seeds_in_range(client, app):
    seeds = {client.predict(api_name="/random_seed") for _ in range(3)}
    assert all(isinstance(seed, int) and 0 <= seed <= app.MAX_SEED for seed in seeds)
    assert len(seeds) > 1


def test_generated_images_are_the_pipelines_and_reproducible(client, app, pipe):
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
    factor = upscale_factor(app)
    for shown, image in zip(first_images, expected, strict=True):
        assert np.array_equal(shown[::factor, ::factor], np.asarray(image))


def test_trajectory_slider_shows_each_step(client):
    *_, slider, final_frame = client.predict(**generate_args(count=2, seed=1), api_name="/generate")
    frames = [read(client.predict(step, api_name="/show_step")[1]) for step in range(slider["maximum"] + 1)]
    assert np.array_equal(frames[-1], read(final_frame))
    # Every step changes the picture: noise -> block 1 -> block 2 -> denoised.
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(frames))


def test_progress_bar_advances_per_flow_block(client, app, monkeypatch):
    """gr.Progress is fed from the pipeline's per-block callback. The server runs in this process, so each block
    waits here until the client has seen its update (or 10 s): no update can be missed by polling too late on a
    busy machine, and a server that never sends one still fails the assertions."""
    real = app.generate_images
    seen = set()
    seen_changed = threading.Condition()

    def slow_generate(*args, on_block=None, **kwargs):
        def until_seen(done, total, text):
            on_block(done, total, text)
            with seen_changed:
                seen_changed.wait_for(lambda: any(index == done for index, *_ in seen), timeout=10)

        return real(*args, on_block=until_seen, **kwargs)

    monkeypatch.setattr(app, "generate_images", slow_generate)
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
        ({"count": 17}, "greater than maximum value 16"),
        ({"guidance": 50.0}, "greater than maximum value 12"),
        ({"seed": -1}, "less than minimum value 0"),
        ({"sampler": "euler"}, "'euler'"),
        ({"class_name": " "}, "pick a class"),
    ],
)
def test_bad_generate_inputs_give_readable_errors(client, overrides, message):
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(**generate_args(**overrides), api_name="/generate")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"denoise_strength": float("nan")}, "denoising strength must be between 0 and 2, got nan"),
        ({"guidance_scale": float("inf")}, "guidance scale must be between 0 and 12, got inf"),
        ({"num_images": 2.5}, "number of images must be a whole number"),
        ({"num_images": True}, "number of images must be a number"),
        ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
        ({"sampler": "euler"}, "sampler must be one of sequential, jacobi, newton"),
    ],
)
def test_generate_images_checks_bounds_itself(app, pipe, overrides, message):
    """The server-side checks behind the UI's own (which a direct call, or NaN, would get past)."""
    args = dict(class_id=1, num_images=1, guidance_scale=1.0, seed=0, sampler="sequential") | overrides
    with pytest.raises(ValueError, match=re.escape(message)):
        app.generate_images(pipe, **args)


@pytest.mark.parametrize("sampler", ["jacobi", "newton"])
def test_parallel_samplers_report_their_passes(app, pipe, sampler):
    args = dict(class_id=1, num_images=2, guidance_scale=2.0, seed=3, denoise=False)
    exact = app.generate_images(pipe, **args, sampler="sequential")
    parallel = app.generate_images(pipe, **args, sampler=sampler)
    assert exact.transformer_passes == 30
    assert 2 <= parallel.transformer_passes < 30
    for a, b in zip(exact.images, parallel.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # same up to rounding


def test_bad_uploads_give_readable_errors(client, tmp_path):
    not_an_image = tmp_path / "digit.png"
    not_an_image.write_text("this is not a PNG")
    wide = tmp_path / "wide.png"
    PIL.Image.new("L", (5000, 4)).save(wide)
    cases = [
        (editor_value(not_an_image), "could not read the upload as an image"),
        (editor_value(wide), "at most 4096x4096 pixels, got (5000, 4)"),
        ({"background": None, "layers": [], "composite": None, "id": None}, "no image: upload or draw one first"),
    ]
    for value, message in cases:
        with pytest.raises(AppError, match=re.escape(message)):
            client.predict(value, "no", False, api_name="/analyze")
    with pytest.raises(AppError, match="upload two images"):
        client.predict("two images", 0, 1, None, None, "vertical bar", 5, "spherical", 1.0, "no", False,
                       api_name="/interpolate")  # fmt: skip


def test_server_refuses_uploads_over_the_size_limit(server, app):
    """Checked by the server itself (gradio_client would refuse before sending): raw HTTP over loopback."""
    limit = app.MAX_UPLOAD_MB * 1024 * 1024
    for size, status in ((limit + 1024, 413), (1024, 200)):
        response = httpx.post(f"{server}gradio_api/upload", files={"files": ("x.png", b"\0" * size, "image/png")})
        assert response.status_code == status, response.text
    response = httpx.post(f"{server}gradio_api/upload", files={"files": ("x.png", b"\0" * (limit + 1), "image/png")})
    assert f"maximum allowed size of {limit} bytes" in response.text


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
            editor_value(path), "no", False, api_name="/analyze"
        )
        shown = read(fitted)
        factor = shown.shape[0] // SIZE
        assert np.array_equal(shown[::factor, ::factor], read(path))  # no preprocessing at the model's size
        assert abs(read(reconstruction)[::factor, ::factor].astype(int) - read(path)).max() <= 1
        assert read(latent).shape == shown.shape
        expected = pipe.bits_per_dim([PIL.Image.open(path)], generator=torch.Generator().manual_seed(0)).item()
        assert bits == pytest.approx(expected, abs=1e-3)
        assert float(re.search(r"(\d+\.\d+) bits/dim", details).group(1)) == pytest.approx(expected, abs=1e-3)
        results[name] = (bits, label)
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
    fitted, _, label, *_ = client.predict(editor_value(drawing), "auto", True, api_name="/analyze")
    shown = read(fitted)
    small = shown[:: shown.shape[0] // SIZE, :: shown.shape[0] // SIZE]
    assert small[0].max() == 0 and small[:, 0].max() == 0  # dark background
    columns = np.nonzero(small.max(axis=0) > 128)[0]
    assert len(columns) == 1 and 3 <= columns[0] <= 4  # one light column, centred
    assert label["label"] == "vertical bar"


# -------------------------------------------------------------------------------------------- interpolation
def test_interpolation_between_seeds_starts_and_ends_at_their_samples(client, app):
    strip = read_grey(client.predict("two seeds", 3, 4, None, None, "horizontal bar", 5, "spherical", 2.0, "no",
                                     False, api_name="/interpolate"))  # fmt: skip
    tile = 96 // SIZE * SIZE
    assert strip.shape == (tile, 5 * tile)  # tarflow_hf.grids.make_grid: tiles side by side
    samples, *_ = client.predict(**generate_args("horizontal bar", count=2, seed=3, guidance=2.0), api_name="/generate")
    factor = upscale_factor(app)
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
        strip = read_grey(client.predict("two images", 0, 1, handle_file(str(paths[0])), handle_file(str(paths[1])),
                                    "(no class: unconditional branch)", 4, method, 1.0, "no", False,
                                    api_name="/interpolate"))  # fmt: skip
        tile = strip.shape[0]
        step = tile // SIZE
        ends = (strip[::step, :tile:step], strip[::step, -tile::step])
        for end, path in zip(ends, paths, strict=True):
            assert np.abs(end.astype(int) - read(path)).max() <= 1


# ------------------------------------------------------------------------------------------ models, sessions
def test_each_session_loads_its_own_model(client, server, downloads, rgb_unconditional_dir, models_root):
    """Model change is on here: a visitor loads a folder of the operator's model root by its name, and sees that
    name only (never the server's absolute path)."""
    shown, info, *_ = client.predict("rgb-uncond", api_name="/load_model")
    assert shown == "rgb-uncond"
    assert "unconditional" in info and "8x8x3" in info and str(models_root) not in info
    gallery, _timing, *_ = client.predict(**generate_args(class_name=None, count=2), api_name="/generate")
    assert [PIL.Image.open(item["image"]).mode for item in gallery] == ["RGB", "RGB"]
    assert PIL.Image.open(gallery[0]["image"]).info["tarflow:model"] == "rgb-uncond"
    # Another session still has the default (grey, conditional) model.
    other = Client(server, verbose=False, analytics_enabled=False, download_files=str(downloads))
    gallery, *_ = other.predict(**generate_args(count=1), api_name="/generate")
    assert PIL.Image.open(gallery[0]["image"]).mode == "L"


def test_visitors_load_only_hub_ids_and_folders_under_the_root(client, app, models_root, tmp_path, monkeypatch):
    """Anything else gets one message, the same whether the path exists or not, with no server path in it."""
    outside = tmp_path / "outside"
    TarFlowPipeline(transformer=random_model(seed=5)).save_pretrained(outside)  # a real pipeline, not offered
    (models_root / "escape").symlink_to(outside, target_is_directory=True)  # a link out of the root
    (models_root / "broken").mkdir()
    (models_root / "broken" / "model_index.json").write_text('{"_class_name": "SomethingElse"}')
    hub_calls = []
    monkeypatch.setattr(app, "fetch_from_hub", lambda repo: hub_calls.append(repo) or str(outside))
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
    # A Hub id goes to the Hub (stubbed here), never to a folder of that name on the server.
    shown, info, *_ = client.predict("someone/tarflow-model", api_name="/load_model")
    assert hub_calls == ["someone/tarflow-model"] and shown == "someone/tarflow-model"
    assert str(tmp_path) not in info
    assert not hub_calls[1:]


def test_model_change_is_off_by_default_even_for_raw_requests(app, model_dir, rgb_unconditional_dir, monkeypatch):
    """With the defaults there is no model field, and no handler on the server loads a model: every registered
    function, called by a raw queue request (fn_index over HTTP on loopback) with another model's folder for each
    input, loads nothing."""
    for name in ("TARFLOW_ALLOW_MODEL_CHANGE", "TARFLOW_MODEL_ROOT"):
        monkeypatch.delenv(name, raising=False)
    loads = []
    real = TarFlowPipeline.from_pretrained.__func__

    def spy(cls, location, *args, **kwargs):
        loads.append(str(location))
        return real(cls, location, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "from_pretrained", classmethod(spy))
    demo = app.build_demo(str(model_dir))
    assert not [block for block in demo.blocks.values() if type(block).__name__ == "Textbox"]
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        base = f"http://127.0.0.1:{port}/gradio_api"
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


def test_model_comes_from_the_environment(app, rgb_unconditional_dir, monkeypatch):
    monkeypatch.setenv("TARFLOW_MODEL", str(rgb_unconditional_dir))
    monkeypatch.setenv("TARFLOW_ALLOW_MODEL_CHANGE", "1")
    demo = app.build_demo()
    textboxes = [block for block in demo.blocks.values() if type(block).__name__ == "Textbox"]
    assert [box.value for box in textboxes] == ["rgb-uncond"]  # its name: no server path on the page
    dropdowns = [block for block in demo.blocks.values() if type(block).__name__ == "Dropdown"]
    assert dropdowns and not any(dropdown.visible for dropdown in dropdowns)  # no class picker: unconditional


# ------------------------------------------------------------------------------------------------- queue
def test_queue_serves_20_concurrent_requests_within_its_limit(client, app, monkeypatch, tmp_path):
    """20 requests at once, generations and likelihoods mixed: all answered, never more than CONCURRENCY model
    calls at a time across both kinds (each call is held for 0.15 s so that, without the limit, they would
    overlap far more)."""
    for name in ("generate_images", "analyze_image"):
        real = getattr(app, name)

        def held(*args, real=real, **kwargs):
            time.sleep(0.15)
            return real(*args, **kwargs)

        monkeypatch.setattr(app, name, held)
    digit = to_png(bars([0], torch.Generator().manual_seed(1))[0], tmp_path / "bar.png")
    app.ACTIVE_CALLS.reset()
    start = time.perf_counter()
    jobs = [
        client.submit(editor_value(digit), "no", False, api_name="/analyze")
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
    assert app.ACTIVE_CALLS.total == 20
    assert app.ACTIVE_CALLS.peak == CONCURRENCY  # used in parallel, and no further
    assert elapsed >= 20 * 0.15 / CONCURRENCY


# ------------------------------------------------------------------------------------------ image helpers
def test_fit_to_model_handles_sizes_modes_and_transparency(app):
    exact = PIL.Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    assert np.array_equal(np.asarray(app.fit_to_model(exact, 8, 1, invert="no")), np.asarray(exact))
    # A transparent canvas with one opaque black stroke: flattened on white, then inverted for a grey model.
    drawing = PIL.Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    drawing.paste((0, 0, 0, 255), (30, 0, 34, 32))
    fitted = app.fit_to_model(drawing, 8, 1, invert="auto")
    assert fitted.mode == "L" and fitted.size == (8, 8)
    pixels = np.asarray(fitted)
    # Centre-cropped to a square (x 16..48), resized: the stroke (x 30..34) lands on columns 3-4, light on dark.
    assert pixels[:, 3:5].min() > 100
    assert np.delete(pixels, [3, 4], axis=1).max() < 10
    rgb = app.fit_to_model(drawing, 4, 3, invert="auto")  # colour models are never inverted automatically
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="invert must be one of"):
        app.fit_to_model(exact, 8, 1, invert="sometimes")


def test_slerp_keeps_the_ends_and_the_norm(app):
    generator = torch.Generator().manual_seed(0)
    start, end = torch.randn(2, 1, 16, 4, generator=generator)
    path = app.slerp(start, end, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], start[0])
    torch.testing.assert_close(path[-1], end[0])
    norms = path.flatten(1).norm(dim=1)
    straight = torch.lerp(start, end, 0.5).norm()
    assert norms.min() > straight  # the arc stays near the typical norm; the straight line dips
    assert torch.allclose(app.slerp(start, start, torch.tensor([0.3])), start)


# --------------------------------------------------------------------------------------------- budget, uploads
def test_expensive_requests_are_refused_before_any_work(client, app, pipe, monkeypatch):
    """The newton sampler computes ~72x the rows of the sequential one here: 16 newton images are over a budget
    that 16 sequential ones fit, and the refusal says what to lower, at once."""
    monkeypatch.setenv("TARFLOW_MAX_ROWS", "20000")
    app.ACTIVE_CALLS.reset()
    start = time.perf_counter()
    with pytest.raises(AppError) as error:
        client.predict(**generate_args(count=16, guidance=2.0, sampler="newton"), api_name="/generate")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "over this server's limit of 20,000" in message, message
    assert "ask for at most 4 image(s) with the newton sampler" in message  # 4608 rows each
    assert "or choose the sequential sampler" in message
    gallery, *_ = client.predict(**generate_args(count=16, guidance=2.0, sampler="sequential"), api_name="/generate")
    assert len(gallery) == 16
    with pytest.raises(ValueError, match="over this server's limit"):  # the function itself checks too
        app.generate_images(pipe, 1, 16, 2.0, 0, sampler="newton")


def test_transparent_uploads_are_flattened_onto_white(client, tmp_path):
    """An RGBA upload (a black bar on a transparent background whose hidden colour is black) is seen on white, as
    the pipelines' preprocess sees it (tarflow_hf.images.flatten_alpha), in the interpolation's image inputs too."""
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[2:6, 3, 3] = 255  # an opaque black bar; everything else fully transparent black
    path = tmp_path / "transparent.png"
    PIL.Image.fromarray(rgba, mode="RGBA").save(path)
    strip = read_grey(client.predict("two images", 0, 1, handle_file(str(path)), handle_file(str(path)),
                                     "(no class: unconditional branch)", 3, "linear", 1.0, "no", False,
                                     api_name="/interpolate"))  # fmt: skip
    step = strip.shape[0] // SIZE
    first = strip[::step, : strip.shape[0] : step].astype(int)
    expected = np.full((SIZE, SIZE), 255)
    expected[2:6, 3] = 0
    assert np.abs(first - expected).max() <= 1, first


def test_startup_prints_one_line_per_event(model_dir, tmp_path):
    """`python spaces_demo/app.py MODEL`: no progress bars (diffusers printed "Loading pipeline components" twice)
    and no INFO line per HTTP request from httpx."""
    import subprocess

    port = free_port()
    log = tmp_path / "startup.log"
    env = {**os.environ, "TARFLOW_MODEL": str(model_dir), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "TARFLOW_TORCH_THREADS": "1"}  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, str(APP_PATH)], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
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
    assert "loaded model bars (tarflow)" in text, text


# ------------------------------------------------------------------------------------------------- STARFlow
@pytest.fixture(scope="module")
def starflow_dir(tmp_path_factory) -> Path:
    """A tiny random STARFlow pipeline (32x32 images, 4x4x4 latents) with the T5 fixture and a word-level
    tokenizer, saved as the operator's model."""
    from diffusers import AutoencoderKL
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    from tarflow_hf import StarFlowConfig, StarFlowModel, StarFlowPipeline

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
    folder = tmp_path_factory.mktemp("starflow") / "tiny-starflow"
    StarFlowPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae).save_pretrained(
        folder
    )
    return folder


def test_starflow_mode_prompts_estimates_and_ranks_captions(app, starflow_dir, tmp_path, downloads, monkeypatch):
    """The operator serves a STARFlow model: a prompt box with examples replaces the class picker, the expected
    time is shown before running (from the startup calibration), the default sampler is the fastest exact-enough
    one measured, and the likelihood tab ranks typed captions exactly as `pipe.classify` does."""
    from tarflow_hf import StarFlowPipeline

    monkeypatch.setenv("TARFLOW_MODEL", str(starflow_dir))
    monkeypatch.delenv("TARFLOW_ALLOW_MODEL_CHANGE", raising=False)
    demo = app.build_demo()
    kinds = [type(block).__name__ for block in demo.blocks.values()]
    assert "Dropdown" not in kinds and "Dataset" in kinds  # no class picker; example prompts
    assert any(getattr(block, "elem_id", None) == "prompt" for block in demo.blocks.values())
    calibration = app._CALIBRATIONS[str(starflow_dir.resolve())]
    assert set(calibration.seconds) == set(app.STARFLOW_SAMPLERS) and calibration.deviation["sequential"] == 0
    exact = [name for name in calibration.seconds if calibration.deviation[name] <= app.EXACT_ENOUGH_LEVELS]
    assert calibration.default_sampler == min(exact, key=calibration.seconds.__getitem__)
    radio = next(block for block in demo.blocks.values() if getattr(block, "label", None) == "Sampler")
    assert radio.value == calibration.default_sampler
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False,
                        download_files=str(downloads))  # fmt: skip
        one = client.predict(1, "sequential", 2.0, api_name="/estimate")
        four = client.predict(4, "sequential", 2.0, api_name="/estimate")
        seconds = [float(re.search(r"about (\d+\.\d+) s", text).group(1)) for text in (one, four)]
        assert 0 < seconds[0] < seconds[1], (one, four)
        gallery, timing, slider, _ = client.predict("a red car", 2, 2.0, 7, "jacobi", True, 1.0, api_name="/generate")
        assert len(gallery) == 2 and PIL.Image.open(gallery[0]["image"]).size == (192, 192)  # 32 px, x6 for display
        assert "2 image(s) in" in timing and "jacobi sampler" in timing and slider["maximum"] == 3
        pipe = StarFlowPipeline.from_pretrained(starflow_dir)
        pipe.set_progress_bar_config(disable=True)
        expected = pipe("a red car", num_images_per_prompt=2, guidance_scale=2.0, sampler="sequential",
                        generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images  # fmt: skip
        shown = read(gallery[1]["image"])[::6, ::6].astype(int)
        assert np.abs(shown - np.asarray(expected[1], dtype=int)).max() <= 2
        with pytest.raises(AppError, match="type a prompt"):
            client.predict("  ", 1, 2.0, 0, "jacobi", True, 1.0, api_name="/generate")

        # Ranking typed captions for an upload with transparency (flattened onto white first).
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
        probabilities = pipe.classify([reference], ["a photo of a cat", "a red car", "a fox in the snow"])[0]
        confidences = {item["label"]: item["confidence"] for item in ranking["confidences"]}
        assert list(confidences) == sorted(confidences, key=confidences.get, reverse=True)
        for caption, probability in zip(["a photo of a cat", "a red car", "a fox in the snow"], probabilities.tolist(),
                                        strict=True):  # fmt: skip
            assert confidences[caption] == pytest.approx(probability, abs=1e-4)
        assert ranking["label"] in details
        with pytest.raises(AppError, match="at least two different captions"):
            client.predict(handle_file(str(path)), "a red car\na red car", api_name="/rank")
    finally:
        demo.close()
