"""The least time one image of the released STARFlow can take on this machine: what each sampler must read and
compute, divided by what this machine reads and multiplies per second, measured here in the same run.

    python -m benchmarks.image_time_bound --threads 2 --json benchmarks/results/image_time_bound.json
    python -m benchmarks.image_time_bound --width 64 --deep-layers 2 --image-size 64    # seconds (the CI test)

Measured: a streaming read (the best of several sums over 400 MB: the memory bandwidth a decoding step can get at
best) and a large matrix product (the best of several; float32, and bf16 where the CPU multiplies bf16 natively:
the faster counts), the rate any full-width pass (a parallel sampler's, the denoising step's) can get at best.

Counted, from the model's own linear layers (built on the meta device: no memory): for each block, the bytes of its
weights in each format (bf16 2 bytes a weight, int8 1, int4 half; scales left out) and its products' floating-point
operations. The floors, each a lower bound (every figure rounded in the bound's favour, the text encoder and the VAE
left out):

- a block decoded exactly reads every weight of the block once per decoding step (1023 steps at 1024 tokens), and
  computes each token's row in both guidance branches once: the larger of the read time and the compute time;
- any sampler computes each token's row of each block at least once (a parallel sampler recomputes them pass after
  pass): the compute time of one pass of all tokens;
- the denoising step is a forward pass of the whole flow over one image's tokens (the deep block's text prefix
  included) and a backward pass for the input's gradient, at least as many products again.

The settings of `benchmarks.starflow_full_size`: the exact sampler (every block exact), the shallow-block Jacobi
(the deep block exact, the shallow ones parallel: counted at their compute floor), and any sampler at all. Each is
set against issue 24's goals for one image: 6 minutes with bf16 weights and 4 with int8.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.products import half_products_native

from .stage_memory import machine
from .starflow_full_size import RELEASED_WIDTH, Layout, layout_yaml, our_config, released_yaml_text
from .timing import best_seconds, report

BYTES_PER_WEIGHT = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}
GOAL_SECONDS = {"bf16": 6 * 60, "int8": 4 * 60}  # issue 24: one image end to end
GUIDANCE_BRANCHES = 2
PROBE_BYTES = 400_000_000  # more than any CPU's last-level cache
PRODUCT_ROWS = 2048  # a guided pass over 1024 tokens


def linear_weights_per_block(model: StarFlowModel) -> list[int]:
    """The number of linear weights in each block."""
    return [
        sum(module.weight.numel() for module in block.modules() if isinstance(module, nn.Linear))
        for block in model.blocks
    ]


def streaming_read_bytes_per_second(repeats: int) -> float:
    probe = torch.ones(PROBE_BYTES // 4)
    probe.sum()
    return PROBE_BYTES / best_seconds(probe.sum, repeats)


def product_flops_per_second(width: int, repeats: int) -> dict[str, float]:
    """The rate of a (2048, width) x (width, width) product per dtype: float32, and bf16 where it is native."""
    dtypes = [torch.float32] + [torch.bfloat16] * half_products_native(torch.bfloat16)
    rates = {}
    for dtype in dtypes:
        rows, weight = torch.randn(PRODUCT_ROWS, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
        product = functools.partial(torch.mm, rows, weight)
        product()
        rates[str(dtype).removeprefix("torch.")] = 2 * PRODUCT_ROWS * width * width / best_seconds(product, repeats)
    return rates


def floors(
    weights: list[int], deep: int, tokens: int, text_tokens: int, bytes_per_second: float, flops_per_second: float
) -> dict[str, Any]:
    """Seconds per image at least, per weight format and sampler setting (see the module's text)."""
    steps, rows = tokens - 1, GUIDANCE_BRANCHES * tokens
    compute = [2 * count * rows / flops_per_second for count in weights]
    denoise_rows = [tokens + (text_tokens if i == deep else 0) for i in range(len(weights))]
    denoise = sum(2 * 2 * count * n / flops_per_second for count, n in zip(weights, denoise_rows, strict=True))
    results: dict[str, Any] = {"denoise_floor_seconds": denoise, "any_sampler_floor_seconds": sum(compute) + denoise}
    for name, size in BYTES_PER_WEIGHT.items():
        read = [steps * count * size / bytes_per_second for count in weights]
        exact = [max(r, c) for r, c in zip(read, compute, strict=True)]
        shallow_jacobi = exact[deep] + sum(c for i, c in enumerate(compute) if i != deep)
        results[f"{name}_deep_block_read_floor_seconds"] = read[deep]
        results[f"{name}_exact_floor_seconds"] = sum(exact) + denoise
        results[f"{name}_shallow_jacobi_floor_seconds"] = shallow_jacobi + denoise
    for name, limit in GOAL_SECONDS.items():
        best = min(results[f"{name}_exact_floor_seconds"], results[f"{name}_shallow_jacobi_floor_seconds"])
        verdict = "out of reach (the floor is above the goal)" if best > limit else "not ruled out"
        results[f"goal_{name}_image_minutes"] = f"{limit / 60:g} against a floor of {best / 60:.1f}: {verdict}"
    return results


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=RELEASED_WIDTH, help="the flow's width (released: 3072)")
    parser.add_argument("--deep-layers", type=int, default=24, help="layers of the deep block (released: 24)")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (released: 256)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each rate (the best counts)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    for flag, value, step in (("--width", args.width, 64), ("--image-size", args.image_size, 8),
                              ("--deep-layers", args.deep_layers, 1), ("--repeats", args.repeats, 1)):  # fmt: skip
        if value < step or value % step:
            parser.error(f"{flag} must be a positive multiple of {step}, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = Layout(args.width, args.deep_layers, args.image_size)
    config = layout_config(layout)
    with torch.device("meta"):
        model = StarFlowModel(config)
    weights = linear_weights_per_block(model)
    deep = max(range(len(weights)), key=weights.__getitem__)
    bandwidth = streaming_read_bytes_per_second(args.repeats)
    rates = product_flops_per_second(args.width, args.repeats)
    results: dict[str, Any] = {
        "layout": layout.description,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "linear_weights": sum(weights),
        "tokens": config.num_patches,
        "streaming_read_gb_per_s": bandwidth / 1e9,
        **{f"{dtype}_product_gflops": rate / 1e9 for dtype, rate in rates.items()},
    }
    floor_seconds = floors(weights, deep, config.num_patches, config.max_text_length, bandwidth, max(rates.values()))
    return report(results | floor_seconds, args.json)


def layout_config(layout: Layout) -> StarFlowConfig:
    """Our configuration of the layout, read from the released yaml's values as `starflow_full_size` builds it."""
    with tempfile.TemporaryDirectory() as folder:
        yaml = Path(folder) / "layout.yaml"
        yaml.write_text(layout_yaml(released_yaml_text(None), layout))
        return our_config(yaml, layout.t5()["d_model"])


if __name__ == "__main__":
    main()
