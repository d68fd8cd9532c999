"""Sampling speed: our exact sampler, our Jacobi sampler, optionally the quasi-Newton one and Apple's original
`Model.reverse`, all on the same weights and the same noise, in one run. From the repository root:

    python -m benchmarks.sampling                                   # ours only
    python -m benchmarks.sampling --ml-tarflow /path/to/ml-tarflow  # plus Apple's code, loaded at run time
    python -m benchmarks.sampling --preset imagenet64 --device cuda --dtype bfloat16 --ml-tarflow ...
    python -m benchmarks.sampling --model bundled --batch-size 20 --guidance-scale 3 --newton
    python -m benchmarks.sampling --family starflow --ml-starflow /path/to/ml-starflow  # STARFlow, against Apple's

The samplers are timed round-robin (`timing.round_robin`): each compared pair (ours next to Apple's, packed next
to plain weights) is timed back to back in every round, each first in half of the rounds; speeds are medians over
the rounds, speed-ups medians of the rounds' paired ratios. The quasi-Newton sampler, about 100x slower than the
exact one on a CPU, is timed in one run of its own after the rounds.

Apple's code is never copied: `--ml-tarflow` points at a checkout of apple/ml-tarflow whose `transformer_flow.py`
is loaded from there. The weights go to it through our reverse conversion (`convert.hf_to_apple_state_dict`).
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

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.registry import TARFLOW, family_of, resolve_model_name
from tarflow_hf.samplers import FlowSampler, JacobiSampler, NewtonSampler, SamplingStats, SequentialSampler

from . import sampling_starflow
from .apple_model import build_apple_tarflow, load_ml_tarflow
from .timing import Results, Rounds, plain_linear_layers, record_speedup, report, round_robin, synchronizer

PRESETS = {
    # The mid-size CPU configuration.
    "cpu-mid": dict(image_size=64, num_channels=3, patch_size=4, hidden_size=256, num_blocks=4, layers_per_block=2),
    # Apple's ImageNet-64 class-conditional model.
    "imagenet64": dict(image_size=64, num_channels=3, patch_size=2, hidden_size=768, num_blocks=8, layers_per_block=8),
    "tiny": dict(image_size=16, num_channels=1, patch_size=2, hidden_size=64, num_blocks=2, layers_per_block=1),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["tarflow", "starflow"], default="tarflow")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu-mid", help="model size (STARFlow: cpu-mid or tiny)"
    )
    parser.add_argument("--batch-size", type=int, help="default: 8 (TarFlow), 4 (STARFlow)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--guidance-scale", type=float, help="diffusers convention, Apple's g = w - 1; default 2 (TarFlow), 4.6"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (even: each of a pair first in half)")
    parser.add_argument("--jacobi-tolerance", type=float, default=1e-4, help="of the JacobiSampler (and Newton)")
    parser.add_argument("--jacobi-window", type=int, help="patches per Jacobi window (default: all)")
    parser.add_argument(
        "--newton", action="store_true", help="also the quasi-Newton sampler (2 * patch_dim + 1 times the compute)"
    )
    parser.add_argument("--model", help="a TarFlow pipeline or model folder, or 'bundled', instead of random weights")
    parser.add_argument("--ml-tarflow", type=Path, help="checkout of apple/ml-tarflow to compare against")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument(
        "--noise-scale", type=float, help="prior noise scale (default: 1 with --model, 0.5 for random weights)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="also print where one exact sampling run spends time")
    sampling_starflow.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    starflow = args.family == "starflow"
    args.batch_size = args.batch_size or (4 if starflow else 8)
    args.guidance_scale = args.guidance_scale or (4.6 if starflow else 2.0)
    results = sampling_starflow.run(args) if starflow else run(args)
    return report(results, args.json)


def load_model(args: argparse.Namespace) -> TarFlowModel:
    """The model of `--model`, or one of `--preset`'s size with random weights where every path does real work."""
    if args.model:
        resolved = resolve_model_name(args.model)
        if family_of(resolved) is not TARFLOW:
            raise SystemExit(f"--model {args.model}: not a TarFlow model (use --family starflow for STARFlow)")
        subfolder = "transformer" if (Path(resolved) / "transformer").is_dir() else ""
        return TarFlowModel.from_pretrained(resolved, subfolder=subfolder)
    model = TarFlowModel(TarFlowConfig(num_classes=args.num_classes, **PRESETS[args.preset]))
    with torch.no_grad():  # Apple starts proj_out at zero; random weights make every path do real work.
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    return model


def print_profile(sample: Callable[[], torch.Tensor]) -> None:
    """Share of one run's operator time: matrix products, attention, the rest."""
    with torch.profiler.profile() as profile:
        sample()
    events = [event for event in profile.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events)
    groups = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "mkl"), "attention": ("attention",)}
    shares = dict.fromkeys([*groups, "everything else"], 0.0)
    for event in events:
        group = next((name for name, keys in groups.items() if any(key in event.key for key in keys)), None)
        shares[group or "everything else"] += event.self_cpu_time_total / total
    print("exact sampler, share of operator time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


class TarFlowRun:
    """One model, one batch of noise and labels, and the samplers to compare on them."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device)
        torch.manual_seed(0)  # the weights, then the noise: the same draws as every earlier version of this benchmark
        self.model = load_model(args).to(self.device).eval()
        config = self.model.config
        # Random weights are not trained to map N(0, 1) back into range: halve the noise so samples stay finite.
        noise_scale = args.noise_scale or (1.0 if args.model else 0.5)
        noise = torch.randn(args.batch_size, config.num_patches, config.patch_dim, device=self.device)
        self.noise = noise * noise_scale
        classes = config.num_classes
        self.labels = torch.arange(args.batch_size, device=self.device) % classes if classes else None
        self.guidance_scale = args.guidance_scale if classes else 1.0
        self.dtype = args.dtype
        self.stats: dict[str, SamplingStats] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    def ours(self, name: str, sampler: FlowSampler, packed: bool = True) -> Callable[[], torch.Tensor]:
        """Our `inverse` with `sampler` (packed weights or plain `addmm`); its statistics kept under `name`."""

        def sample() -> torch.Tensor:
            with self.autocast(), contextlib.nullcontext() if packed else plain_linear_layers():
                images, self.stats[name] = self.model.inverse(
                    self.noise, self.labels, guidance_scale=self.guidance_scale, sampler=sampler, return_stats=True
                )
            return images

        return sample

    def original(self, checkout: Path) -> Callable[[], torch.Tensor]:
        """Apple's `Model.reverse` on the same weights (Apple's guidance g is our guidance_scale - 1)."""
        apple = build_apple_tarflow(load_ml_tarflow(checkout), self.model)

        def sample() -> torch.Tensor:
            with torch.no_grad(), self.autocast():
                return apple.reverse(self.noise, self.labels, guidance=self.guidance_scale - 1.0)

        return sample


def run(args: argparse.Namespace) -> Results:
    """Every TarFlow sampler on the same weights and noise, timed round-robin; see the module's docstring."""
    setup = TarFlowRun(args)
    config = setup.model.config
    jacobi = JacobiSampler(tolerance=args.jacobi_tolerance, window=args.jacobi_window)
    samplers = {
        "exact_unpacked": setup.ours("exact_unpacked", SequentialSampler(), packed=False),
        "exact": setup.ours("exact", SequentialSampler()),
    }
    if args.ml_tarflow:
        samplers["original"] = setup.original(args.ml_tarflow)  # beside our exact sampler: timed back to back
    samplers["jacobi"] = setup.ours("jacobi", jacobi)

    results = Results()
    results["preset"] = args.model or args.preset
    results["device"] = str(setup.device) if setup.device.type != "cuda" else torch.cuda.get_device_name(setup.device)
    results["dtype"] = args.dtype
    results["batch_size"] = args.batch_size
    results["guidance_scale"] = setup.guidance_scale
    results["threads"] = torch.get_num_threads()
    results["rounds"] = f"{args.repeats} (round-robin: speeds are medians, speed-ups medians of paired ratios)"
    results["jacobi_sampler"] = repr(jacobi)
    results["sequential_passes_exact"] = config.num_blocks * (config.num_patches - 1)
    rounds = round_robin(samplers, args.repeats, synchronizer(setup.device))
    images = rounds.results
    for name in samplers:
        results[f"{name}_images_per_s"] = args.batch_size / statistics.median(rounds.wall[name])
    record_speedup(results, "weight_packing_speedup", rounds, "exact", "exact_unpacked")
    record_parallel(results, "jacobi", setup.stats["jacobi"], images["jacobi"], images["exact"], config)
    record_speedup(results, "jacobi_speedup_over_exact", rounds, "jacobi", "exact")
    if args.ml_tarflow:
        record_original(results, rounds)
    if args.profile:
        print_profile(samplers["exact"])
    if args.newton:
        newton = NewtonSampler(tolerance=args.jacobi_tolerance)
        results["newton_sampler"] = repr(newton)
        sample = setup.ours("newton", newton)
        start = time.perf_counter()
        newton_images = sample()
        seconds = time.perf_counter() - start
        results["newton_images_per_s"] = args.batch_size / seconds
        record_parallel(results, "newton", setup.stats["newton"], newton_images, images["exact"], config)
        results["newton_speedup_over_exact"] = statistics.median(rounds.wall["exact"]) / seconds
    return results


def record_parallel(
    results: Results, name: str, stats: SamplingStats, images: torch.Tensor, exact: torch.Tensor, config: Any
) -> None:
    """A parallel sampler's passes, compute and distance from the exact images."""
    exact_passes = results["sequential_passes_exact"]
    results[f"{name}_sequential_passes"] = stats.transformer_passes
    results[f"{name}_fewer_passes"] = exact_passes / stats.transformer_passes
    results[f"{name}_passes_per_block"] = stats.iterations
    # Compute: transformer rows per image and branch, relative to the exact sampler's one row per patch.
    results[f"{name}_rows_vs_exact"] = sum(stats.rows_computed) / exact_passes
    results[f"{name}_rows_per_patch_per_block"] = [
        round(rows / (config.num_patches - 1), 1) for rows in stats.rows_computed
    ]
    results[f"{name}_max_abs_deviation_01"] = ((images - exact).abs().max() / 2).item()  # on the [0, 1] scale


def record_original(results: Results, rounds: Rounds) -> None:
    """Our exact and Jacobi samplers against Apple's `Model.reverse`."""
    record_speedup(results, "exact_speedup_over_original", rounds, "exact", "original")
    record_speedup(results, "jacobi_speedup_over_original", rounds, "jacobi", "original")
    deviation = (rounds.results["exact"] - rounds.results["original"]).abs().max() / 2
    results["exact_max_abs_deviation_from_original_01"] = deviation.item()


if __name__ == "__main__":
    main(sys.argv[1:])
