"""`tarflow-hf sample`: the grid it writes, its seeds, and one-line errors (in process and as a real command)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import random_model

from tarflow_hf.cli import main
from tarflow_hf.modeling_tarflow import TarFlowModel
from tarflow_hf.pipeline_tarflow import TarFlowPipeline
from tarflow_hf.sample import PADDING, make_grid

NAMES = {0: "tench, Tinca tinca", 1: "golden retriever", 2: "tabby, tabby cat"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    conditional = random_model(seed=1)
    conditional.config.id2label = dict(NAMES)
    TarFlowPipeline(transformer=conditional).save_pretrained(root / "cond")
    TarFlowPipeline(transformer=random_model(seed=2, num_classes=0)).save_pretrained(root / "uncond")
    return {"cond": root / "cond", "uncond": root / "uncond"}


def sample(*args: str) -> int:
    args = [str(arg) for arg in args]
    return main(["sample", *args, "--quiet", *([] if "--device" in args else ["--device", "cpu"])])


def expected_images(folder: Path, labels, per_label: int, seed: int, **kwargs) -> list[PIL.Image.Image]:
    pipe = TarFlowPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    count = (len(labels) if labels else 1) * per_label
    generator = [torch.Generator().manual_seed(seed + i) for i in range(count)]
    return pipe(class_labels=labels, num_images_per_label=per_label, generator=generator, **kwargs).images


def test_sample_writes_the_captioned_grid(folders, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert sample(folders["cond"], "--class-label", "1", "--class-label", "tabby cat", "--num-images", "2",
                  "--guidance-scale", "2", "--seed", "5", "--output", out) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == f"wrote {out} (4 images, seed 5)"
    images = expected_images(folders["cond"], [1, 2], 2, 5, guidance_scale=2.0)
    captions = ["golden retriever", "golden retriever", "tabby", "tabby"]
    expected = make_grid(images, columns=2, captions=captions)
    written = PIL.Image.open(out)
    assert written.size == expected.size
    np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.png"]  # no temporary files left
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file, not the temp file's private mode


def test_sample_options_reach_the_pipeline(folders, tmp_path):
    out = tmp_path / "plain.png"
    assert sample(folders["uncond"], "--num-images", "3", "--no-denoise", "--seed", "0", "--columns", "3",
                  "--sampler", "jacobi", "--jacobi-tolerance", "1e-3", "--jacobi-window", "5",
                  "--output", out) == 0  # fmt: skip
    images = expected_images(
        folders["uncond"], None, 3, 0, denoise=False, sampler="jacobi", jacobi_tolerance=1e-3, jacobi_window=5
    )
    expected = make_grid(images, columns=3)  # unconditional: no captions
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
    # Without --no-denoise the images differ; --no-captions on a conditional model gives a caption-free grid.
    assert sample(folders["uncond"], "--num-images", "3", "--seed", "0", "--columns", "3", "--output", out) == 0
    assert not np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
    assert sample(folders["cond"], "--class-label", "0", "--num-images", "1", "--no-captions", "--seed", "1",
                  "--output", out) == 0  # fmt: skip
    assert PIL.Image.open(out).size == (8 + 2 * PADDING, 8 + 2 * PADDING)


def test_jacobi_options_reach_the_sampler(folders, tmp_path, monkeypatch):
    seen = {}
    original = TarFlowModel.inverse

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TarFlowModel, "inverse", spy)
    assert sample(folders["uncond"], "--num-images", "1", "--sampler", "jacobi", "--jacobi-tolerance", "0.02",
                  "--jacobi-window", "3", "--output", tmp_path / "grid.png") == 0  # fmt: skip
    assert (seen["sampler"], seen["jacobi_tolerance"], seen["jacobi_window"]) == ("jacobi", 0.02, 3)


def test_unseeded_run_prints_its_seed(folders, tmp_path, capsys):
    out = tmp_path / "random.png"
    assert sample(folders["uncond"], "--num-images", "1", "--output", out) == 0
    seed = int(capsys.readouterr().out.strip().rsplit(" ", 1)[1].rstrip(")"))
    again = tmp_path / "again.png"
    assert sample(folders["uncond"], "--num-images", "1", "--seed", seed, "--output", again) == 0
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_grid_write_failing_midway_keeps_the_previous_grid(folders, tmp_path, monkeypatch, error):
    out = tmp_path / "grid.png"
    assert sample(folders["uncond"], "--num-images", "1", "--seed", "0", "--output", out) == 0
    before = out.read_bytes()

    def half_then_fail(image, fp, format=None, **params):
        Path(fp).write_bytes(before[: len(before) // 2])
        raise error

    monkeypatch.setattr(PIL.Image.Image, "save", half_then_fail)
    with pytest.raises(type(error)):
        sample(folders["uncond"], "--num-images", "1", "--seed", "1", "--output", out)
    with pytest.raises(type(error)):
        sample(folders["uncond"], "--num-images", "1", "--seed", "1", "--output", tmp_path / "new" / "grid.png")
    assert [path.name for path in tmp_path.iterdir()] == ["grid.png"]  # no temporary, no folder made for it
    assert out.read_bytes() == before


def test_make_grid_geometry():
    images = [PIL.Image.new("L", (8, 8), value) for value in (0, 50, 100, 150, 200)]
    grid = make_grid(images, columns=2)
    assert grid.size == (2 * (8 + PADDING) + PADDING, 3 * (8 + PADDING) + PADDING)
    for index, image in enumerate(images):
        left, top = PADDING + (index % 2) * (8 + PADDING), PADDING + (index // 2) * (8 + PADDING)
        tile = np.asarray(grid.crop((left, top, left + 8, top + 8)))
        np.testing.assert_array_equal(tile, np.asarray(image.convert("RGB")))
    captioned = make_grid(images[:2], columns=2, captions=["a very long class name", "b"])
    assert captioned.width > 2 * (8 + PADDING) + PADDING  # cells widen to fit the caption
    assert captioned.height > 8 + 2 * PADDING
    below = np.asarray(captioned)[PADDING + 8 + PADDING :]
    assert (below < 128).any()  # dark caption pixels under the tiles


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{cond}", "--class-label", "tabby dog"], r"unknown class name 'tabby dog': did you mean .*'tabby cat'"),
        (["{cond}", "--class-label", "7"], r"class label 7 is out of range; allowed are 0..2"),
        (["{uncond}", "--class-label", "0"], r"this model is unconditional \(num_classes=0\); drop --class-label"),
        (["{cond}", "--num-images", "0"], r"--num-images must be >= 1, got 0"),
        (["{cond}", "--columns", "0"], r"--columns must be >= 1, got 0"),
        (["{cond}", "--seed", "-3"], r"--seed must be between 0 and 2\*\*62, got -3"),
        (["{cond}", "--guidance-scale", "nan"], r"--guidance-scale must be a finite number, got nan"),
        (["{cond}", "--noise-std", "-1"], r"noise_std must be a finite number >= 0, got -1.0"),
        (["{cond}", "--attention-temperature", "0"], r"attention_temperature must be > 0, got 0.0"),
        (["{cond}", "--sampler", "jacobi", "--jacobi-window", "0"], r"jacobi_window must be >= 1 \(or None"),
        (["{cond}", "--sampler", "jacobi", "--jacobi-tolerance", "-1"], r"jacobi_tolerance must be > 0, got -1.0"),
        (["{cond}", "--output", "{tmp}/grid.txt"], r"--output '.*grid.txt' has no image extension PIL can write"),
        (["{cond}", "--output", "{tmp}"], r"--output '.*' is a folder; give an image file name"),
        (["{tmp}/missing"], r"MODEL '.*missing' is neither an existing folder nor a Hub repo id"),
        (["{tmp}"], r"MODEL '.*' is not a pipeline folder \(no model_index.json\)"),
        (["{cond}", "--device", "gpu:zero"], r"--device 'gpu:zero' is not a torch device"),
    ],
)
def test_errors_are_one_line(folders, tmp_path, capsys, args, message):
    names = {"cond": folders["cond"], "uncond": folders["uncond"], "tmp": tmp_path}
    args = [arg.format(**names) for arg in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "grid.png")]
    assert sample(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tarflow-hf sample: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_cuda_requested_without_cuda(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["sample", str(folders["cond"]), "--device", "cuda", "--output", str(tmp_path / "g.png")]) == 2
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err


def test_console_script_in_a_fresh_process(folders, tmp_path):
    command = Path(sys.executable).with_name("tarflow-hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "fresh.png"
    result = subprocess.run(
        [command, "sample", folders["cond"], "--class-label", "golden retriever", "--num-images", "2", "--seed", "3",
         "--output", out, "--device", "cpu", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    images = expected_images(folders["cond"], [1], 2, 3)
    expected = make_grid(images, columns=2, captions=["golden retriever"] * 2)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))

    bad = subprocess.run(
        [command, "sample", folders["cond"], "--num-images", "0", "--output", tmp_path / "bad.png"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == "tarflow-hf sample: error: --num-images must be >= 1, got 0"
    assert not (tmp_path / "bad.png").exists()
