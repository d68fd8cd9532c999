"""Why the parallel samplers need the passes they need, on the bundled MNIST model's first block in sampling order
(the hard one). Prints the figures quoted in the README's Speed section and notes:

    python benchmarks/jacobi_anatomy.py

1. Jacobi passes of that block per guidance scale, and the patches each pass settles (batch 20).
2. Jacobi passes per image when images are sampled one at a time (20 seeds).
3. The block's compute with and without the stagnation probe (same passes).
4. For single images: where the Jacobian of the Jacobi map x -> F(x) puts its weight (by distance back in the
   sequence, at the exact solution), and how many exact Newton steps (full Jacobian, one triangular solve each)
   reach 1e-4.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tarflow_hf import BUNDLED_MODEL, TarFlowModel, sampling
from tarflow_hf.sampling import Guidance, affine_inverse, sample_sequential


def first_block_stats(model: TarFlowModel, noise: torch.Tensor, labels: torch.Tensor, guidance: float):
    _, stats = model.inverse(noise, labels, guidance_scale=guidance, sampler="jacobi", return_stats=True)
    return stats.iterations[0], stats.rows_computed[0]


def jacobi_map(block, z: torch.Tensor, condition):
    """F(x)_t = z_t * exp(a_t(x)) + b_t(x) over the whole sequence; the block's inverse is its fixed point."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        log_scale, shift = block.affine_span(x[:, :-1], 0, None, condition, condition.guidance.weight)
        return torch.cat([z[:, :1], affine_inverse(z[:, 1:], log_scale, shift)], dim=1)

    return apply


def single_image_anatomy(model: TarFlowModel, seed: int, guidance_scale: float) -> None:
    config = model.config
    num_patches, dim = config.num_patches, config.patch_dim
    block = model.blocks[-1]
    noise = torch.randn(1, num_patches, dim, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([seed % config.num_classes])
    z = block.permute(noise)
    condition = block.sampling_condition(labels, 1, Guidance(guidance_scale))
    apply = jacobi_map(block, z, condition)
    exact, _ = sample_sequential(block, z, condition)

    # Where the Jacobian of F sits, at the exact solution: share of its squared norm by distance back.
    jacobian = torch.autograd.functional.jacobian(
        lambda v: apply(v.view(1, num_patches, dim)).flatten(), exact.flatten(), vectorize=True
    )
    blocks = jacobian.view(num_patches, dim, num_patches, dim).pow(2).sum(dim=(1, 3))
    by_distance = torch.zeros(num_patches)
    for t in range(num_patches):
        for s in range(t):
            by_distance[t - s] += blocks[t, s]
    share = (by_distance / by_distance.sum())[1:8]

    # Exact Newton steps x <- x + (I - J)^-1 (F(x) - x) from the latents.
    x, steps = z.clone(), 0
    identity = torch.eye(num_patches * dim)
    while (x - exact).abs().max() > 1e-4 and steps < num_patches:
        residual = (apply(x) - x).flatten()
        jacobian = torch.autograd.functional.jacobian(
            lambda v: apply(v.view(1, num_patches, dim)).flatten(), x.flatten(), vectorize=True
        )
        step = torch.linalg.solve_triangular(identity - jacobian, residual.unsqueeze(1), upper=False)
        x, steps = x + step.view_as(x), steps + 1
    print(
        f"  seed {seed}: share of the Jacobian by distance back 1..7: "
        + " ".join(f"{v:.3f}" for v in share.tolist())
        + f"; exact Newton steps to 1e-4: {steps}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = TarFlowModel.from_pretrained(BUNDLED_MODEL, subfolder="transformer").eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = model.config
    torch.manual_seed(0)
    noise = torch.randn(20, config.num_patches, config.patch_dim)
    labels = torch.arange(20) % config.num_classes
    steps = config.num_patches - 1

    print(f"first block in sampling order, {steps} patches to settle (sequential: {steps} passes)")
    with torch.no_grad():
        for guidance in (1.0, 1.5, 2.0, 3.0):
            passes, _ = first_block_stats(model, noise, labels, guidance)
            print(f"  batch of 20, guidance {guidance}: {passes} Jacobi passes")

        def all_passes(images: slice) -> int:
            _, stats = model.inverse(
                noise[images], labels[images], guidance_scale=3.0, sampler="jacobi", return_stats=True
            )
            return stats.transformer_passes

        per_image = [all_passes(slice(i, i + 1)) for i in range(20)]
        print(
            f"  one image at a time, guidance 3, all blocks: {min(per_image)}-{max(per_image)} passes "
            f"(mean {sum(per_image) / 20:.1f}); the batch of 20 together: {all_passes(slice(0, 20))}"
        )
        passes, rows = first_block_stats(model, noise, labels, 3.0)
        default = sampling.JACOBI_STAGNATION_PASSES
        sampling.JACOBI_STAGNATION_PASSES = 10**6  # never shrink the window
        wide_passes, wide_rows = first_block_stats(model, noise, labels, 3.0)
        sampling.JACOBI_STAGNATION_PASSES = default
        print(
            f"  stagnation probe: {passes} passes, {rows} rows; without it: {wide_passes} passes, {wide_rows} rows "
            f"({1 - rows / wide_rows:.0%} less compute)"
        )
    print("single images, guidance 3:")
    for seed in range(3):
        single_image_anatomy(model, seed, 3.0)


if __name__ == "__main__":
    main(sys.argv[1:])
