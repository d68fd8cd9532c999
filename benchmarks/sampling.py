"""Sampling speed: our exact sampler, our Jacobi sampler and (optionally) Apple's original `Model.reverse`,
all on the same weights and the same noise, in one run.

    python benchmarks/sampling.py                                   # ours only
    python benchmarks/sampling.py --ml-tarflow /path/to/ml-tarflow  # plus Apple's code, imported at run time
    python benchmarks/sampling.py --preset imagenet64 --device cuda --dtype bfloat16 --ml-tarflow ...
    python benchmarks/sampling.py --model src/tarflow_hf/bundled/tarflow-mnist --guidance-scale 3 --newton
    python benchmarks/sampling.py --family starflow --ml-starflow /path/to/ml-starflow  # STARFlow, against Apple's

Apple's code is never copied: `--ml-tarflow` points at a checkout of apple/ml-tarflow whose `transformer_flow.py`
is imported from there. The weights go to it through our reverse conversion (`hf_to_apple_state_dict`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tarflow_hf import TarFlowConfig, TarFlowModel
from tarflow_hf.convert import hf_to_apple_state_dict
from tarflow_hf.fileio import write_json_atomic

sys.path.insert(0, str(Path(__file__).parent))
import sampling_starflow  # the STARFlow mode, beside this file
from apple_model import shared_model_arguments

PRESETS = {
    # The mid-size CPU configuration.
    "cpu-mid": dict(image_size=64, num_channels=3, patch_size=4, hidden_size=256, num_blocks=4, layers_per_block=2),
    # Apple's ImageNet-64 class-conditional model.
    "imagenet64": dict(image_size=64, num_channels=3, patch_size=2, hidden_size=768, num_blocks=8, layers_per_block=8),
    "tiny": dict(image_size=16, num_channels=1, patch_size=2, hidden_size=64, num_blocks=2, layers_per_block=1),
}


def load_apple_module(checkout: Path):
    path = checkout / "transformer_flow.py"
    if not path.is_file():
        raise SystemExit(f"--ml-tarflow {checkout}: no transformer_flow.py (expected a checkout of apple/ml-tarflow)")
    spec = importlib.util.spec_from_file_location("ml_tarflow_transformer_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_apple_model(module, model: TarFlowModel):
    cfg = model.config
    apple = module.Model(
        **shared_model_arguments(cfg, cfg.num_channels, cfg.image_size),
        layers_per_block=cfg.layers_per_block,
        nvp=cfg.nvp,
        num_classes=cfg.num_classes,
    )
    apple.load_state_dict(hf_to_apple_state_dict(model.state_dict()))
    return apple.to(model.device).eval()


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median wall time over `repeats` runs after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def print_profile(fn: Callable[[], torch.Tensor]) -> None:
    """Share of one run's operator time: matrix products, attention, the rest."""
    with torch.profiler.profile() as profile:
        fn()
    events = [event for event in profile.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events)
    groups = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm"), "attention": ("attention",)}
    shares = {name: 0.0 for name in [*groups, "everything else"]}
    for event in events:
        group = next((name for name, keys in groups.items() if any(key in event.key for key in keys)), None)
        shares[group or "everything else"] += event.self_cpu_time_total / total
    print("exact sampler, share of operator time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["tarflow", "starflow"], default="tarflow")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mid")
    parser.add_argument("--batch-size", type=int, help="default: 8 (TarFlow), 4 (STARFlow)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--guidance-scale", type=float, help="diffusers convention, Apple's g = w - 1; default 2 (TarFlow), 4.6"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jacobi-tolerance", type=float, default=1e-4)
    parser.add_argument("--jacobi-window", type=int, help="patches per Jacobi window (default: all)")
    parser.add_argument(
        "--newton", action="store_true", help="also the quasi-Newton sampler (2 * patch_dim + 1 times the compute)"
    )
    parser.add_argument("--model", help="a pipeline or model folder to benchmark instead of random weights")
    parser.add_argument("--ml-tarflow", type=Path, help="checkout of apple/ml-tarflow to compare against")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument(
        "--noise-scale", type=float, help="prior noise scale (default: 1 with --model, 0.5 for random weights)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="also print where one exact sampling run spends time")
    sampling_starflow.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    starflow = args.family == "starflow"
    args.batch_size = args.batch_size or (4 if starflow else 8)
    args.guidance_scale = args.guidance_scale or (4.6 if starflow else 2.0)
    if starflow:
        return report(sampling_starflow.run(args), args.json)

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model:
        folder = Path(args.model)
        subfolder = "transformer" if (folder / "transformer").is_dir() else ""
        model = TarFlowModel.from_pretrained(folder, subfolder=subfolder)
    else:
        model = TarFlowModel(TarFlowConfig(num_classes=args.num_classes, **PRESETS[args.preset]))
        with torch.no_grad():  # Apple starts proj_out at zero; random weights make every path do real work.
            for block in model.blocks:
                block.proj_out.weight.normal_(0.0, 0.02)
    model = model.to(device).eval()
    cfg = model.config
    # Random weights are not trained to map N(0, 1) back into range: halve the noise so samples stay finite.
    noise_scale = args.noise_scale or (1.0 if args.model else 0.5)
    noise = torch.randn(args.batch_size, cfg.num_patches, cfg.patch_dim, device=device) * noise_scale
    labels = torch.arange(args.batch_size, device=device) % cfg.num_classes if cfg.num_classes else None
    guidance = args.guidance_scale if cfg.num_classes else 1.0

    def autocast():
        if args.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, args.dtype))

    def ours_exact():
        with autocast():
            return model.inverse(noise, labels, guidance_scale=guidance)

    jacobi_stats = {}

    def ours_jacobi():
        with autocast():
            images, stats = model.inverse(
                noise,
                labels,
                guidance_scale=guidance,
                sampler="jacobi",
                jacobi_tolerance=args.jacobi_tolerance,
                jacobi_window=args.jacobi_window,
                return_stats=True,
            )
        jacobi_stats["stats"] = stats
        return images

    results: dict = {
        "preset": args.model or args.preset,
        "jacobi_tolerance": args.jacobi_tolerance,
        "jacobi_window": args.jacobi_window or "all",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "guidance_scale": guidance,
        "threads": torch.get_num_threads(),
        "sequential_passes_exact": cfg.num_blocks * (cfg.num_patches - 1),
    }
    exact_time, exact = timed(ours_exact, args.repeats, device)
    results["exact_images_per_s"] = args.batch_size / exact_time
    with sampling_starflow.plain_linear_layers():
        unpacked_time, _ = timed(ours_exact, args.repeats, device)
    results["exact_unpacked_images_per_s"] = args.batch_size / unpacked_time
    results["weight_packing_speedup"] = unpacked_time / exact_time
    jacobi_time, jacobi = timed(ours_jacobi, args.repeats, device)
    results["jacobi_images_per_s"] = args.batch_size / jacobi_time
    stats = jacobi_stats["stats"]
    results["jacobi_sequential_passes"] = stats.transformer_passes
    results["jacobi_fewer_passes"] = results["sequential_passes_exact"] / stats.transformer_passes
    results["jacobi_passes_per_block"] = stats.iterations
    # Compute: transformer rows per image and branch, relative to the exact sampler's one row per patch.
    results["jacobi_rows_vs_exact"] = sum(stats.rows_computed) / results["sequential_passes_exact"]
    results["jacobi_rows_per_patch_per_block"] = [
        round(rows / (cfg.num_patches - 1), 1) for rows in stats.rows_computed
    ]
    results["jacobi_max_abs_deviation_01"] = ((jacobi - exact).abs().max() / 2).item()  # on the [0, 1] scale
    results["jacobi_speedup_over_exact"] = exact_time / jacobi_time

    if args.profile:
        print_profile(ours_exact)

    if args.newton:
        newton_stats = {}

        def ours_newton():
            with autocast():
                images, newton_stats["stats"] = model.inverse(
                    noise,
                    labels,
                    guidance_scale=guidance,
                    sampler="newton",
                    jacobi_tolerance=args.jacobi_tolerance,
                    return_stats=True,
                )
            return images

        newton_time, newton = timed(ours_newton, args.repeats, device)
        stats = newton_stats["stats"]
        results["newton_images_per_s"] = args.batch_size / newton_time
        results["newton_sequential_passes"] = stats.transformer_passes
        results["newton_fewer_passes"] = results["sequential_passes_exact"] / stats.transformer_passes
        results["newton_passes_per_block"] = stats.iterations
        results["newton_rows_vs_exact"] = sum(stats.rows_computed) / results["sequential_passes_exact"]
        results["newton_max_abs_deviation_01"] = ((newton - exact).abs().max() / 2).item()
        results["newton_speedup_over_exact"] = exact_time / newton_time

    if args.ml_tarflow:
        module = load_apple_module(args.ml_tarflow)
        apple = build_apple_model(module, model)
        apple_labels = labels if labels is not None else None

        def original():
            with torch.no_grad(), autocast():
                return apple.reverse(noise, apple_labels, guidance=guidance - 1.0)

        apple_time, apple_images = timed(original, args.repeats, device)
        results["original_images_per_s"] = args.batch_size / apple_time
        results["exact_speedup_over_original"] = apple_time / exact_time
        results["jacobi_speedup_over_original"] = apple_time / jacobi_time
        results["exact_max_abs_deviation_from_original_01"] = ((exact - apple_images).abs().max() / 2).item()

    return report(results, args.json)


def report(results: dict, json_path: Path | None) -> dict:
    width = max(map(len, results))
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if json_path:
        write_json_atomic(json_path, results)  # never a half-written results file
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
