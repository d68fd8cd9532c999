"""bits/dim of `tarflow_hf.evaluate` (function and `tarflow-hf evaluate` command) against a closed form.

The model is a flow whose every block has a zero output-projection weight: each block's log-scale and shift are
then constants (its bias), so the whole flow is an elementwise affine map z = A * x + B with a constant log-det.
A and B are read off the model's own forward pass (at x = 0 and x = 1; the test checks that the map is affine),
and the expected bits/dim follow from the change-of-variables formula and the noise's moments:

- Gaussian noise x + s * e (s = config.noise_std): E sum z^2 = sum (A x + B)^2 + s^2 * sum A^2;
- uniform dequantization of level k, x = (k + U[0, 1)) / 128 - 1: E z = A ((k + 1/2) / 128 - 1) + B,
  Var z = A^2 / (128^2 * 12);

bpd = (E sum z^2 / (2 D) + log(2 pi) / 2 - logdet / D + log 128) / log 2, D the dimensions per image.
The noise of the evaluation enters only through those moments, so these tests fail if the noise is left out (or
has the wrong scale), whatever random stream the evaluation draws it from. The Gaussian tolerance is five standard
errors of the mean, computed from the same moments (Var z^2 = 4 m^2 s^2 A^2 + 2 s^4 A^4 per dimension, m = A x + B):
about 0.02 bits here, where leaving the noise out moves the result by 0.21-0.26 (measured over seeds: the
evaluation lands within 0.006 of the expectation). Uniform dequantization noise is tiny, so its tolerance is a
fixed 5e-4 (leaving it out moves the result by 3e-3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_hf import TarFlowConfig, TarFlowModel, TarFlowPipeline
from tarflow_hf.commands import main as cli_main
from tarflow_hf.evaluate import bits_per_dim

NOISE_STD = 0.5
SIZE = 8
UNIFORM_TOLERANCE = 5e-4


def affine_flow(seed: int = 0) -> TarFlowModel:
    """An unconditional model whose blocks are constant elementwise affine maps (random biases, zero weights)."""
    torch.manual_seed(seed)
    config = TarFlowConfig(
        image_size=SIZE, num_channels=1, patch_size=2, hidden_size=32, head_dim=16, num_blocks=3,
        layers_per_block=1, num_classes=0, noise_std=NOISE_STD,
    )  # fmt: skip
    model = TarFlowModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj_out" in name:  # Apple's layout key of the output projection (see the README's key table)
                param.zero_() if name.endswith("weight") else param.uniform_(-0.4, 0.4)
    return model


def affine_coefficients(model: TarFlowModel) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B) as images (1, C, H, W) and the log-det, from the forward pass at x = 0 and x = 1."""
    shape = (1, 1, SIZE, SIZE)
    with torch.no_grad():
        at_zero, at_one, at_half = (model(torch.full(shape, v)) for v in (0.0, 1.0, 0.5))
    unpatchify = model.unpatchify
    b = unpatchify(at_zero.latents).double()
    a = unpatchify(at_one.latents).double() - b
    torch.testing.assert_close(unpatchify(at_half.latents).double(), 0.5 * a + b, atol=1e-6, rtol=0)  # affine
    assert a.min() > 0 and (a - 1).abs().max() > 0.05  # a real rescaling, not the identity
    torch.testing.assert_close(at_zero.logdet.double(), a.log().sum().reshape(1), atol=1e-4, rtol=0)
    return a, b, at_zero.logdet.item()


def expected_bpd(mean_sq_sum: torch.Tensor, logdet: float, dims: int) -> float:
    nll = mean_sq_sum / (2 * dims) + 0.5 * math.log(2 * math.pi) - logdet / dims + math.log(128)
    return (nll / math.log(2)).mean().item()


def gray_dataset(levels: list[int], count: int) -> list[tuple[torch.Tensor, int]]:
    """`count` flat images per listed 8-bit level, in model space x = level / 127.5 - 1."""
    return [(torch.full((1, SIZE, SIZE), level / 127.5 - 1), 0) for level in levels for _ in range(count)]


def gaussian_expectation(model: TarFlowModel, dataset) -> tuple[float, float, float]:
    """(expected bpd with the Gaussian noise, the same without any noise, 5 standard errors of the mean)."""
    a, b, logdet = affine_coefficients(model)
    images = torch.stack([image for image, _ in dataset]).double()
    mean = a * images + b
    clean = mean.pow(2).flatten(1).sum(1)
    noisy = clean + NOISE_STD**2 * a.pow(2).sum()
    dims = images[0].numel()
    variance = (4 * mean.pow(2) * NOISE_STD**2 * a.pow(2) + 2 * NOISE_STD**4 * a.pow(4)).flatten(1).sum(1)
    standard_error = variance.sum().sqrt().item() / len(dataset) / (2 * dims * math.log(2))
    return expected_bpd(noisy, logdet, dims), expected_bpd(clean, logdet, dims), 5 * standard_error


def uniform_expectation(model: TarFlowModel, dataset) -> tuple[float, float]:
    """(expected bpd with uniform dequantization, the same without it)."""
    a, b, logdet = affine_coefficients(model)
    images = torch.stack([image for image, _ in dataset]).double()
    levels = torch.round((images + 1) * 127.5)
    mean = a * ((levels + 0.5) / 128 - 1) + b
    second_moment = (mean.pow(2) + a.pow(2) / (128**2 * 12)).flatten(1).sum(1)
    dims = images[0].numel()
    clean = (a * images + b).pow(2).flatten(1).sum(1)
    return expected_bpd(second_moment, logdet, dims), expected_bpd(clean, logdet, dims)


def test_gaussian_noise_bits_per_dim_matches_the_closed_form():
    model = affine_flow()
    dataset = [(torch.zeros(1, SIZE, SIZE), 0)] * 256
    want, without_noise, tolerance = gaussian_expectation(model, dataset)
    assert abs(want - without_noise) > 4 * tolerance  # the test can tell noise from no noise
    got = bits_per_dim(model, dataset, noise="gaussian", batch_size=64, seed=1)
    assert got == pytest.approx(want, abs=tolerance)


def test_uniform_dequantization_bits_per_dim_matches_the_closed_form():
    model = affine_flow(seed=1)
    dataset = gray_dataset([0, 255], 8)
    want, without_noise = uniform_expectation(model, dataset)
    assert abs(want - without_noise) > 4 * UNIFORM_TOLERANCE
    got = bits_per_dim(model, dataset, noise="uniform", batch_size=16, seed=1)
    assert got == pytest.approx(want, abs=UNIFORM_TOLERANCE)


def write_folder_dataset(root: Path, level: int, count: int) -> Path:
    (root / "only").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((SIZE, SIZE), level, dtype=np.uint8), "L").save(root / "only" / f"{i}.png")
    return root


def test_evaluate_command_reports_both_noises_by_the_closed_form(tmp_path, capsys):
    model = affine_flow(seed=2)
    TarFlowPipeline(transformer=model).save_pretrained(str(tmp_path / "pipe"))
    folder = write_folder_dataset(tmp_path / "data", level=128, count=256)
    dataset = gray_dataset([128], 256)
    gaussian, no_noise, tolerance = gaussian_expectation(model, dataset)
    uniform, _ = uniform_expectation(model, dataset)
    code = cli_main(
        ["evaluate", str(tmp_path / "pipe"), "--dataset", str(folder), "--split", "train", "--metrics", "bpd",
         "--bpd-noise", "uniform,gaussian", "--output", str(tmp_path / "metrics.json")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert abs(gaussian - no_noise) > 4 * tolerance
    assert metrics["bits_per_dim_gaussian_noise"] == pytest.approx(gaussian, abs=tolerance)
    assert metrics["bits_per_dim"] == pytest.approx(uniform, abs=UNIFORM_TOLERANCE)
