"""Samplers: how a flow block is inverted, as swappable pipeline components (diffusers' schedulers are the model).

A block maps tokens x to z with z_t = (x_t - b_t) * exp(-a_t), where (a_t, b_t) come from a causal transformer over
x_<t. Inverting it is a nonlinear recurrence, x_t = z_t * exp(a_t) + b_t. The samplers see a block only through the
`AffineBlock` interface, on the block's token sequence in its own order with token 0 given (TarFlow's first patch
passes through unchanged; STARFlow prepends its learned start token). The transformer's input at position t is
token t; its output there gives (a, b) for token t + 1.

- `SequentialSampler`: exact, one token per transformer pass, keys and values of earlier tokens cached.
- `JacobiSampler`: fixed-point iteration on a window after a settled prefix; never more passes than sequential.
- `NewtonSampler`: quasi-Newton steps on the same fixed point (previous-token Jacobian by finite differences).
- `BlockJacobiSampler`: Apple's STARFlow block Jacobi, reproduced exactly (chunks, stopping rule, cache).

Each is a small config-carrying class (diffusers' `ConfigMixin`): its options are its constructor's arguments,
checked there, and `from_config`, `save_pretrained`/`from_pretrained` and a JSON config come with it. Pipelines hold
one as their `sampler` component (saved in `model_index.json`, like a scheduler); pipelines and models also take
one per call, or a name (`"jacobi"`, or the command line's `"jacobi:tolerance=1e-3,window=32"`).

```python
>>> from tarflow_hf import JacobiSampler
>>> pipe.sampler = JacobiSampler(tolerance=1e-3)  # kept by save_pretrained / push_to_hub
>>> pipe.sampler = NewtonSampler.from_config(pipe.sampler.config)
```
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from transformers.utils import logging

from .guidance import Guidance, check_positive_number, parse_spec, row_weights
from .layers import WeightPacking
from .products import is_quantized  # noqa: F401 (the layers' import: diffusers copies direct imports only)

try:  # diffusers gives the config machinery; a model's code saved with its weights also runs without it
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
except ImportError:  # transformers alone (`AutoModel.from_pretrained(..., trust_remote_code=True)`): no saving

    class ConfigMixin:
        pass

    class SchedulerMixin:
        pass

    def register_to_config(init):
        return init


logger = logging.get_logger(__name__)

# Jacobi window while the iteration stagnates: wide enough to catch a stretch that converges at once.
JACOBI_PROBE_WINDOW = 16
JACOBI_STAGNATION_PASSES = 5
# Finite-difference step of the Newton sampler's Jacobian columns (model space, float32).
NEWTON_PROBE_STEP = 1e-3


def affine_inverse(z: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x = z * exp(a) + b: the inverse of one affine step, the exponential taken in float32 as Apple does."""
    up = log_scale if log_scale.dtype == torch.float64 else log_scale.float()
    return torch.addcmul(shift, z, up.exp().type(log_scale.dtype))


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
        self, tokens: torch.Tensor, position: int, cache: Any | None, condition: BlockCondition, weight: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, n, D) at positions `position .. position + n - 1` -> guided (log_scale, shift), each
        (B, n, D), for tokens `position + 1 ..`. The cache holds the earlier positions and receives these; without
        one, `position` is 0 and the block runs any prefix of its own (a text prompt) itself."""


@dataclass
class BlockRecord:
    """What a sampler did on one block (see `SamplingStats`)."""

    iterations: int
    sequential_steps: int
    residual: float
    rows_computed: int
    chunk_iterations: list[int] = field(default_factory=list)


@dataclass
class SamplingStats:
    """What the sampler did, per flow block in sampling order."""

    iterations: list[int] = field(default_factory=list)
    """Transformer passes of each block run by a parallel sampler (each pass settles one token or more); 0 for a
    block run sequentially."""
    sequential_steps: list[int] = field(default_factory=list)
    """One-token steps: T - 1 for a sequential block; for a Jacobi block, the steps taken after its
    `max_iterations` budget ran out (these are included in `iterations`)."""
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


# --------------------------------------------------------------------------------------------------- checks
def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ components
class FlowSampler(SchedulerMixin, ConfigMixin):
    """Base of the samplers: inverts one block (`invert_block`), the first `sequential_blocks` blocks in sampling
    order exactly whatever the sampler; with `sequential_blocks=None`, the blocks that say they are best decoded
    once (`decode_sequentially`: STARFlow's deep block, whose passes are bound by compute)."""

    config_name = "sampler_config.json"
    name: ClassVar[str]
    sequential_blocks: int | None = 0

    def decodes_exactly(self, block: AffineBlock, step: int) -> bool:
        """Whether the `step`-th block in sampling order runs token by token whatever this sampler does."""
        if self.sequential_blocks is None:
            return bool(getattr(block, "decode_sequentially", False))
        return step < self.sequential_blocks

    def invert_block(
        self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition, step: int = 0
    ) -> tuple[torch.Tensor, BlockRecord]:
        """Invert one block, the `step`-th in sampling order: z (B, T, D) in the block's order, token 0 given.

        A block that is an `nn.Module` runs its linear layers on packed weights meanwhile (`layers.WeightPacking`:
        the decoding steps' few-row products run 1.2-2.5x faster on CPU). The sampler runs in inference mode (a
        decoding step is hundreds of small operations, mostly views, whose autograd bookkeeping it skips); the
        result is copied out of it, an ordinary tensor that autograd may use afterwards (the denoising step does)."""
        packing = WeightPacking(block) if isinstance(block, nn.Module) else contextlib.nullcontext()
        with packing, torch.inference_mode():
            if self.decodes_exactly(block, step):
                x, record = sample_sequential(block, z, condition)
            else:
                x, record = self.invert(block, z, condition)
        return x.clone(), record

    def invert(self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition) -> tuple[Any, BlockRecord]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The constructor's arguments, as given."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.options().items())))


class SequentialSampler(FlowSampler):
    """Exact: token t + 1 from tokens 0..t, one at a time, earlier keys and values read from the cache (the
    original code's sampler, and the default).

    Args:
        compile_mode (`str`, *optional*): run each step through `torch.compile` with this mode; on CUDA,
            `"reduce-overhead"` captures it as a CUDA graph, replayed token after token (the step keeps its shapes
            and never waits for the device: a full-length static cache, positions as device tensors). The first
            call of each block compiles. None runs the steps as they come.
        compile_backend (`str`, defaults to `"inductor"`): `torch.compile`'s backend (the mode applies to inductor).
        freeze_weights (`bool`, defaults to False): with inductor, compile the weights in as constants (inductor's
            `freezing`), so that they are laid out for its kernels once: int8 weight-only weights then run on its
            int8 kernels, on a CPU about 2x faster than eager int8 or bf16 (`benchmarks.weight_formats`). For
            inference only; a block whose weights changed afterwards (`load_state_dict`, `fuse_lora`) is compiled
            again when it is next sampled.
    """

    name = "sequential"
    COMPILE_MODES: ClassVar[tuple[str, ...]] = (
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    )

    @register_to_config
    def __init__(
        self, compile_mode: str | None = None, compile_backend: str = "inductor", freeze_weights: bool = False
    ) -> None:
        if compile_mode is not None and compile_mode not in self.COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {self.COMPILE_MODES}, got {compile_mode!r}")
        if not isinstance(compile_backend, str) or not compile_backend:
            raise ValueError(f"compile_backend must be the name of a torch.compile backend, got {compile_backend!r}")
        if not isinstance(freeze_weights, bool):
            raise ValueError(f"freeze_weights must be True or False, got {freeze_weights!r}")
        if freeze_weights and (compile_mode is None or compile_backend != "inductor"):
            raise ValueError("freeze_weights=True needs a compile_mode with the inductor backend")
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.freeze_weights = freeze_weights
        self._compiled: dict[Any, tuple[Any, Any, Any]] = {}  # kind of block -> (its weights, step copy, compiled)

    def invert(self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition) -> tuple[Any, BlockRecord]:
        if self.compile_mode is None:
            return sample_sequential(block, z, condition)
        # Inductor reads `freezing` from its global configuration when it compiles (the first steps), not from
        # torch.compile's options: there it would leave the weight-only int8 kernels unused.
        frozen = torch._inductor.config.patch(freezing=True) if self.freeze_weights else contextlib.nullcontext()
        with frozen:
            return sample_sequential_static(block, z, condition, self.compiled_step(block))

    def compiled_step(self, block: AffineBlock) -> Any:
        """`static_step` compiled for blocks like `block`. Each kind of block (its weights' names, shapes and
        types; with frozen weights, each block) gets a copy of the function with a code object of its own: the
        compiler keeps at most `recompile_limit` (8) graphs per code object, and a process may sample many kinds.
        Frozen graphs hold the weights they were compiled with, so a block whose weights were replaced or changed
        in place since is compiled again."""
        key = id(block) if self.freeze_weights else _structure(block)
        weights = _weights_fingerprint(block) if self.freeze_weights else None
        known = self._compiled.get(key)
        if known is not None and known[0] == weights:
            return known[2]
        if known is not None:
            logger.warning("the weights changed since this sampler froze them into its compiled steps: recompiling")
            torch._C._dynamo.eval_frame.reset_code(known[1].__code__)  # free the stale graph and its weights
        step = types.FunctionType(static_step.__code__.replace(), static_step.__globals__, static_step.__name__)
        mode = self.compile_mode if self.compile_backend == "inductor" else None
        compiled = torch.compile(step, backend=self.compile_backend, mode=mode, fullgraph=True, dynamic=False)
        self._compiled[key] = (weights, step, compiled)
        return compiled


def _structure(module: nn.Module) -> tuple[Any, ...]:
    """What a compiled graph of `module` depends on besides its weights' values."""
    tensors = (*module.named_parameters(), *module.named_buffers())
    return (type(module), *((name, tuple(t.shape), t.dtype, type(t)) for name, t in tensors))


def _weights_fingerprint(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Where each weight lives and how often it was changed in place (`_version`)."""
    return tuple((tensor.data_ptr(), tensor._version) for tensor in (*module.parameters(), *module.buffers()))


class JacobiSampler(FlowSampler):
    """Parallel: fixed-point iteration x <- z * exp(a(x)) + b(x) on a window of tokens after a settled prefix
    (Jacobi inside the window, Gauss-Seidel from one window to the next); never more passes than sequential.

    Args:
        tolerance (`float`, defaults to 1e-4): a token counts as settled once the tokens before it moved by at most
            this in a pass (model space). The sequence amplifies what is left, so the samples' error is a few times
            this (bundled model: 1e-4 gives about 3e-4).
        window (`int`, *optional*): tokens iterated together after the settled prefix; default all of them (fewest
            passes). A smaller window computes less per pass.
        max_iterations (`int`, *optional*): passes per block after which the rest goes one token at a time.
        sequential_blocks (`int`, *optional*): run the first blocks in sampling order exactly. None (default): the
            blocks best decoded once, STARFlow's deep block (its passes are bound by compute; its shallow blocks
            settle in a few passes); none of TarFlow's. 0 iterates every block.
    """

    name = "jacobi"

    @register_to_config
    def __init__(
        self,
        tolerance: float = 1e-4,
        window: int | None = None,
        max_iterations: int | None = None,
        sequential_blocks: int | None = None,
    ) -> None:
        self.tolerance = check_positive_number("tolerance", tolerance)
        self.window = _check_int("window", window, 1, optional=True)
        self.max_iterations = _check_int("max_iterations", max_iterations, 1, optional=True)
        self.sequential_blocks = _check_int("sequential_blocks", sequential_blocks, 0, optional=True)

    def invert(self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition) -> tuple[Any, BlockRecord]:
        return sample_jacobi(block, z, condition, self.tolerance, self.window, self.max_iterations)


class NewtonSampler(FlowSampler):
    """Parallel: quasi-Newton steps on the Jacobi fixed point, fewer passes than Jacobi where tokens depend
    strongly on the previous one, for about 2 * token_dim + 1 times its compute and memory per pass (float32).

    Args:
        tolerance (`float`, defaults to 1e-4): as `JacobiSampler`'s.
        sequential_blocks (`int`, *optional*): as `JacobiSampler`'s.
    """

    name = "newton"

    @register_to_config
    def __init__(self, tolerance: float = 1e-4, sequential_blocks: int | None = None) -> None:
        self.tolerance = check_positive_number("tolerance", tolerance)
        self.sequential_blocks = _check_int("sequential_blocks", sequential_blocks, 0, optional=True)

    def invert(self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition) -> tuple[Any, BlockRecord]:
        return sample_newton(block, z, condition, self.tolerance)


class BlockJacobiSampler(FlowSampler):
    """Apple's STARFlow block Jacobi (`--jacobi 1`), step for step; approximate, about `threshold` from exact.

    Args:
        block_size (`int`, defaults to 16): tokens per chunk.
        threshold (`float`, defaults to 1e-3): a chunk stops iterating once its relative change drops below this.
        max_iterations (`int`, defaults to 32): passes per chunk at most.
        sequential_blocks (`int`, defaults to 0): as `JacobiSampler`'s, but Apple's default: every block iterated.
    """

    name = "block_jacobi"

    @register_to_config
    def __init__(
        self,
        block_size: int = 16,
        threshold: float = 1e-3,
        max_iterations: int = 32,
        sequential_blocks: int | None = 0,
    ) -> None:
        self.block_size = _check_int("block_size", block_size, 1)
        self.threshold = check_positive_number("threshold", threshold)
        self.max_iterations = _check_int("max_iterations", max_iterations, 1)
        self.sequential_blocks = _check_int("sequential_blocks", sequential_blocks, 0, optional=True)

    def invert(self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition) -> tuple[Any, BlockRecord]:
        return sample_block_jacobi(block, z, condition, self.block_size, self.threshold, self.max_iterations)


SAMPLERS: dict[str, type[FlowSampler]] = {
    cls.name: cls for cls in (SequentialSampler, JacobiSampler, NewtonSampler, BlockJacobiSampler)
}
for _cls in SAMPLERS.values():  # diffusers' `from_config` across them without warnings about the others' options
    _cls._compatibles = [other.__name__ for other in SAMPLERS.values() if other is not _cls]


def get_sampler(sampler: FlowSampler | str | None) -> FlowSampler:
    """A sampler from a sampler, a name (`"jacobi"`), the command line's `"NAME:key=value,..."`, or None (the
    sequential one). A bad name or option is a one-line `ValueError` listing what is allowed."""
    if sampler is None:
        return SequentialSampler()
    if isinstance(sampler, FlowSampler):
        return sampler
    if not isinstance(sampler, str):
        raise ValueError(f"sampler must be a sampler or one of {tuple(SAMPLERS)}, got {type(sampler).__name__}")
    name = sampler.partition(":")[0].strip()
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    cls = SAMPLERS[name]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    _, options = parse_spec(sampler, allowed, f"sampler {name!r}")
    return cls(**options)


def sampler_spec(sampler: FlowSampler) -> str:
    """The `NAME:key=value,...` form of a sampler (the options that differ from their defaults)."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(type(sampler).__init__).parameters.items()
        if name != "self"
    }
    options = [f"{key}={value}" for key, value in sampler.options().items() if value != defaults[key]]
    return sampler.name + (":" + ",".join(options) if options else "")


# ---------------------------------------------------------------------------------------------------- samplers
def sample_sequential(
    block: AffineBlock, z: torch.Tensor, condition: BlockCondition
) -> tuple[torch.Tensor, BlockRecord]:
    """Exact inverse: token t + 1 from tokens 0..t, one at a time, earlier keys and values read from the cache."""
    batch, num_tokens, _ = z.shape
    x = z.clone()
    cache = block.new_cache(condition, batch, num_tokens)
    guidance, rows = condition.guidance, num_tokens - 1
    linear = guidance is not None and guidance.active and guidance.rule.schedule == "linear"
    weight = row_weights(guidance, rows, z.device) if not linear else 0.0
    for t in range(rows):
        if linear:  # a Python number, as in Apple's loop, so that half precision rounds the same way
            weight = guidance.weight * (t + 1) / rows
        log_scale, shift = block.affine_span(x[:, t : t + 1], t, cache, condition, weight)
        x[:, t + 1 : t + 2] = affine_inverse(x[:, t + 1 : t + 2], log_scale, shift)
    return x, BlockRecord(0, num_tokens - 1, 0.0, num_tokens - 1)


def static_step(
    block: AffineBlock,
    token: torch.Tensor,
    latent: torch.Tensor,
    position: torch.Tensor,
    cache: Any,
    condition: BlockCondition,
    weight: torch.Tensor | float,
) -> torch.Tensor:
    """Token t + 1 from token t (B, 1, D) at `position` (a 0-d tensor) and latent t + 1, on a static cache: the
    same shapes at every token and no value read on the host, so that a compiler can capture it whole."""
    log_scale, shift = block.affine_span(token, position, cache, condition, weight)
    return affine_inverse(latent, log_scale, shift)


def sample_sequential_static(
    block: AffineBlock, z: torch.Tensor, condition: BlockCondition, step: Any = static_step
) -> tuple[torch.Tensor, BlockRecord]:
    """`sample_sequential` on a static cache, one `step` (`static_step`, or it compiled) per token. The first
    runs as it is: it allocates the cache's buffers, which the compiled steps then write in place."""
    batch, num_tokens, _ = z.shape
    x = z.clone()
    cache = block.new_cache(condition, batch, num_tokens, static=True)
    weights = row_weights(condition.guidance, num_tokens - 1, z.device)
    per_row = isinstance(weights, torch.Tensor)
    weight = weights[:, :1].clone() if per_row else weights
    position = torch.zeros((), dtype=torch.long, device=z.device)
    token = x[:, :1].clone()
    for t in range(num_tokens - 1):
        if per_row:
            weight.copy_(weights[:, t : t + 1])
        run = static_step if t == 0 else step
        token = run(block, token, z[:, t + 1 : t + 2].clone(), position, cache, condition, weight)
        x[:, t + 1 : t + 2] = token
        position += 1
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
            f"the Jacobi tolerance {tolerance:g} is below the resolution of {dtype} arithmetic ({resolution:.1e}): "
            "Jacobi will settle about one token per pass. Use a tolerance near that resolution (the samples' "
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
    """Inverse by fixed-point iteration on a window of tokens after a settled prefix (see `JacobiSampler`).

    The settled prefix lives in the key/value cache, so a pass computes only the window. Window row t predicts
    token t + 1. The first row reads settled tokens only, so each pass settles at least one token exactly; it
    settles the following ones too while the rows before them were fed tokens that moved by at most `tolerance`.
    The window starts at `window` tokens (default: all), doubles whenever a pass settles all of it, and drops to a
    small probe while the iteration stagnates (one token per pass, the largest movement not shrinking: a stretch
    of strong dependence where a wide window only wastes compute). After `budget` passes, the rest goes one token
    at a time."""
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
                f"the Newton sampler takes derivatives by finite differences, which {shift.dtype} arithmetic "
                "cannot resolve: its steps will be noise. Use the Jacobi sampler, or sample in float32."
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
    max_iterations: int = 32,
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
    "SAMPLERS",
    "AffineBlock",
    "BlockCondition",
    "BlockJacobiSampler",
    "BlockRecord",
    "FlowSampler",
    "JacobiSampler",
    "NewtonSampler",
    "SamplingStats",
    "SequentialSampler",
    "affine_inverse",
    "get_sampler",
    "sample_block_jacobi",
    "sample_jacobi",
    "sample_newton",
    "sample_sequential",
    "sampler_spec",
]
