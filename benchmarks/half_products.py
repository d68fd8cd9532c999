"""Half-precision weights on a CPU without half-precision instructions (AVX2 only: no AVX-512 BF16, no AMX), where
ATen multiplies bf16 matrices in a scalar loop. Our layers keep ATen's bf16 product for a decoding step's few rows
and multiply in float32 past `products.NATIVE_HALF_MAX_ROWS` rows and in every backward (the "float32 route"); this
times that against ATen's bf16 kernels everywhere (the "bf16 route", what the layers did before) and float32
weights, in one run:

    python -m benchmarks.half_products --threads 2 --repeats 2 --json half_products.json
    python -m benchmarks.half_products --width 64 --preset tiny --repeats 1      # seconds (the CI test)

- products: one `width` x 4`width` layer (an MLP's first layer; 3072 is the released STARFlow's width) at a decoding
  step's rows (2), a text prefix's (160) and the denoising pass's (1152 at 1024 latent tokens), and the gradient's
  product with the weight, on 32 rows (ATen's bf16 kernel takes minutes for more);
- a model: STARFlow's mid configuration (`benchmarks.sampling_starflow`, `--preset`) with bf16 weights, one image:
  the exact sampler with guidance (decoding steps: both routes should take the same time) and the score-denoising
  step (a forward and a backward over every position).

On a CPU with half-precision instructions the library keeps ATen's kernels (the float32 route is never taken); the
benchmark still times both routes there, by setting what `products.half_products_native` answers.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tarflow_hf import StarFlowConfig, products
from tarflow_hf.products import half_linear_in_float32
from tarflow_hf.samplers import SequentialSampler

from .sampling_starflow import PRESETS, random_model
from .timing import Results, record_speedup, report, round_robin

ROWS = {"decoding": 2, "text_prefix": 160, "denoising": 1152}
GRADIENT_ROWS = 32
GUIDANCE_SCALE = 4.6  # Apple's cfg 3.6


@contextlib.contextmanager
def route(native: bool) -> Iterator[None]:
    """Our layers as on a CPU with (`native`) or without half-precision instructions."""
    answer = products._HALF_INSTRUCTIONS
    products._HALF_INSTRUCTIONS = dict.fromkeys(products.HALF_DTYPES, native)
    try:
        yield
    finally:
        products._HALF_INSTRUCTIONS = answer


def in_route(native: bool, work: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with route(native):
            return work()

    return run


def time_products(args: argparse.Namespace, results: Results) -> None:
    """One layer's product at each row count, and the gradient's product with the weight."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4 * args.width, args.width, generator=generator) * args.width**-0.5
    half = weight.bfloat16()
    for name, rows in ROWS.items():
        x = torch.randn(rows, args.width, generator=generator)
        work = {
            "float32": lambda x=x: F.linear(x, weight),
            "bf16_aten": lambda x=x: F.linear(x.bfloat16(), half),
            "bf16_ours": in_route(False, lambda x=x: half_linear_in_float32(x.bfloat16(), half, None)),
        }
        rounds = round_robin(work, args.repeats)
        results[f"product_{name}_{rows}_rows_float32_ms"] = 1e3 * min(rounds.wall["float32"])
        record_speedup(results, f"product_{name}_speedup_over_aten", rounds, "bf16_ours", "bf16_aten")
        record_speedup(results, f"product_{name}_speedup_over_float32", rounds, "bf16_ours", "float32")
    upstream = torch.randn(GRADIENT_ROWS, 4 * args.width, generator=generator).bfloat16()
    work = {"bf16_aten": lambda: upstream @ half, "bf16_ours": lambda: (upstream.float() @ half.float()).bfloat16()}
    rounds = round_robin(work, args.repeats)
    results["gradient_product_aten_seconds"] = min(rounds.wall["bf16_aten"])
    record_speedup(results, "gradient_product_speedup_over_aten", rounds, "bf16_ours", "bf16_aten")


def time_model(args: argparse.Namespace, results: Results) -> None:
    """The exact sampler and the denoising step of a bf16 STARFlow, both routes, and float32 weights."""
    full = random_model(StarFlowConfig(**PRESETS[args.preset]))
    half = random_model(StarFlowConfig(**PRESETS[args.preset])).to(torch.bfloat16)
    config = full.config
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(1, config.max_text_length, config.text_hidden_size, generator=generator)
    negative = torch.zeros_like(text)

    def sample(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model.inverse(noise, text, negative, GUIDANCE_SCALE, sampler=SequentialSampler())

    def denoise(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model.denoise(noise, text)

    for name, work in (("sampling", sample), ("denoising", denoise)):
        rounds = round_robin(
            {"float32": work(full), "bf16_aten": in_route(True, work(half)), "bf16_ours": in_route(False, work(half))},
            args.repeats,
        )
        for variant in ("float32", "bf16_aten", "bf16_ours"):
            results[f"{name}_{variant}_seconds"] = min(rounds.wall[variant])
        record_speedup(results, f"{name}_speedup_over_aten", rounds, "bf16_ours", "bf16_aten")
        record_speedup(results, f"{name}_speedup_over_float32", rounds, "bf16_ours", "float32")
        deviation = (rounds.results["bf16_ours"].float() - rounds.results["bf16_aten"].float()).abs().max().item()
        results[f"{name}_ours_max_abs_deviation_from_aten"] = deviation


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=3072, help="the timed layer's width (the products)")
    parser.add_argument("--preset", default="cpu-mid", choices=sorted(PRESETS), help="the STARFlow model timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for flag, value in (("--width", args.width), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} must be a positive whole number, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Results()
    results["bf16_instructions"] = products.half_products_native(torch.bfloat16)
    results["threads"] = torch.get_num_threads()
    time_products(args, results)
    time_model(args, results)
    return report(results, args.json)


if __name__ == "__main__":
    main()
