"""Sampling where every step reads every weight: Apple's `Model.reverse` (float32 weights, and bf16) against our
exact sampler with float32, bf16, int8 and int4 weights, one image with guidance, on the same weights and noise:

    python -m benchmarks.weight_formats --ml-tarflow /path/to/ml-tarflow --ml-starflow /path/to/ml-starflow \\
        --threads 1 --repeats 2 --json weight_formats.json
    python -m benchmarks.weight_formats --preset tiny --repeats 2      # seconds, ours only (the CI test)

TarFlow at the AFHQ-256 geometry (256x256x3 images, patch 8, width 768, 8 layers a block, so 1024 tokens a block;
`--blocks` of them, the released model has 8 and each costs the same), STARFlow at its mid configuration (the one
of `benchmarks.sampling --family starflow`). A decoding step multiplies a few rows (one image, two guidance
branches) by every weight, so it is bound by reading the weights: bf16 reads half the bytes of float32, int8 a
quarter. Apple's decoder runs the two guidance branches as two passes (each reading every weight), ours as one.

Ours: `SequentialSampler()` with each weight format (bf16 through `.to(torch.bfloat16)`, int8 through torchao's
int8 weight-only quantization of the bf16 model, as `TorchAoConfig` loads it, int4 through its CPU int4 layout,
eager only), and float32, bf16 and int8 with the steps
compiled with the weights frozen in (`SequentialSampler(compile_mode=..., freeze_weights=True)`, by default
"max-autotune-no-cudagraphs": inductor picks its own kernels, weight-only int8 ones among them; compile times are
reported apart). Timed round-robin (`timing.round_robin`); every speed-up is the median of the rounds' ratios to
Apple's float32 run in the same round. Deviations: the largest absolute difference from Apple's float32 output
(model space; random weights amplify bf16 rounding through the 1024 sequential steps, so these are upper bounds of
what trained weights give).
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.products import NARROW_OUTPUT_LAYERS
from tarflow_hf.samplers import SequentialSampler

from . import sampling_starflow
from .apple_model import build_apple_tarflow, load_ml_tarflow
from .timing import Results, record_speedup, report, round_robin

AFHQ_GEOMETRY = dict(image_size=256, num_channels=3, patch_size=8, hidden_size=768, layers_per_block=8)
PRESETS = {
    "afhq": dict(tarflow=AFHQ_GEOMETRY, starflow="cpu-mid"),
    "tiny": dict(
        tarflow=dict(AFHQ_GEOMETRY, image_size=16, patch_size=4, hidden_size=64, layers_per_block=1), starflow="tiny"
    ),
}
GUIDANCE_SCALE = {"tarflow": 2.0, "starflow": 4.6}  # Apple's g = 1 and cfg 3.6
Sample = Callable[[], torch.Tensor]


def int8_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of `model` with torchao's int8 weight-only linear weights."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(quantized, Int8WeightOnlyConfig())
    return quantized


def int4_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 copy of `model` with torchao's CPU int4 weight-only linear weights (groups of 128 columns, 32 where the
    width is not a multiple of 128), the 8-wide output projections left in bf16 (the layout cannot hold them)."""
    from torchao.prototype.int4_opaque_tensor import Int4WeightOnlyOpaqueTensorConfig
    from torchao.quantization import quantize_

    quantized, narrow = copy.deepcopy(model).to(torch.bfloat16), re.compile(NARROW_OUTPUT_LAYERS)
    group = 128 if model.config.hidden_size % 128 == 0 else 32
    wide = lambda module, name: isinstance(module, torch.nn.Linear) and not narrow.match(name)  # noqa: E731
    quantize_(quantized, Int4WeightOnlyOpaqueTensorConfig(group_size=group), filter_fn=wide)
    return quantized


def apple_with_bf16_weights(apple: torch.nn.Module) -> torch.nn.Module:
    """A copy of Apple's model with bf16 linear weights; it runs under CPU autocast, as Apple's scripts run on
    GPUs (its norms cast their input to float32, so they keep float32 weights)."""
    apple = copy.deepcopy(apple)
    for module in apple.modules():
        if isinstance(module, torch.nn.Linear):
            module.to(torch.bfloat16)
    return apple


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def our_samplers(
    inverse: Callable[[torch.nn.Module, SequentialSampler], torch.Tensor], model: torch.nn.Module, compile_mode: str
):
    """Ours with each weight format, eager and compiled with the weights frozen in (compiled here, once: the
    seconds that took are returned)."""
    bf16, int8, int4 = copy.deepcopy(model).to(torch.bfloat16), int8_weights(model), int4_weights(model)
    compiled, compile_seconds = SequentialSampler(compile_mode=compile_mode, freeze_weights=True), {}
    for name, weights in (("float32", model), ("bf16", bf16), ("int8", int8)):
        start = time.perf_counter()
        inverse(weights, compiled)
        compile_seconds[name] = time.perf_counter() - start
    exact = SequentialSampler()
    samplers = {
        "float32": lambda: inverse(model, exact),
        "bf16": lambda: inverse(bf16, exact),
        "int8": lambda: inverse(int8, exact),
        "int4": lambda: inverse(int4, exact),
        "float32_compiled": lambda: inverse(model, compiled),
        "bf16_compiled": lambda: inverse(bf16, compiled),
        "int8_compiled": lambda: inverse(int8, compiled),
    }
    return samplers, compile_seconds


def tarflow_samplers(args: argparse.Namespace) -> tuple[dict[str, Sample], dict[str, float]]:
    config = TarFlowConfig(**PRESETS[args.preset]["tarflow"], num_blocks=args.blocks, num_classes=3)
    torch.manual_seed(0)
    model = TarFlowModel(config).eval()
    with torch.no_grad():  # Apple zero-initialises proj_out: every block would be the identity
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.01)
    noise = 0.5 * torch.randn(1, config.num_patches, config.patch_dim, generator=torch.Generator().manual_seed(1))
    labels, scale = torch.tensor([1]), GUIDANCE_SCALE["tarflow"]

    def inverse(flow: TarFlowModel, sampler: SequentialSampler) -> torch.Tensor:
        return flow.inverse(noise, labels, guidance_scale=scale, sampler=sampler).float()

    samplers, compile_seconds = our_samplers(inverse, model, args.compile_mode)
    if args.ml_tarflow:
        apple = build_apple_tarflow(load_ml_tarflow(args.ml_tarflow), model)
        apple_bf16 = apple_with_bf16_weights(apple)

        def original_bf16() -> torch.Tensor:
            with bf16_autocast():
                return apple_bf16.reverse(noise, labels, guidance=scale - 1.0).float()

        samplers = {"apple_float32": lambda: apple.reverse(noise, labels, guidance=scale - 1.0), **samplers}
        samplers["apple_bf16"] = original_bf16
    return samplers, compile_seconds


def starflow_samplers(args: argparse.Namespace) -> tuple[dict[str, Sample], dict[str, float]]:
    options = SimpleNamespace(preset=PRESETS[args.preset]["starflow"], batch_size=1)
    run = sampling_starflow.StarFlowRun(SimpleNamespace(**vars(options), guidance_scale=GUIDANCE_SCALE["starflow"]))

    def inverse(flow: torch.nn.Module, sampler: SequentialSampler) -> torch.Tensor:
        return flow.inverse(run.noise, run.text, run.negative, run.guidance_scale, sampler=sampler).float()

    samplers, compile_seconds = our_samplers(inverse, run.model, args.compile_mode)
    if args.ml_starflow:
        apple_float32 = run.originals(args.ml_starflow, 16, 1e-3)["original"]
        apple = sampling_starflow.build_apple_starflow(sampling_starflow.load_ml_starflow(args.ml_starflow), run.model)
        apple_bf16, both = apple_with_bf16_weights(apple), torch.cat([run.text, run.negative])

        def original_bf16() -> torch.Tensor:
            with torch.no_grad(), bf16_autocast():
                return apple_bf16(run.noise, both, reverse=True, guidance=run.guidance_scale - 1,
                                  context_length=16, **sampling_starflow.APPLE_EXACT).float()  # fmt: skip

        samplers = {"apple_float32": lambda: apple_float32().float(), **samplers, "apple_bf16": original_bf16}
    return samplers, compile_seconds


def measure(
    family: str, samplers: dict[str, Sample], compile_seconds: dict[str, float], repeats: int, results: Results
):
    """Round-robin timings of `samplers`; each one's seconds, its speed-up over Apple's float32 run and over our
    float32 one, and its deviation from Apple's float32 output (ours in float32 where Apple's code is absent)."""
    rounds = round_robin(samplers, repeats)
    for name, seconds in compile_seconds.items():
        results[f"{family}_{name}_compile_seconds"] = seconds
    reference = "apple_float32" if "apple_float32" in samplers else "float32"
    results[f"{family}_deviations_from"] = reference
    for name in samplers:
        results[f"{family}_{name}_seconds"] = statistics.median(rounds.wall[name])
        if name != reference:
            record_speedup(results, f"{family}_{name}_speedup_over_{reference}", rounds, name, reference)
            deviation = (rounds.results[name] - rounds.results[reference]).abs().max()
            results[f"{family}_{name}_max_abs_deviation"] = float(deviation)
    if reference != "float32":
        for name in ("bf16", "int8", "int4", "float32_compiled", "bf16_compiled", "int8_compiled"):
            record_speedup(results, f"{family}_{name}_speedup_over_float32", rounds, name, "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="afhq")
    parser.add_argument("--families", default="tarflow,starflow", help="comma-separated: tarflow, starflow")
    parser.add_argument("--blocks", type=int, default=1, help="TarFlow blocks of 1024 tokens (released: 8)")
    parser.add_argument("--ml-tarflow", type=Path, help="checkout of apple/ml-tarflow (its code is timed too)")
    parser.add_argument("--ml-starflow", type=Path, help="checkout of apple/ml-starflow (its code is timed too)")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile's mode")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (even: each pair first in half)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    families = [family.strip() for family in args.families.split(",")]
    if not families or not set(families) <= set(GUIDANCE_SCALE):
        raise SystemExit(f"--families {args.families!r}: give some of {', '.join(GUIDANCE_SCALE)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Results(preset=args.preset, threads=torch.get_num_threads(), tarflow_blocks=args.blocks)
    with torch.no_grad():
        for family in families:
            build = tarflow_samplers if family == "tarflow" else starflow_samplers
            measure(family, *build(args), args.repeats, results)
    return report(results, args.json)


if __name__ == "__main__":
    main()
