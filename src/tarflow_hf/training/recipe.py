"""Apple's recipe parts (`apple/ml-tarflow/train.py`, `apple/ml-starflow/train.py`): the learning-rate schedule, the
input noise, label and caption dropout for classifier-free guidance, and the prior variance of volume-preserving
models."""

from __future__ import annotations

import math

import torch

from ..modeling_tarflow import TarFlowModel

# Apple's `Model.VAR_LR`: the momentum of the prior variance of volume-preserving models.
PRIOR_VARIANCE_MOMENTUM = 0.1


def cosine_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """Apple's `CosineLRSchedule`: linear from min_lr to max_lr over the warm-up, then a cosine back to min_lr.
    `step` counts optimizer steps already taken (the rate for the next one)."""
    count = step + 1
    if count <= warmup_steps:
        return min_lr + count / warmup_steps * (max_lr - min_lr)
    progress = min(1.0, (count - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def add_noise(
    images: torch.Tensor, noise_type: str, noise_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apple's input noise: `x + noise_std * N(0, 1)`, or uniform dequantization of the 256 pixel levels
    `((x + 1) * 127.5 + U[0, 1)) / 256 * 2 - 1`."""
    if noise_type == "gaussian":
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return images + noise_std * noise
    if noise_type == "uniform":
        levels = (images + 1) * (255 / 2)
        jitter = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return (levels + jitter) / 256 * 2 - 1
    raise ValueError(f"noise_type must be 'gaussian' or 'uniform', got {noise_type!r}")


def drop_labels(labels: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by -1 (the unconditional branch) with `probability`, for classifier-free guidance."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, -1), labels)


def drop_captions(captions: list[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt "" with `probability` (Apple's `drop_label` for text)."""
    if probability <= 0:
        return list(captions)
    device = generator.device if generator is not None else "cpu"
    drop = torch.rand(len(captions), generator=generator, device=device) < probability
    return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist(), strict=True)]


@torch.no_grad()
def update_prior_variance(model: TarFlowModel, mean_square: torch.Tensor) -> None:
    """Apple's `update_prior` for volume-preserving models: the prior variance moves towards the latents'
    per-dimension E[z^2] (`mean_square`, shape (num_patches, patch_dim)) with momentum 0.1."""
    model.prior_variance.lerp_(mean_square.to(model.prior_variance), PRIOR_VARIANCE_MOMENTUM)


__all__ = [
    "PRIOR_VARIANCE_MOMENTUM",
    "add_noise",
    "cosine_lr",
    "drop_captions",
    "drop_labels",
    "update_prior_variance",
]
