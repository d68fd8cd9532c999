"""tarflow_hf.pipeline_utils: the checks, noise and sampling plumbing both pipelines share (their behaviour through
the pipelines is tested in test_pipeline.py and test_pipeline_starflow.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.callbacks import PipelineCallback

from tarflow_hf.pipeline_utils import (
    callback_inputs,
    check_batch_size,
    check_count,
    check_latents,
    check_output_type,
    normal_noise,
    uniform_noise,
)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_checks_raise_one_line_naming_the_argument():
    check_count("n", 1)
    check_batch_size(3)
    check_output_type("pt", ("pil", "pt"))
    for call, message in [
        (lambda: check_count("num_images", 0), r"num_images must be >= 1, got 0"),
        (lambda: check_count("num_images", True), r"num_images must be a positive integer, got True"),
        (lambda: check_batch_size(0, "denoise_batch_size"), r"denoise_batch_size must be an integer >= 1, got 0"),
        (lambda: check_output_type("jpeg", ("pil", "pt"), " (hint)"), r"one of \('pil', 'pt'\), got 'jpeg' \(hint\)"),
        (lambda: callback_inputs(None, ["latents"], ["images"]), r"has \['latents'\]; allowed are \['images'\]"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_callback_inputs_come_from_a_pipeline_callback():
    class Callback(PipelineCallback):
        tensor_inputs = ["images"]  # noqa: RUF012

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return callback_kwargs

    assert callback_inputs(Callback(), ["other"], ["images"]) == ["images"]
    assert callback_inputs(None, ("images",), ["images"]) == ("images",)


def test_latents_are_checked():
    latents = torch.zeros(2, 16, 4)
    assert check_latents(latents, (None, 16, 4), "(batch, 16, 4)") is latents
    for bad, message in [
        (torch.zeros(2, 4, 16), r"latents must have shape \(batch, 16, 4\), got \(2, 4, 16\)"),
        (torch.zeros(16, 4), r"got \(16, 4\)"),
        ([0.0], r"got list"),
        (torch.zeros(2, 16, 4, dtype=torch.long), r"latents must be floating point"),
        (torch.zeros(0, 16, 4), r"latents is an empty batch"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_latents(bad, (None, 16, 4), "(batch, 16, 4)")


def test_noise_is_drawn_per_generator():
    normal = normal_noise((2, 3, 4), generators(5, 6), torch.device("cpu"))
    expected = torch.cat([torch.randn(1, 3, 4, generator=g) for g in generators(5, 6)])
    assert normal.dtype == torch.float32
    torch.testing.assert_close(normal, expected, rtol=0, atol=0)
    uniform = uniform_noise(torch.Size((2, 3)), generators(1, 2))
    torch.testing.assert_close(uniform, torch.cat([torch.rand(1, 3, generator=g) for g in generators(1, 2)]))
    torch.testing.assert_close(uniform_noise(torch.Size((1, 3)), generators(2)), uniform[1:])
    for draw in (lambda: normal_noise((3, 4), generators(0, 1), "cpu"), lambda: uniform_noise((3, 4), generators(0))):
        with pytest.raises(ValueError, match=r"got a list of \d generators for 3 images; pass one generator per image"):
            draw()
