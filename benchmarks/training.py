"""Training-side speed: forward + backward throughput and peak memory of our model against Apple's original
`transformer_flow.Model`, same configuration, same weights, same batch.

    python benchmarks/training.py --ml-tarflow /path/to/ml-tarflow
    python benchmarks/training.py --ml-tarflow /path/to/ml-tarflow --device cuda --dtype bfloat16

Each implementation runs in its own subprocess so that peak memory (max RSS on CPU, the allocator's peak on
GPU) is its own. Apple's code is imported from the given checkout at run time, never copied.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sampling import PRESETS, build_apple_model, load_apple_module

from tarflow_hf import TarFlowConfig, TarFlowModel


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TarFlowModel(TarFlowConfig(num_classes=args.num_classes, **PRESETS[args.preset]))
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    cfg = model.config
    images = torch.rand(args.batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    labels = torch.arange(args.batch_size, device=device) % cfg.num_classes if cfg.num_classes else None
    if args.impl == "ours":
        net = model.to(device).train()

        def loss_fn():
            return net(images, labels).loss
    else:
        apple = build_apple_model(load_apple_module(args.ml_tarflow), model.to(device)).train()
        del model

        def loss_fn():
            z, _, logdets = apple(images, labels)
            return apple.get_loss(z, logdets)

    def autocast():
        if args.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, args.dtype))

    def step() -> float:
        with autocast():
            loss = loss_fn()
        loss.backward()
        return loss.item()

    loss = step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": args.batch_size / statistics.median(times), "peak_mib": peak_mib, "loss": loss}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml-tarflow", type=Path, required=True, help="checkout of apple/ml-tarflow")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", choices=["ours", "original"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.impl:  # child process: measure one implementation, print JSON
        print(json.dumps(measure(args)))
        return {}
    results = {}
    for impl in ("original", "ours"):
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--impl", impl]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(output.strip().splitlines()[-1])
    summary = {
        "preset": args.preset,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "original_images_per_s": results["original"]["images_per_s"],
        "ours_images_per_s": results["ours"]["images_per_s"],
        "speedup": results["ours"]["images_per_s"] / results["original"]["images_per_s"],
        "original_peak_mib": results["original"]["peak_mib"],
        "ours_peak_mib": results["ours"]["peak_mib"],
        "loss_difference": abs(results["ours"]["loss"] - results["original"]["loss"]),
    }
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return summary


if __name__ == "__main__":
    main()
