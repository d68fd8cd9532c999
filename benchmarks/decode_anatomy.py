"""Where a STARFlow decoding step's time goes on this machine, for the mid-size model of
`benchmarks.sampling --family starflow`. From the repository root:

    python -m benchmarks.decode_anatomy [--threads 2] [--compile] [--json FILE]

1. Memory bandwidth: a streaming read of 200 MB, and 8-row products streamed over 100 MB of (2048, 512) weights
   with plain `addmm` and with MKL's packed product (what `layers.WeightPacking` uses); then the packed product's
   time at 16 to 128 rows against 8 (a parallel sampler's pass over a window of tokens against a decoding step).
2. The exact sampler's time per block (deep block first, in sampling order) and per decoding step, packed and
   plain, alternated.
3. With `--compile`: `torch.compile(dynamic=True)` of each block's whole decoding step with inductor's `freezing`,
   against the eager step with packed weights, alternated (compilation timed with the first sample).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.products import weight_packing_available
from tarflow_hf.samplers import AffineBlock, BlockCondition, BlockRecord, SequentialSampler

from .sampling_starflow import MID_SIZE, random_model
from .timing import Results, best_seconds, plain_linear_layers, report

# The deep block's MLP weight shape, and enough copies of it (100 MB) to stream from memory, not the caches.
DEEP_WEIGHT_SHAPE = (2048, 512)
STREAMED_WEIGHTS = 24
# Rows of a decoding step: 4 images x 2 guidance branches.
STEP_ROWS = 8


def gigabytes_per_second(num_bytes: int, fn: Callable[[], Any], repeats: int = 3) -> float:
    return num_bytes / best_seconds(fn, repeats) / 1e9


def streamed_weights() -> list[torch.Tensor]:
    return [torch.randn(*DEEP_WEIGHT_SHAPE) for _ in range(STREAMED_WEIGHTS)]


def bandwidth(results: Results) -> None:
    """A streaming read, and 8-row products over 100 MB of weights, plain and packed."""
    data = torch.randn(50_000_000)
    results["streaming_read_gb_per_s"] = gigabytes_per_second(data.numel() * 4, data.sum)
    weights = streamed_weights()
    bias, rows = torch.zeros(DEEP_WEIGHT_SHAPE[0]), torch.randn(STEP_ROWS, DEEP_WEIGHT_SHAPE[1])
    total = sum(weight.numel() * 4 for weight in weights)

    def plain() -> None:
        for weight in weights:
            F.linear(rows, weight, bias)

    results["products_8_rows_addmm_gb_per_s"] = gigabytes_per_second(total, plain)
    if weight_packing_available():
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(weight, STEP_ROWS) for weight in weights]

        def packed_products() -> None:
            for weight, packing in zip(weights, packed, strict=True):
                torch.ops.mkl._mkl_linear(rows, packing, weight, bias, STEP_ROWS)

        results["products_8_rows_packed_gb_per_s"] = gigabytes_per_second(total, packed_products)


def row_scaling(results: Results, rows_tried: tuple[int, ...] = (8, 16, 32, 64, 128)) -> None:
    """What a parallel pass costs next to a decoding step: packed products of the deep block's MLP shape, over
    100 MB of weights, at the row counts of windows of 1, 2, 4, 8 and 16 tokens (8 rows each)."""
    if not weight_packing_available():
        return
    weights = streamed_weights()
    bias = torch.zeros(DEEP_WEIGHT_SHAPE[0])
    seconds = {}
    for rows in rows_tried:
        inputs = torch.randn(rows, DEEP_WEIGHT_SHAPE[1])
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) for weight in weights]

        def products(inputs=inputs, packed=packed, rows=rows) -> None:
            for weight, packing in zip(weights, packed, strict=True):
                torch.ops.mkl._mkl_linear(inputs, packing, weight, bias, rows)

        seconds[rows] = best_seconds(products, repeats=5)
    for rows in rows_tried[1:]:
        results[f"packed_products_{rows}_rows_time_vs_{rows_tried[0]}"] = seconds[rows] / seconds[rows_tried[0]]


class TimedSequentialSampler(SequentialSampler):
    """The exact sampler, timing each block's decoding (inside the weight packing and inference mode that
    `invert_block` opens, as the sampler runs it): `block_seconds`, in sampling order."""

    def __init__(self) -> None:
        super().__init__()
        self.block_seconds: list[float] = []

    def invert(self, block: AffineBlock, z: torch.Tensor, condition: BlockCondition) -> tuple[Any, BlockRecord]:
        start = time.perf_counter()
        inverted = super().invert(block, z, condition)
        self.block_seconds.append(time.perf_counter() - start)
        return inverted


def block_times(results: Results, model: StarFlowModel, inputs: tuple, rounds: int = 3) -> None:
    """Seconds per block of the exact sampler, packed and plain in turn; medians over rounds."""
    times: dict[str, list[list[float]]] = {"packed": [], "plain": []}
    with torch.no_grad():
        model.inverse(*inputs)  # warm-up
        for _ in range(rounds):
            for name in times:
                sampler = TimedSequentialSampler()
                with plain_linear_layers() if name == "plain" else contextlib.nullcontext():
                    model.inverse(*inputs, sampler=sampler)
                times[name].append(sampler.block_seconds)
    steps = model.config.num_patches - 1
    for name, runs in times.items():
        per_block = [statistics.median(run[i] for run in runs) for i in range(len(runs[0]))]
        results[f"exact_{name}_seconds"] = sum(per_block)
        results[f"exact_{name}_ms_per_step_per_block_deep_first"] = [round(s / steps * 1e3, 2) for s in per_block]


def compiled(results: Results, model: StarFlowModel, inputs: tuple, rounds: int = 3) -> None:
    """`torch.compile(dynamic=True)` of each block's whole decoding step (`affine_span`: every layer, the final norm,
    the affine head and guidance) with inductor's `freezing` (weights baked in, which it packs for its own CPU
    products), against the eager step with MKL-packed weights, alternated; compilation is timed with the first
    sample."""
    with torch.no_grad():
        reference = model.inverse(*inputs)
        steps = {
            block: torch.compile(block.affine_span, dynamic=True, options={"freezing": True}) for block in model.blocks
        }

        def use(compiled_steps: bool) -> None:
            for block in model.blocks:
                if compiled_steps:
                    block.affine_span = steps[block]
                else:
                    vars(block).pop("affine_span", None)  # back to the class's method

        def sample(compiled_steps: bool) -> tuple[float, torch.Tensor]:
            use(compiled_steps)
            with plain_linear_layers() if compiled_steps else contextlib.nullcontext():
                start = time.perf_counter()
                out = model.inverse(*inputs)
            return time.perf_counter() - start, out

        try:
            first, _ = sample(True)
            times = {"eager": [], "compiled": []}
            for _ in range(rounds):
                for name in times:
                    seconds, out = sample(name == "compiled")
                    times[name].append(seconds)
        finally:
            use(False)
    eager, compiled_time = statistics.median(times["eager"]), statistics.median(times["compiled"])
    results["compiled_first_sample_seconds"] = first
    results["compiled_seconds"] = compiled_time
    results["eager_packed_seconds"] = eager
    results["compiled_speedup_over_eager_packed"] = eager / compiled_time
    results["compiled_max_abs_deviation"] = (out - reference).abs().max().item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of every decoding step")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Results()
    results["threads"] = args.threads
    bandwidth(results)
    row_scaling(results)
    model = random_model(StarFlowConfig(**MID_SIZE))
    config = model.config
    generator = torch.Generator().manual_seed(1)
    batch = STEP_ROWS // 2
    noise = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(batch, config.max_text_length, config.text_hidden_size, generator=generator)
    negative = torch.zeros_like(text)
    inputs = (noise, text, negative, 4.6)  # Apple's cfg 3.6
    block_times(results, model, inputs)
    if args.compile:
        compiled(results, model, inputs)
    return report(results, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
