"""Samplers for affine autoregressive flow blocks (TarFlow's and STARFlow's alike), and classifier-free guidance.

A block maps tokens x to z with z_t = (x_t - b_t) * exp(-a_t), where (a_t, b_t) come from a causal transformer over
x_<t. Inverting it is a nonlinear recurrence, x_t = z_t * exp(a_t) + b_t. The samplers here see a block only
through the `AffineBlock` interface, on the block's token sequence in its own order with token 0 given: TarFlow's
first patch passes through unchanged (x_0 = z_0); STARFlow prepends its learned start token and drops it again.
The transformer's input at position t is token t; its output there gives (a, b) for token t + 1.

- `sample_sequential`: exact, one token per transformer pass, keys and values of earlier tokens cached.
- `sample_jacobi`: fixed-point iteration on a window after a settled prefix; never more passes than sequential.
- `sample_newton`: quasi-Newton steps on the same fixed point (previous-token Jacobian by finite differences).
- `sample_block_jacobi`: Apple's STARFlow block Jacobi, reproduced exactly (chunks, stopping rule, cache).

Guidance: the transformer runs the conditional and unconditional branches as one batch ([cond; uncond] rows, one
shared trajectory x) and a `GuidanceRule` combines their predictions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from transformers.utils import logging

from .layers import KVCache, WeightPacking

logger = logging.get_logger(__name__)

GuidanceRuleName = Literal["extrapolate", "gaussian_product"]
GuidanceTarget = Literal["both", "scale", "shift"]
GuidanceSchedule = Literal["constant", "linear"]
GUIDANCE_TARGETS = ("both", "scale", "shift")
GUIDANCE_SCHEDULES = ("constant", "linear")
SAMPLERS = ("sequential", "jacobi", "newton", "block_jacobi")
# A branch's prediction for some tokens: (log-scale a, shift b); a guidance weight: one number, or one per row.
Prediction = tuple[torch.Tensor, torch.Tensor]
Weight = torch.Tensor | float
# Jacobi window while the iteration stagnates: wide enough to catch a stretch that converges at once.
JACOBI_PROBE_WINDOW = 16
JACOBI_STAGNATION_PASSES = 5
# Finite-difference step of the Newton sampler's Jacobian columns (model space, float32).
NEWTON_PROBE_STEP = 1e-3


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # Apple computes LayerNorm, exp and the log-determinant in float32 whatever the autocast dtype (float64 is left
    # alone, for exact checks).
    return x if x.dtype == torch.float64 else x.float()


def affine_inverse(z: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x = z * exp(a) + b: the inverse of one affine step, the exponential taken in float32 as Apple does."""
    scale = at_least_fp32(log_scale).exp().type(log_scale.dtype)
    return torch.addcmul(shift, z, scale)


# ------------------------------------------------------------------------------------------------------ guidance
def extrapolate(cond: Prediction, uncond: Prediction, weight: Weight, target: GuidanceTarget = "both") -> Prediction:
    """TarFlow's rule: cond + w * (cond - uncond) on the log-scale, the shift, or both."""
    (a_cond, b_cond), (a_uncond, b_uncond) = cond, uncond
    if target in ("both", "scale"):
        a_cond = a_cond + weight * (a_cond - a_uncond)
    if target in ("both", "shift"):
        b_cond = b_cond + weight * (b_cond - b_uncond)
    return a_cond, b_cond


def gaussian_product(
    cond: Prediction, uncond: Prediction, weight: Weight, target: GuidanceTarget = "both"
) -> Prediction:
    """STARFlow's rule: the Gaussian p_c^(1+w) / p_u^w of the two branches' predictions N(b, exp(a)^2), with the
    variance ratio s = min(sigma_c / sigma_u, 1)^2 clipped so that the result's variance stays positive."""
    (a_cond, b_cond), (a_uncond, b_uncond) = cond, uncond
    ratio = (2 * torch.clamp(a_cond - a_uncond, max=0.0)).exp()
    denominator = 1 + weight - weight * ratio
    log_scale = a_cond - 0.5 * denominator.log()
    shift = ((1 + weight) * b_cond - weight * ratio * b_uncond) / denominator
    return log_scale, shift


GUIDANCE_RULES: dict[str, Callable[[Prediction, Prediction, Weight, GuidanceTarget], Prediction]] = {
    "extrapolate": extrapolate,
    "gaussian_product": gaussian_product,
}


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance, as the samplers apply it.

    `scale` is in the diffusers convention: 1.0 is no guidance; Apple's `cfg`/`guidance` g is `scale = 1 + g`.
    `rule` combines the branches ("extrapolate": TarFlow; "gaussian_product": STARFlow); `target` (extrapolation
    only) picks what is guided; the "linear" `schedule` is TarFlow's annealed guidance, weight growing with the
    token index; `attention_temperature` divides the unconditional branch's attention logits."""

    scale: float = 1.0
    rule: GuidanceRuleName = "extrapolate"
    target: GuidanceTarget = "both"
    schedule: GuidanceSchedule = "constant"
    attention_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.scale!r}")
        if self.rule not in GUIDANCE_RULES:
            raise ValueError(f"guidance_rule must be one of {tuple(GUIDANCE_RULES)}, got {self.rule!r}")
        if self.target not in GUIDANCE_TARGETS:
            raise ValueError(f"guidance_target must be one of {GUIDANCE_TARGETS}, got {self.target!r}")
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {self.schedule!r}")
        if not self.attention_temperature > 0:
            raise ValueError(f"attention_temperature must be > 0, got {self.attention_temperature}")
        if self.rule == "gaussian_product" and self.target != "both":
            raise ValueError("guidance_target applies to guidance_rule='extrapolate' only; use target='both'")
        if self.rule == "gaussian_product" and self.scale < 1:
            raise ValueError(f"guidance_rule='gaussian_product' needs guidance_scale >= 1, got {self.scale}")

    @property
    def weight(self) -> float:
        """w = scale - 1, the weight of the difference between the branches (Apple's g)."""
        return self.scale - 1.0

    @property
    def active(self) -> bool:
        """Guidance applies whenever the scale is not 1 (below 1 too: that pushes away from the condition)."""
        return self.scale != 1.0


def row_weights(guidance: Guidance | None, num_rows: int, device: torch.device) -> torch.Tensor | float:
    """The guidance weight of each transformer row: a number, or (1, rows, 1) for the linear schedule, where row t
    (which predicts token t + 1) gets w * (t + 1) / rows."""
    if guidance is None or not guidance.active:
        return 0.0
    if guidance.schedule == "constant":
        return guidance.weight
    steps = torch.arange(1, num_rows + 1, device=device, dtype=torch.float32)
    return (guidance.weight * steps / max(num_rows, 1)).view(1, -1, 1)


def guide(
    guidance: Guidance | None, log_scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine [cond; uncond] rows of (a, b) into B guided rows with the guidance's rule (unguided: as given)."""
    if guidance is None or not guidance.active:
        return log_scale, shift
    if isinstance(weight, torch.Tensor):  # combined in the projection's dtype, as Apple does
        weight = weight.to(log_scale.dtype)
    a_cond, a_uncond = log_scale.chunk(2)
    b_cond, b_uncond = shift.chunk(2)
    return GUIDANCE_RULES[guidance.rule]((a_cond, b_cond), (a_uncond, b_uncond), weight, guidance.target)


# ------------------------------------------------------------------------------------------------ the interface
class BlockCondition(Protocol):
    """What a block needs besides its tokens (class or text embeddings of both branches, guidance), built by the
    model; opaque to the samplers except for these two members."""

    guidance: Guidance | None

    def repeat_interleave(self, copies: int) -> BlockCondition:
        """The condition for a batch whose every image is repeated `copies` times in a row."""


class AffineBlock(Protocol):
    """One affine autoregressive flow block, as the samplers see it."""

    def new_cache(self, condition: BlockCondition, batch_size: int, num_tokens: int) -> Any:
        """A key/value cache for `num_tokens` positions (plus any prefix the block keeps, already filled)."""

    def affine_span(
        self,
        tokens: torch.Tensor,
        position: int,
        cache: Any | None,
        condition: BlockCondition,
        weight: torch.Tensor | float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, n, D) at positions `position .. position + n - 1` -> guided (log_scale, shift), each
        (B, n, D), for tokens `position + 1 ..`. The cache holds the earlier positions and receives these; without
        one, `position` is 0 and the block runs any prefix of its own (a text prompt) itself."""


@dataclass
class SamplingStats:
    """What the sampler did, per flow block in sampling order."""

    iterations: list[int] = field(default_factory=list)
    """Transformer passes of each block run by a parallel sampler (each pass settles one token or more); 0 for a
    block run sequentially."""
    sequential_steps: list[int] = field(default_factory=list)
    """One-token steps: T - 1 for a sequential block; for a Jacobi block, the steps taken after its
    `jacobi_max_iterations` budget ran out (these are included in `iterations`)."""
    residuals: list[float] = field(default_factory=list)
    """Largest movement, in its last pass, of a token feeding one that a parallel block accepted (at most the
    tolerance; 0.0 where every token was settled exactly). Block Jacobi: the largest relative change of a chunk's
    last pass (Apple's stopping statistic)."""
    rows_computed: list[int] = field(default_factory=list)
    """Transformer rows computed per image and branch: T - 1 for a sequential block; more for a parallel one,
    which recomputes unsettled tokens each pass (Newton: on 2 * token_dim + 1 copies). The compute cost, where
    passes are the latency."""
    chunk_iterations: list[list[int]] = field(default_factory=list)
    """Block Jacobi only: iterations of each chunk, in execution order (Apple's `jacobi_iters`)."""

    def add_block(self, record: BlockRecord) -> None:
        self.iterations.append(record.iterations)
        self.sequential_steps.append(record.sequential_steps)
        self.residuals.append(record.residual)
        self.rows_computed.append(record.rows_computed)
        self.chunk_iterations.append(record.chunk_iterations)

    @property
    def sequential_blocks(self) -> list[bool]:
        """Blocks that ran token by token from the start."""
        return [iterations == 0 for iterations in self.iterations]

    @property
    def transformer_passes(self) -> int:
        """Transformer evaluations that had to run one after another. The sequential sampler needs
        num_blocks * (T - 1)."""
        pairs = zip(self.iterations, self.sequential_steps, strict=True)
        return sum(steps if iterations == 0 else iterations for iterations, steps in pairs)


@dataclass
class BlockRecord:
    iterations: int
    sequential_steps: int
    residual: float
    rows_computed: int
    chunk_iterations: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SamplerOptions:
    """Which sampler, and its settings (see `TarFlowModel.inverse` for their meaning)."""

    sampler: str = "sequential"
    jacobi_tolerance: float = 1e-4
    jacobi_window: int | None = None
    jacobi_max_iterations: int | None = None
    jacobi_sequential_blocks: int = 0
    jacobi_block_size: int = 16
    jacobi_threshold: float = 0.001

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not _is_positive_number(self.jacobi_tolerance):
            raise ValueError(f"jacobi_tolerance must be a number > 0, got {self.jacobi_tolerance!r}")
        if self.sampler == "newton" and (self.jacobi_window is not None or self.jacobi_max_iterations is not None):
            raise ValueError(
                "jacobi_window and jacobi_max_iterations apply to sampler='jacobi' only; 'newton' works on all "
                "patches and never takes more passes than 'sequential'"
            )
        if self.jacobi_window is not None and not _is_int_at_least(self.jacobi_window, 1):
            raise ValueError(
                f"jacobi_window must be an integer >= 1 (or None for all patches), got {self.jacobi_window!r}"
            )
        if self.jacobi_max_iterations is not None and not _is_int_at_least(self.jacobi_max_iterations, 1):
            raise ValueError(f"jacobi_max_iterations must be an integer >= 1, got {self.jacobi_max_iterations!r}")
        if not _is_int_at_least(self.jacobi_sequential_blocks, 0):
            raise ValueError(f"jacobi_sequential_blocks must be an integer >= 0, got {self.jacobi_sequential_blocks!r}")
        if not _is_int_at_least(self.jacobi_block_size, 1):
            raise ValueError(f"jacobi_block_size must be an integer >= 1, got {self.jacobi_block_size!r}")
        if not _is_positive_number(self.jacobi_threshold):
            raise ValueError(f"jacobi_threshold must be a number > 0, got {self.jacobi_threshold!r}")


def _is_int_at_least(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def invert_block(
    block: AffineBlock, z: torch.Tensor, condition: BlockCondition, options: SamplerOptions, step: int = 0
) -> tuple[torch.Tensor, BlockRecord]:
    """Invert one block, the `step`-th in sampling order, with the chosen sampler (the exact one for the first
    `options.jacobi_sequential_blocks`): z (B, T, D) in the block's order, token 0 given. A block that is an
    `nn.Module` runs its linear layers on packed weights meanwhile (`layers.WeightPacking`: the decoding steps'
    few-row products run 1.2-2.5x faster on CPU).

    The sampler runs in inference mode: a decoding step is hundreds of small operations, mostly views, and
    inference mode skips their autograd bookkeeping (about 1.2x on a small model, where that overhead is most of a
    step). The result is copied out of it, so it is an ordinary tensor that autograd may use afterwards (the score
    denoising step does)."""
    packing = WeightPacking(block) if isinstance(block, nn.Module) else contextlib.nullcontext()
    with packing, torch.inference_mode():
        if step < options.jacobi_sequential_blocks or options.sampler == "sequential":
            x, record = sample_sequential(block, z, condition)
        elif options.sampler == "newton":
            x, record = sample_newton(block, z, condition, options.jacobi_tolerance)
        elif options.sampler == "block_jacobi":
            x, record = sample_block_jacobi(
                block, z, condition, options.jacobi_block_size, options.jacobi_threshold, options.jacobi_max_iterations
            )
        else:
            x, record = sample_jacobi(
                block, z, condition, options.jacobi_tolerance, options.jacobi_window, options.jacobi_max_iterations
            )
    return x.clone(), record


# ---------------------------------------------------------------------------------------------------- samplers
def sample_sequential(
    block: AffineBlock, z: torch.Tensor, condition: BlockCondition
) -> tuple[torch.Tensor, BlockRecord]:
    """Exact inverse: token t + 1 from tokens 0..t, one at a time, earlier keys and values read from the cache."""
    batch, num_tokens, _ = z.shape
    x = z.clone()
    cache = block.new_cache(condition, batch, num_tokens)
    guidance, rows = condition.guidance, num_tokens - 1
    linear = guidance is not None and guidance.schedule == "linear"
    weight = row_weights(guidance, rows, z.device) if not linear else 0.0
    for t in range(rows):
        if linear:  # a Python number, as in Apple's loop, so that half precision rounds the same way
            weight = guidance.weight * (t + 1) / rows
        log_scale, shift = block.affine_span(x[:, t : t + 1], t, cache, condition, weight)
        x[:, t + 1 : t + 2] = affine_inverse(x[:, t + 1 : t + 2], log_scale, shift)
    return x, BlockRecord(0, num_tokens - 1, 0.0, num_tokens - 1)


def _accept_tokens(
    guesses: torch.Tensor, previous: torch.Tensor, latents: torch.Tensor, bound: torch.Tensor, tolerance: float
) -> tuple[torch.Tensor, int, float, torch.Tensor]:
    """One pass of a parallel sampler over the tokens after the settled prefix: `guesses` (B, L, D) computed from
    `previous`, whose first token is exact (it reads settled tokens only). The leading tokens are accepted up to
    and including the first one whose input row was fed a token that moved by more than `tolerance` (it was still
    computed from settled inputs); that is at least one token, so a block never takes more passes than token by
    token. Far from the fixed point, a later guess can overflow, or grow past `bound` and overflow inside the
    transformer, where one non-finite key or value turns every row of the next pass into NaN: such guesses count
    as moving and restart from their latents, unless accepted (an accepted overflow is real, and reported when
    sampling ends). Returns (the tokens for the next pass, number accepted, largest movement of an accepted
    token's inputs, movement per token)."""
    wild = ~(guesses.abs() <= bound)  # NaN too
    movement = (guesses - previous).abs().amax(dim=(0, 2)).masked_fill(wild.any(dim=2).any(dim=0), math.inf)
    moving = (~(movement <= tolerance)).nonzero()
    accepted = min(int(moving[0]) + 1 if len(moving) else len(movement), len(movement))
    wild[:, :accepted] = False
    residual = movement[: accepted - 1].max().item() if accepted > 1 else 0.0
    return torch.where(wild, latents, guesses), accepted, residual, movement


def _guess_bound(latent_range: torch.Tensor, settled: torch.Tensor) -> torch.Tensor:
    """A generous range for a parallel sampler's guesses: ten times the largest latent (`latent_range`) or settled
    value (a 0-d tensor, so no device sync)."""
    return 10.0 * torch.maximum(latent_range, settled.abs().amax()).clamp(min=1.0)


def _stagnates(movements: list[float]) -> bool:
    """The largest movement has not halved over the last `JACOBI_STAGNATION_PASSES` passes."""
    n = JACOBI_STAGNATION_PASSES
    return len(movements) > n and movements[-1] > 0.5 * movements[-1 - n]


def _warn_if_tolerance_below_resolution(tolerance: float, dtype: torch.dtype) -> None:
    # In float32 a tiny tolerance is a legitimate request for the exact result. In half precision, rounding moves
    # every token by about eps * |value| each pass, so a finer tolerance is never met and Jacobi settles one token
    # per pass: correct, but slower than the sequential sampler.
    resolution = torch.finfo(dtype).eps
    if dtype.itemsize < 4 and tolerance < resolution:
        logger.warning_once(
            f"jacobi_tolerance={tolerance:g} is below the resolution of {dtype} arithmetic ({resolution:.1e}): "
            "Jacobi will settle about one patch per pass. Use a tolerance near that resolution (the images' "
            "error will be a few times it), or sample in float32."
        )


def sample_jacobi(
    block: AffineBlock,
    z: torch.Tensor,
    condition: BlockCondition,
    tolerance: float,
    window: int | None = None,
    budget: int | None = None,
) -> tuple[torch.Tensor, BlockRecord]:
    """Inverse by fixed-point iteration x <- z * exp(a(x)) + b(x) on a window of tokens after a settled prefix:
    Jacobi inside the window, Gauss-Seidel from one window to the next.

    The settled prefix lives in the key/value cache, so a pass computes only the window. Window row t predicts
    token t + 1. The first row reads settled tokens only, so each pass settles at least one token exactly; it
    settles the following ones too while the rows before them were fed tokens that moved by at most `tolerance`.
    So Jacobi never needs more passes than the sequential sampler. The window starts at `window` tokens (default:
    all), doubles whenever a pass settles all of it, and drops to a small probe while the iteration stagnates (one
    token per pass, the largest movement not shrinking: a stretch of strong dependence where a wide window only
    wastes compute). After `budget` passes, the rest goes one token at a time."""
    batch, num_tokens, _ = z.shape
    widest = num_tokens - 1 if window is None else min(window, num_tokens - 1)
    width = widest
    weights = row_weights(condition.guidance, num_tokens - 1, z.device)
    x = z.clone()
    cache = block.new_cache(condition, batch, num_tokens)
    frontier = passes = after_budget = rows_computed = 0  # tokens 0..frontier are settled
    residual, movements = 0.0, []
    latent_range = z.abs().amax()
    while frontier < num_tokens - 1:
        if budget is not None and passes >= budget:
            width, after_budget = 1, after_budget + 1
        end = min(frontier + width, num_tokens - 1)
        weight = weights[:, frontier:end] if isinstance(weights, torch.Tensor) else weights
        log_scale, shift = block.affine_span(x[:, frontier:end], frontier, cache, condition, weight)
        if passes == 0:
            _warn_if_tolerance_below_resolution(tolerance, shift.dtype)
        targets = z[:, frontier + 1 : end + 1]
        guesses = affine_inverse(targets, log_scale, shift)
        bound = _guess_bound(latent_range, x[:, : frontier + 1])
        x[:, frontier + 1 : end + 1], settled, accepted_movement, movement = _accept_tokens(
            guesses, x[:, frontier + 1 : end + 1], targets, bound, tolerance
        )
        movements.append(movement.max().item())
        passes, rows_computed = passes + 1, rows_computed + end - frontier
        residual = max(residual, accepted_movement)
        whole_window = settled == end - frontier
        frontier += settled
        if whole_window:  # a new stretch starts from the latents: its history says nothing
            width, movements = min(2 * width, widest), []
        elif settled == 1 and _stagnates(movements):
            width, movements = min(width, JACOBI_PROBE_WINDOW), []
    return x, BlockRecord(passes, after_budget, residual, rows_computed)


def sample_newton(
    block: AffineBlock, z: torch.Tensor, condition: BlockCondition, tolerance: float
) -> tuple[torch.Tensor, BlockRecord]:
    """Inverse by quasi-Newton steps on the Jacobi fixed point x = F(x), F(x)_t = z_t * exp(a_t(x)) + b_t(x), with
    the same settled-prefix bookkeeping as `sample_jacobi` (so, again, never more passes than sequential).

    A Newton step solves (I - J) delta = F(x) - x. J is strictly block lower triangular; in trained models its
    largest blocks are dF_t/dx_{t-1}, so the step keeps just those: delta_t = r_t + dF_t/dx_{t-1} delta_{t-1}, a
    recurrence of small matrix products, not transformer passes. Those blocks come from finite differences in the
    same batched pass as F(x): one copy of the batch per token dimension and parity of the token index (perturbing
    every other token keeps dF_t/dx_{t-1} apart from dF_t/dx_{t-2}). A step that would overflow or leave the range
    of the Jacobi values falls back to the Jacobi value for that token."""
    batch, num_tokens, token_dim = z.shape
    copies = 1 + 2 * token_dim
    probes = z.new_zeros(copies, num_tokens, token_dim)
    for parity in (0, 1):
        for dim in range(token_dim):
            probes[1 + parity * token_dim + dim, parity::2, dim] = NEWTON_PROBE_STEP
    probe_condition = condition.repeat_interleave(copies)
    weight = row_weights(condition.guidance, num_tokens - 1, z.device)
    probe_z = z.repeat_interleave(copies, dim=0)
    x = z.clone()
    frontier = passes = rows_computed = 0
    latent_range = z.abs().amax()
    residual = 0.0
    while frontier < num_tokens - 1:
        rows = (x.unsqueeze(1) + probes).flatten(0, 1)[:, :-1]  # (batch * copies, T - 1, D)
        log_scale, shift = block.affine_span(rows, 0, None, probe_condition, weight)
        if passes == 0 and shift.dtype.itemsize < 4:
            logger.warning_once(
                f"sampler='newton' takes derivatives by finite differences, which {shift.dtype} arithmetic "
                "cannot resolve: its steps will be noise. Use sampler='jacobi', or sample in float32."
            )
        mapped = torch.cat([probe_z[:, :1], affine_inverse(probe_z[:, 1:], log_scale, shift)], dim=1)
        mapped = mapped.view(batch, copies, num_tokens, token_dim)
        jacobi = mapped[:, 0]
        # derivative[b, parity, i, t, o] = dF_t[o] / dx_s[i] summed over tokens s of that parity before t
        derivative = ((mapped[:, 1:] - jacobi.unsqueeze(1)) / NEWTON_PROBE_STEP).view(
            batch, 2, token_dim, num_tokens, token_dim
        )
        step = torch.zeros_like(x)
        step[:, frontier + 1] = jacobi[:, frontier + 1] - x[:, frontier + 1]
        for t in range(frontier + 2, num_tokens):
            coupling = derivative[:, (t - 1) % 2, :, t, :]
            step[:, t] = jacobi[:, t] - x[:, t] + torch.einsum("bi,bio->bo", step[:, t - 1], coupling)
        # Far from the fixed point a step can overshoot wildly: such tokens take their Jacobi value instead.
        bound = _guess_bound(latent_range, x[:, : frontier + 1])
        proposal = (x + step)[:, frontier + 1 :]
        proposal = torch.where(proposal.abs() <= bound, proposal, jacobi[:, frontier + 1 :])
        proposal[:, 0] = jacobi[:, frontier + 1]  # exact: read settled tokens only
        x[:, frontier + 1 :], settled, accepted_movement, _ = _accept_tokens(
            proposal, x[:, frontier + 1 :], z[:, frontier + 1 :], bound, tolerance
        )
        passes, rows_computed = passes + 1, rows_computed + copies * (num_tokens - 1)
        residual = max(residual, accepted_movement)
        frontier += settled
    return x, BlockRecord(passes, 0, residual, rows_computed)


def sample_block_jacobi(
    block: AffineBlock,
    z: torch.Tensor,
    condition: BlockCondition,
    block_size: int = 16,
    threshold: float = 0.001,
    max_iterations: int | None = 32,
) -> tuple[torch.Tensor, BlockRecord]:
    """Apple's STARFlow block Jacobi (`MetaBlock.jacobi`), step for step: chunks of `block_size` tokens, each
    iterated from the latents until the relative change mean((new - old)^2) / mean(new^2), one number over the
    whole batch, drops below `threshold` or `max_iterations` passes are spent. The cache then keeps the keys and
    values of the chunk's last inputs, computed before their final update, as Apple's does; the next chunk reads
    those. Not exact: the result differs from the sequential one by roughly the threshold.

    After pass i the chunk's first i + 1 tokens are final (each depends only on tokens before it, which no longer
    change), so pass i + 1 recomputes only the rows after them: Apple's pass would give those rows back unchanged,
    and their keys and values are already in the cache. Same iterates and stopping decisions, fewer rows."""
    batch, num_tokens, _ = z.shape
    max_iterations = 32 if max_iterations is None else max_iterations
    weights = row_weights(condition.guidance, num_tokens - 1, z.device)
    x = z.clone()
    cache = block.new_cache(condition, batch, num_tokens)
    chunk_iterations, rows_computed, residual = [], 0, 0.0
    for start in range(0, num_tokens - 1, block_size):
        end = min(start + block_size, num_tokens - 1)
        for iteration in range(max_iterations):
            first = min(start + iteration, end)  # rows before it predict tokens that are already final
            if first < end:
                weight = weights[:, first:end] if isinstance(weights, torch.Tensor) else weights
                log_scale, shift = block.affine_span(x[:, first:end], first, cache, condition, weight)
                new = affine_inverse(z[:, first + 1 : end + 1], log_scale, shift)
                squared_change = (new - x[:, first + 1 : end + 1]).pow(2).sum()
                x[:, first + 1 : end + 1] = new
                rows_computed += end - first
            else:
                squared_change = torch.zeros((), device=x.device)
            chunk = x[:, start + 1 : end + 1]
            change = (squared_change / chunk.numel()) / chunk.pow(2).mean()
            if change < threshold or iteration == max_iterations - 1:
                break
        chunk_iterations.append(iteration + 1)
        residual = max(residual, change.item())
    return x, BlockRecord(sum(chunk_iterations), 0, residual, rows_computed, chunk_iterations)


__all__ = [
    "GUIDANCE_RULES",
    "SAMPLERS",
    "AffineBlock",
    "BlockCondition",
    "BlockRecord",
    "Guidance",
    "KVCache",
    "SamplerOptions",
    "SamplingStats",
    "affine_inverse",
    "extrapolate",
    "gaussian_product",
    "guide",
    "invert_block",
    "row_weights",
    "sample_block_jacobi",
    "sample_jacobi",
    "sample_newton",
    "sample_sequential",
]
