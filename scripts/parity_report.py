"""Print the largest float32 deviation from Apple's own outputs for every tensor the README's parity section quotes,
for both families, through the public API (conversion, model, sampler). The tests assert the same agreement
(1e-5 for TarFlow, 1e-4 for STARFlow); this prints the measured numbers.

    python scripts/parity_report.py

Fixtures: tests/fixtures/ (apple/ml-tarflow) and tests/fixtures/starflow/ (apple/ml-starflow); see their READMEs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tarflow_hf.convert import config_from_apple_arguments, load_ml_tarflow_checkpoint
from tarflow_hf.convert_starflow import load_ml_starflow_checkpoint
from tarflow_hf.guidance import tarflow_guidance_from_apple
from tarflow_hf.samplers import BlockJacobiSampler

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def largest(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours.double() - theirs.double()).abs().max().item()


def tarflow_case(name: str) -> dict[str, float]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    apple = meta["config"]
    config = config_from_apple_arguments(apple)
    model = load_ml_tarflow_checkpoint(str(FIXTURES / f"{name}.pth"), config)
    expected = torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)
    out = model(expected["x"], expected.get("y"), output_hidden_states=True)
    dims = config.num_patches * config.patch_dim
    errors = {
        "z": largest(out.latents, expected["z"]),
        "logdet (per dim)": largest(out.logdet / dims, expected["logdets"]),
        "loss": largest(out.loss.reshape(1), expected["loss"]),
        "block outputs": max(
            largest(hidden, expected[f"block_output_{i}"]) for i, hidden in enumerate(out.hidden_states)
        ),
    }
    for sampler in ("sequential", "jacobi:tolerance=1e-7", "newton:tolerance=1e-7"):
        worst = 0.0
        for i, kwargs in enumerate(meta["sample_kwargs"]):
            images = model.inverse(
                expected["noise"], expected.get("y_sample"), sampler=sampler, **tarflow_guidance_from_apple(kwargs)
            )
            worst = max(worst, largest(images, expected[f"sample_{i}"]))
        errors[f"samples ({sampler.split(':')[0]})"] = worst
    denoised = model.denoise(expected["sample_0"], expected.get("y_sample"), noise_std=meta["denoise"]["noise_std"])
    errors["denoised"] = largest(denoised, expected["denoised_0"])
    return errors


def starflow_case(name: str) -> dict[str, float]:
    folder = FIXTURES / "starflow"
    meta = json.loads((folder / f"{name}.json").read_text())
    model = load_ml_starflow_checkpoint(folder / f"{name}.pth", folder / f"{name}.yaml")
    expected = torch.load(folder / f"{name}_expected.pt", weights_only=True)
    out = model(expected["x"], expected["y_cond"], output_hidden_states=True)
    coefficient = meta["forward"]["latent_norm_regularization"]
    train_loss = expected["loss"] + coefficient * expected["latent_norm_reg"]
    n = model.config.num_blocks
    errors = {
        "z": largest(out.latents, expected["z"]),
        "block outputs": max(largest(out.hidden_states[i + 1], expected[f"block_output_{i}"]) for i in range(n)),
        "logdet (sum)": largest(out.logdet, sum(expected[f"logdet_{i}"].sum(dim=(1, 2)) for i in range(n))),
        "train loss": largest(out.loss.reshape(1), train_loss),
    }
    sequential, jacobi = 0.0, 0.0
    for sample in meta["samples"]:
        if "key" not in sample:
            continue
        kwargs = sample["kwargs"]
        guided = kwargs["guidance"] > 0
        negative = sample["y"].split(", ")[1].rstrip("], 0)") if guided else None
        options = dict(guidance_scale=1.0 + kwargs["guidance"], attention_temperature=kwargs.get("attn_temp", 1.0))
        if kwargs["jacobi"]:
            options["sampler"] = BlockJacobiSampler(
                kwargs["jacobi_block_size"], kwargs["jacobi_th"], kwargs["jacobi_max_iter"]
            )
        latents = model.inverse(
            expected["noise"], expected["y_cond"], expected[negative] if guided else None, **options
        )
        error = largest(latents, expected[sample["key"]])
        if kwargs["jacobi"]:
            jacobi = max(jacobi, error)
        else:
            sequential = max(sequential, error)
    errors["samples (sequential)"] = sequential
    errors["samples (block Jacobi)"] = jacobi
    errors["denoised"] = largest(model.denoise(expected["sample_1"], expected["y_cond"]), expected["denoised"])
    return errors


def main() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    for family, cases, run in (
        ("TarFlow (ml-tarflow)", ("tiny_cond", "tiny_uncond"), tarflow_case),
        ("STARFlow (ml-starflow)", ("sf_t2i", "sf_variant"), starflow_case),
    ):
        for case in cases:
            with torch.enable_grad():  # denoising takes a gradient
                errors = run(case)
            print(f"{family} {case}: " + ", ".join(f"{key} {value:.1e}" for key, value in errors.items()))


if __name__ == "__main__":
    main()
