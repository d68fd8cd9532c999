"""Training-side speed: forward + backward throughput and peak memory of our model against Apple's original
`transformer_flow.Model`, same configuration, same weights, same batch. From the repository root:

    python -m benchmarks.training --ml-tarflow /path/to/ml-tarflow
    python -m benchmarks.training --ml-tarflow /path/to/ml-tarflow --device cuda --dtype bfloat16

Speed: both implementations in this process, their training steps timed round-robin (`timing.round_robin`), so
each round's pair runs back to back, each first in half of the rounds; the speed-up is the median of the rounds'
ratios. Peak memory (peak resident memory on CPU, `benchmarks.memory`; the allocator's peak on GPU): each
implementation in a process of its own, one warm-up step and one measured step, so that the peak is its own.
Apple's code is loaded from the given checkout at run time, never copied.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tarflow_hf import TarFlowConfig, TarFlowModel

from .apple_model import build_apple_tarflow, load_ml_tarflow
from .memory import peak_resident_mib
from .sampling import PRESETS
from .timing import Results, record_speedup, report, round_robin, synchronizer

IMPLEMENTATIONS = ("original", "ours")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml-tarflow", type=Path, required=True, help="checkout of apple/ml-tarflow")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (the memory children too)")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds (even: each of a pair first in half)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # a memory-measuring child
    return parser


def training_steps(args: argparse.Namespace, implementations: tuple[str, ...]) -> dict[str, Callable[[], float]]:
    """One training step (forward, loss, backward; gradients cleared first, as an optimizer's loop does) per
    implementation, all on the same random weights and the same batch. -> the loss of each step, by name"""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TarFlowModel(TarFlowConfig(num_classes=args.num_classes, **PRESETS[args.preset]))
    with torch.no_grad():  # Apple starts proj_out at zero; random weights make every path do real work.
        for block in model.blocks:
            block.proj_out.weight.normal_(0.0, 0.02)
    config = model.config
    images = torch.rand(args.batch_size, config.num_channels, config.image_size, config.image_size, device=device)
    images = images * 2 - 1
    labels = torch.arange(args.batch_size, device=device) % config.num_classes if config.num_classes else None
    model = model.to(device)
    networks: dict[str, torch.nn.Module] = {}
    losses: dict[str, Callable[[], torch.Tensor]] = {}
    if "original" in implementations:
        apple = networks["original"] = build_apple_tarflow(load_ml_tarflow(args.ml_tarflow), model).train()

        def apple_loss() -> torch.Tensor:
            z, _, logdets = apple(images, labels)
            return apple.get_loss(z, logdets)

        losses["original"] = apple_loss
    if "ours" in implementations:
        ours = networks["ours"] = model.train()
        losses["ours"] = lambda: ours(images, labels).loss

    def step(name: str) -> Callable[[], float]:
        def run() -> float:
            networks[name].zero_grad(set_to_none=True)
            with autocast(args.dtype, device):
                loss = losses[name]()
            loss.backward()
            return loss.item()

        return run

    return {name: step(name) for name in losses}


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def peak_memory_mib(args: argparse.Namespace) -> float:
    """In a child process: the peak memory of one implementation's warm-up step and one more."""
    step = training_steps(args, (args.impl,))[args.impl]
    step()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_resident_mib()


def peak_memory_in_child(argv: list[str], impl: str) -> float:
    """`peak_memory_mib` in a fresh process: this module run again (`python -m benchmarks.training ... --impl
    IMPL`) with this process's working directory and environment, so that it imports what this one imported."""
    command = [sys.executable, "-m", __spec__.name, *argv, "--impl", impl]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare(args: argparse.Namespace, argv: list[str]) -> Results:
    results = Results()
    results["preset"] = args.preset
    results["device"] = args.device if args.device == "cpu" else torch.cuda.get_device_name()
    results["dtype"] = args.dtype
    results["batch_size"] = args.batch_size
    results["threads"] = torch.get_num_threads()
    results["rounds"] = f"{args.repeats} (round-robin: speeds are medians, the speed-up the median of paired ratios)"
    steps = training_steps(args, IMPLEMENTATIONS)
    rounds = round_robin(steps, args.repeats, synchronizer(torch.device(args.device)))
    for name in IMPLEMENTATIONS:
        results[f"{name}_images_per_s"] = args.batch_size / statistics.median(rounds.wall[name])
    record_speedup(results, "speedup", rounds, "ours", "original")
    results["loss_difference"] = abs(rounds.results["ours"] - rounds.results["original"])
    for name in IMPLEMENTATIONS:
        results[f"{name}_peak_mib"] = peak_memory_in_child(argv, name)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl:  # child process: one implementation's peak memory, as JSON (the parent writes `--json`)
        print(json.dumps(peak_memory_mib(args)))
        return {}
    return report(compare(args, argv), args.json)


if __name__ == "__main__":
    main()
