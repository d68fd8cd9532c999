"""Why the parallel samplers need the passes they need, on the bundled MNIST model's first block in sampling order
(the hard one). From the repository root:

    python -m benchmarks.jacobi_anatomy [--json FILE]

1. Jacobi passes of that block per guidance scale (batch 20).
2. Jacobi passes per image when images are sampled one at a time (20 seeds).
3. The block's compute with and without the stagnation probe (same passes).
4. For single images: where the Jacobian of the Jacobi map x -> F(x) puts its weight (by distance back in the
   sequence, at the exact solution), and how many exact Newton steps (full Jacobian, one triangular solve each)
   reach 1e-4.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tarflow_hf import BUNDLED_MODEL, TarFlowModel, samplers
from tarflow_hf.guidance import Guidance, GuidanceRule, row_weights
from tarflow_hf.modeling_tarflow import TarFlowBlock, TarFlowCondition
from tarflow_hf.samplers import JacobiSampler, affine_inverse, sample_sequential

from .timing import Results, report

BATCH = 20
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)
NEWTON_TOLERANCE = 1e-4


def first_block_stats(model: TarFlowModel, noise: torch.Tensor, labels: torch.Tensor, guidance: float):
    """(passes, rows computed) of the default Jacobi sampler on the first block in sampling order."""
    _, stats = model.inverse(noise, labels, guidance_scale=guidance, sampler=JacobiSampler(), return_stats=True)
    return stats.iterations[0], stats.rows_computed[0]


@contextlib.contextmanager
def stagnation_probe_off() -> Iterator[None]:
    """The Jacobi window never shrinks to the probe (`samplers.JACOBI_STAGNATION_PASSES` out of reach)."""
    default = samplers.JACOBI_STAGNATION_PASSES
    samplers.JACOBI_STAGNATION_PASSES = 10**6
    try:
        yield
    finally:
        samplers.JACOBI_STAGNATION_PASSES = default


def jacobi_map(block: TarFlowBlock, z: torch.Tensor, condition: TarFlowCondition) -> Callable:
    """F(x)_t = z_t * exp(a_t(x)) + b_t(x) over the whole sequence; the block's inverse is its fixed point."""
    weight = row_weights(condition.guidance, z.shape[1] - 1, z.device)

    def apply(x: torch.Tensor) -> torch.Tensor:
        log_scale, shift = block.affine_span(x[:, :-1], 0, None, condition, weight)
        return torch.cat([z[:, :1], affine_inverse(z[:, 1:], log_scale, shift)], dim=1)

    return apply


def jacobian_of(apply: Callable, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of `apply` at `x` (1, T, D), flattened to (T * D, T * D)."""
    return torch.autograd.functional.jacobian(lambda v: apply(v.view_as(x)).flatten(), x.flatten(), vectorize=True)


def single_image_anatomy(model: TarFlowModel, seed: int, guidance_scale: float) -> dict[str, Any]:
    """Where the Jacobian of the first block's Jacobi map sits, and how many exact Newton steps it takes."""
    config = model.config
    num_patches, dim = config.num_patches, config.patch_dim
    block = model.blocks[-1]
    noise = torch.randn(1, num_patches, dim, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([seed % config.num_classes])
    z = block.permute(noise)
    guidance = Guidance(guidance_scale, GuidanceRule.parse(None, config.default_guidance_rule))
    apply = jacobi_map(block, z, block.sampling_condition(labels, 1, guidance))
    exact, _ = sample_sequential(block, z, block.sampling_condition(labels, 1, guidance))

    # Where the Jacobian of F sits, at the exact solution: share of its squared norm by distance back.
    blocks = jacobian_of(apply, exact).view(num_patches, dim, num_patches, dim).pow(2).sum(dim=(1, 3))
    by_distance = torch.zeros(num_patches)
    for t in range(num_patches):
        for s in range(t):
            by_distance[t - s] += blocks[t, s]
    share = (by_distance / by_distance.sum())[1:8]

    # Exact Newton steps x <- x + (I - J)^-1 (F(x) - x) from the latents.
    x, steps = z.clone(), 0
    identity = torch.eye(num_patches * dim)
    while (x - exact).abs().max() > NEWTON_TOLERANCE and steps < num_patches:
        residual = (apply(x) - x).flatten()
        step = torch.linalg.solve_triangular(identity - jacobian_of(apply, x), residual.unsqueeze(1), upper=False)
        x, steps = x + step.view_as(x), steps + 1
    return {"jacobian_share_by_distance_1_to_7": [round(v, 3) for v in share.tolist()], "exact_newton_steps": steps}


def batch_anatomy(results: Results, model: TarFlowModel) -> None:
    """Parts 1-3 of the docstring, on a batch of 20 images (and those images one at a time)."""
    config = model.config
    torch.manual_seed(0)
    noise = torch.randn(BATCH, config.num_patches, config.patch_dim)
    labels = torch.arange(BATCH) % config.num_classes
    results["first_block_patches_to_settle"] = config.num_patches - 1
    with torch.no_grad():
        for guidance in GUIDANCE_SCALES:
            results[f"first_block_jacobi_passes_guidance_{guidance:g}"] = first_block_stats(
                model, noise, labels, guidance
            )[0]

        def all_passes(images: slice) -> int:
            _, stats = model.inverse(
                noise[images], labels[images], guidance_scale=3.0, sampler=JacobiSampler(), return_stats=True
            )
            return stats.transformer_passes

        per_image = [all_passes(slice(i, i + 1)) for i in range(BATCH)]
        results["all_blocks_passes_one_image_at_a_time_guidance_3"] = per_image
        results["all_blocks_passes_batch_of_20_guidance_3"] = all_passes(slice(0, BATCH))
        passes, rows = first_block_stats(model, noise, labels, 3.0)
        with stagnation_probe_off():
            wide_passes, wide_rows = first_block_stats(model, noise, labels, 3.0)
        results["first_block_passes_rows_with_probe"] = [passes, rows]
        results["first_block_passes_rows_without_probe"] = [wide_passes, wide_rows]
        results["stagnation_probe_compute_saved"] = 1 - rows / wide_rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = TarFlowModel.from_pretrained(BUNDLED_MODEL, subfolder="transformer").eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    results = Results()
    batch_anatomy(results, model)
    for seed in range(3):
        results[f"single_image_seed_{seed}_guidance_3"] = single_image_anatomy(model, seed, 3.0)
    return report(results, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
