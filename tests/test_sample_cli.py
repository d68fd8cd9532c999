"""`tarflow-hf sample`: the grid it writes, its seeds, and one-line errors (in process and as a real command)."""

from __future__ import annotations

import json
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

from tarflow_hf.commands import main
from tarflow_hf.grids import CAPTION_WIDTH, MAX_GRID_PIXELS, PADDING, make_grid
from tarflow_hf.guidance import GuidanceRule
from tarflow_hf.modeling_tarflow import TarFlowModel
from tarflow_hf.pipeline_tarflow import TarFlowPipeline
from tarflow_hf.samplers import JacobiSampler, get_sampler

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
                  "--sampler", "jacobi:tolerance=1e-3,window=5", "--output", out) == 0  # fmt: skip
    images = expected_images(folders["uncond"], None, 3, 0, denoise=False, sampler=JacobiSampler(1e-3, window=5))
    expected = make_grid(images, columns=3)  # unconditional: no captions
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
    # Without --no-denoise the images differ; --no-captions on a conditional model gives a caption-free grid.
    assert sample(folders["uncond"], "--num-images", "3", "--seed", "0", "--columns", "3", "--output", out) == 0
    assert not np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
    assert sample(folders["cond"], "--class-label", "0", "--num-images", "1", "--no-captions", "--seed", "1",
                  "--output", out) == 0  # fmt: skip
    assert PIL.Image.open(out).size == (8, 8)  # no caption: the bare tile (grids.make_grid)


def test_jacobi_options_reach_the_sampler(folders, tmp_path, monkeypatch):
    seen = {}
    original = TarFlowModel.inverse

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TarFlowModel, "inverse", spy)
    assert sample(folders["uncond"], "--num-images", "1", "--sampler", "jacobi:tolerance=0.02,window=3",
                  "--guidance-rule", "extrapolate:schedule=linear", "--output", tmp_path / "grid.png") == 0  # fmt: skip
    assert get_sampler(seen["sampler"]) == JacobiSampler(0.02, window=3)
    assert GuidanceRule.parse(seen["guidance_rule"]) == GuidanceRule(schedule="linear")


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
    for target in (out, tmp_path / "new" / "grid.png"):
        if isinstance(error, OSError):  # the user's environment (a full disk): one line, exit status 2
            assert sample(folders["uncond"], "--num-images", "1", "--seed", "1", "--output", target) == 2
        else:
            with pytest.raises(type(error)):
                sample(folders["uncond"], "--num-images", "1", "--seed", "1", "--output", target)
    assert [path.name for path in tmp_path.iterdir()] == ["grid.png"]  # no temporary, no folder made for it
    assert out.read_bytes() == before


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
        (["{cond}", "--denoise-strength", "nan"], r"--denoise-strength must be a finite number, got nan"),
        (["{cond}", "--attention-temperature", "0"], r"attention_temperature must be a finite number > 0, got 0.0"),
        (["{cond}", "--sampler", "jacobi:window=0"], r"window must be an integer >= 1 or None, got 0"),
        (["{cond}", "--sampler", "jacobi:tolerance=-1"], r"tolerance must be a finite number > 0, got -1"),
        (
            ["{cond}", "--sampler", "euler"],
            r"sampler must be one of \('sequential', 'jacobi', 'newton', 'block_jacobi'\)",
        ),
        (["{cond}", "--guidance-rule", "extrapolate:target=ab"], r"target must be one of \('both', 'scale', 'shift'\)"),
        (["{cond}", "--device", "meta"], r"--device 'meta' cannot hold images to sample; use cpu, cuda"),
        (
            ["{cond}", "--output", "{tmp}/grid.txt"],
            r"--output '.*grid.txt': PIL cannot write images with extension '.txt'",
        ),
        (["{tmp}/missing"], r"'.*missing' is neither an existing folder nor a Hub repo id"),
        (["{tmp}"], r".* is not a TarFlow or STARFlow folder \(no model_index.json"),
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


# ------------------------------------------------------------------------------ issue #13: files and batches
def sample_error(capsys, *args) -> str:
    capsys.readouterr()
    assert sample(*args) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("tarflow-hf sample: error: ") and "\n" not in message
    return message


def test_output_format_pil_cannot_write_is_refused_before_sampling(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TarFlowPipeline, "__call__", lambda *a, **k: pytest.fail("sampled before refusing"))
    message = sample_error(capsys, folders["uncond"], "--num-images", "1", "--output", tmp_path / "grid.psd")
    assert "'.psd'" in message and ".png" in message  # .psd is read-only in PIL
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line(folders, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(TarFlowPipeline, "__call__", lambda *a, **k: pytest.fail("sampled before refusing"))
    message = sample_error(capsys, folders["uncond"], "--num-images", "1", "--output", tmp_path / "a_file" / "g.png")
    assert "cannot be written" in message and "a_file" in message


def test_many_images_are_sampled_in_batches_with_the_same_result(folders, tmp_path, monkeypatch):
    sizes = []
    original = TarFlowPipeline.__call__

    def spy(self, *args, **kwargs):
        sizes.append(len(kwargs["generator"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TarFlowPipeline, "__call__", spy)
    one, batched = tmp_path / "one.png", tmp_path / "batched.png"
    common = ("--class-label", "1", "--class-label", "2", "--num-images", "5", "--seed", "3")
    assert sample(folders["cond"], *common, "--batch-size", "10", "--output", one) == 0
    assert sizes == [10]
    sizes.clear()
    assert sample(folders["cond"], *common, "--batch-size", "3", "--output", batched) == 0
    assert sizes == [3, 3, 3, 1]  # never more than --batch-size images at once
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(one)), np.asarray(PIL.Image.open(batched)))
    sizes.clear()
    assert sample(folders["uncond"], "--num-images", "5", "--seed", "3", "--output", one) == 0
    assert sample(folders["uncond"], "--num-images", "5", "--seed", "3", "--batch-size", "2", "--output", batched) == 0
    assert sizes == [5, 2, 2, 1]  # default --batch-size 16
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(one)), np.asarray(PIL.Image.open(batched)))


def test_nan_weights_are_reported_as_nan(tmp_path, capsys):
    model = random_model(seed=3, num_classes=0)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    TarFlowPipeline(transformer=model).save_pretrained(tmp_path / "nan")
    message = sample_error(capsys, tmp_path / "nan", "--num-images", "1", "--output", tmp_path / "g.png")
    assert "NaN" in message and "overflow" not in message


# ------------------------------------------------------------------------------- issue #12: STARFlow prompts
@pytest.fixture(scope="module")
def starflow_folder(tmp_path_factory) -> Path:
    from test_pipeline_starflow import make_pipe

    folder = tmp_path_factory.mktemp("starflow") / "pipe"
    make_pipe().save_pretrained(folder)
    return folder


def test_starflow_prompts_give_a_grid_captioned_with_the_prompts(starflow_folder, tmp_path, capsys):
    from tarflow_hf.pipeline_starflow import StarFlowPipeline

    out = tmp_path / "t2i.png"
    assert sample(starflow_folder, "--prompt", "w5 w7", "--prompt", "w9", "--negative-prompt", "w3",
                  "--num-images", "1", "--seed", "2", "--guidance-scale", "2", "--output", out) == 0  # fmt: skip
    pipe = StarFlowPipeline.from_pretrained(starflow_folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["w5 w7", "w9"], negative_prompt=["w3", "w3"], guidance_scale=2.0,
                  generator=[torch.Generator().manual_seed(2 + i) for i in range(2)]).images  # fmt: skip
    expected = make_grid(images, columns=1, captions=["w5 w7", "w9"])
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))


def test_wrong_conditioning_for_the_model_is_one_line(folders, starflow_folder, tmp_path, capsys):
    out = tmp_path / "g.png"
    assert "--prompt" in sample_error(capsys, starflow_folder, "--class-label", "1", "--output", out)
    assert "--prompt" in sample_error(capsys, starflow_folder, "--output", out)
    assert "--prompt" in sample_error(capsys, folders["cond"], "--prompt", "a cat", "--output", out)
    assert "--height" in sample_error(capsys, folders["cond"], "--height", "16", "--output", out)
    assert not out.exists()


# ------------------------------------------------------------------------ issue 21: bounded work, any input
def test_a_folder_output_takes_one_file_per_image_with_their_captions(folders, tmp_path, capsys):
    out = tmp_path / "images"
    assert sample(folders["cond"], "--class-label", "1", "--class-label", "tabby", "--num-images", "2", "--seed", "4",
                  "--batch-size", "3", "--output", f"{out}/") == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == f"wrote 4 images to {out} (seed 4)"
    expected = expected_images(folders["cond"], [1, 2], 2, 4)
    names = ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert sorted(path.name for path in out.iterdir()) == sorted([*names, "metadata.jsonl"])
    for name, image in zip(names, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / name)), np.asarray(image))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    captions = ["golden retriever"] * 2 + ["tabby"] * 2
    assert rows == [{"file_name": name, "text": text} for name, text in zip(names, captions, strict=True)]
    # What is already there is never overwritten: a second run into the same folder is refused before sampling.
    assert sample(folders["cond"], "--class-label", "1", "--output", f"{out}/") == 2
    assert "already holds metadata.jsonl, 000000.png" in capsys.readouterr().err


def test_a_grid_too_large_to_open_is_refused_before_sampling(folders, tmp_path, capsys, monkeypatch):
    """Two million 8x8 images make a 11320x11320 grid, more than PIL opens: refused at once, pointing to a folder."""
    monkeypatch.setattr(TarFlowPipeline, "__call__", lambda *a, **k: pytest.fail("sampled before refusing"))
    message = sample_error(capsys, folders["uncond"], "--num-images", "2000000", "--output", tmp_path / "g.png")
    assert f"over the {MAX_GRID_PIXELS:,}" in message and "--output FOLDER/" in message
    assert list(tmp_path.iterdir()) == []


def test_long_prompts_are_cut_to_the_cells_width(starflow_folder, tmp_path):
    out = tmp_path / "long.png"
    prompt = "w5 " * 5000
    assert sample(starflow_folder, "--prompt", prompt, "--num-images", "2", "--seed", "0", "--output", out) == 0
    width, _ = PIL.Image.open(out).size
    assert width <= 2 * (max(32, CAPTION_WIDTH) + PADDING) + PADDING  # two cells, as with any caption


def test_prompt_bytes_that_are_not_utf8_are_one_line(starflow_folder, tmp_path):
    """Python decodes undecodable command-line bytes to lone surrogates; they are refused by name, not passed on."""
    command = Path(sys.executable).with_name("tarflow-hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LC_ALL": "C.UTF-8"}
    result = subprocess.run(
        [command, "sample", str(starflow_folder), "--prompt", b"caf\xe9 w5", "--output", str(tmp_path / "g.png")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "tarflow-hf sample: error: --prompt 1 is not UTF-8 text (byte 0xe9 at character 3); pass the prompt in UTF-8 "
        "(check the terminal's or the file's encoding)"
    )
    assert not (tmp_path / "g.png").exists()


def test_a_size_that_cannot_fit_is_refused_at_once(starflow_folder, tmp_path, capsys):
    message = sample_error(capsys, starflow_folder, "--prompt", "w5", "--height", "80000", "--width", "80000",
                           "--output", tmp_path / "g.png")  # fmt: skip
    assert "80000x80000 pixels is 100,000,000 latent tokens" in message and "largest square image" in message


def test_two_processes_draw_one_process_images(folders, starflow_folder, tmp_path):
    """`accelerate launch` with 2 CPU processes splits the images between them (accelerate's
    `split_between_processes`, gathered with `gather_object` for a grid) and writes one process's files, byte for
    byte: a folder of an odd number of images (so the shares differ) with its metadata, and a grid."""
    from conftest import launch_two_processes

    runs = {
        "tarflow": [folders["cond"], "--class-label", "tabby", "--num-images", "5"],
        "starflow": [starflow_folder, "--prompt", "w5 w7", "--num-images", "3"],
    }
    for name, arguments in runs.items():
        common = [*map(str, arguments), "--seed", "3", "--batch-size", "2", "--quiet"]
        for output in (f"{tmp_path}/{name}-two/", f"{tmp_path}/{name}-two.png"):
            done = launch_two_processes(["-m", "tarflow_hf", "sample", *common, "--output", output])
            assert done.returncode == 0, done.stderr[-3000:]
        assert sample(*common, "--output", f"{tmp_path}/{name}-one/") == 0
        assert sample(*common, "--output", f"{tmp_path}/{name}-one.png") == 0
        one, two = (sorted((tmp_path / f"{name}-{n}").iterdir()) for n in ("one", "two"))
        assert [path.name for path in two] == [path.name for path in one] and len(one) in (4, 6)
        for a, b in zip(one, two, strict=True):
            assert a.read_bytes() == b.read_bytes(), b
        assert (tmp_path / f"{name}-one.png").read_bytes() == (tmp_path / f"{name}-two.png").read_bytes()
