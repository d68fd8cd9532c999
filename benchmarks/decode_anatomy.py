"""Where a STARFlow decoding step's time goes on this machine, for the mid-size model of
`benchmarks/sampling.py --family starflow`. Prints the figures quoted in the README's Speed section and notes:

    python benchmarks/decode_anatomy.py [--threads 2] [--compile]

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
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from sampling_starflow import MID_SIZE, plain_linear_layers, random_model

from tarflow_hf import layers, sampling
from tarflow_hf.configuration_starflow import StarFlowConfig


def best_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gigabytes_per_second(num_bytes: int, fn, repeats: int = 3) -> float:
    return num_bytes / best_seconds(fn, repeats) / 1e9


def bandwidth() -> None:
    data = torch.randn(50_000_000)
    print(f"streaming read of 200 MB: {gigabytes_per_second(data.numel() * 4, data.sum):.1f} GB/s")
    weights = [torch.randn(2048, 512) for _ in range(24)]
    bias, rows = torch.zeros(2048), torch.randn(8, 512)
    total = sum(weight.numel() * 4 for weight in weights)

    def plain():
        for weight in weights:
            F.linear(rows, weight, bias)

    print(f"8-row products over 100 MB of weights, addmm: {gigabytes_per_second(total, plain):.1f} GB/s")
    if layers.weight_packing_available():
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(weight, 8) for weight in weights]

        def packed_products():
            for weight, packing in zip(weights, packed, strict=True):
                torch.ops.mkl._mkl_linear(rows, packing, weight, bias, 8)

        print(f"8-row products over 100 MB of weights, packed: {gigabytes_per_second(total, packed_products):.1f} GB/s")


def row_scaling(rows_tried: tuple[int, ...] = (8, 16, 32, 64, 128)) -> None:
    """What a parallel pass costs next to a decoding step: packed products of the deep block's MLP shape, over
    100 MB of weights, at the row counts of windows of 1, 2, 4, 8 and 16 tokens (8 rows each)."""
    if not layers.weight_packing_available():
        return
    weights = [torch.randn(2048, 512) for _ in range(24)]
    bias = torch.zeros(2048)
    seconds = {}
    for rows in rows_tried:
        inputs = torch.randn(rows, 512)
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) for weight in weights]

        def products(inputs=inputs, packed=packed, rows=rows):
            for weight, packing in zip(weights, packed, strict=True):
                torch.ops.mkl._mkl_linear(inputs, packing, weight, bias, rows)

        seconds[rows] = best_seconds(products, repeats=5)
    base = seconds[rows_tried[0]]
    shown = ", ".join(f"{rows} rows {seconds[rows] / base:.2f}x" for rows in rows_tried)
    print(f"packed products, time against {rows_tried[0]} rows: {shown}")


def block_times(model, inputs, rounds: int = 3) -> None:
    """Seconds per block of the exact sampler, packed and plain in turn; medians over rounds."""
    times: dict[str, list[list[float]]] = {"packed": [], "plain": []}
    original = sampling.sample_sequential
    current: list[float] = []

    def timed_block(block, z, condition):
        start = time.perf_counter()
        result = original(block, z, condition)
        current.append(time.perf_counter() - start)
        return result

    sampling.sample_sequential = timed_block
    try:
        with torch.no_grad():
            model.inverse(*inputs)  # warm-up
            for _ in range(rounds):
                for name in times:
                    current.clear()
                    if name == "plain":
                        with plain_linear_layers():
                            model.inverse(*inputs)
                    else:
                        model.inverse(*inputs)
                    times[name].append(list(current))
    finally:
        sampling.sample_sequential = original
    steps = model.config.num_patches - 1
    for name, runs in times.items():
        per_block = [statistics.median(run[i] for run in runs) for i in range(len(runs[0]))]
        shown = ", ".join(f"{seconds:.2f} s ({seconds / steps * 1e3:.1f} ms/step)" for seconds in per_block)
        print(f"exact sampler, {name}: total {sum(per_block):.2f} s; per block, deep first: {shown}")


def compiled(model, inputs, rounds: int = 3) -> None:
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

        def sample(compiled_steps: bool):
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
    print(
        f"compiled decoding steps (freezing, inductor's packing): first sample {first:.1f} s, then {compiled_time:.2f} "
        f"s against eager with MKL packing {eager:.2f} s ({eager / compiled_time:.2f}x), max deviation "
        f"{(out - reference).abs().max().item():.1e}"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of every decoding step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bandwidth()
    row_scaling()
    model = random_model(StarFlowConfig(**MID_SIZE))
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 4, 16, 16, generator=generator)
    text = torch.randn(4, 32, 128, generator=generator)
    negative = torch.zeros_like(text)
    inputs = (noise, text, negative, 4.6)
    block_times(model, inputs)
    if args.compile:
        compiled(model, inputs)


if __name__ == "__main__":
    main(sys.argv[1:])
