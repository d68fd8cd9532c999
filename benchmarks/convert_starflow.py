"""Converting a STARFlow checkpoint with the released 3B layout: time and peak memory against the file size.

    python -m benchmarks.convert_starflow                    # the full released layout (a 15.4 GB file)
    python -m benchmarks.convert_starflow --deep-layers 4     # the same widths, a shallower deep block

A random checkpoint in Apple's format (width 3072, heads of 64, 5 shallow blocks of 2 layers, a deep block of
`--deep-layers` layers (24 released), 128 text tokens of width 2048, Apple's deprecated buffers included) is written
with `torch.save`, then converted by the command line in a child process (`tarflow-hf convert --transformer-only`)
and back (`--reverse`), each timed, with that child's own peak resident memory (`benchmarks.memory`). The converter
memory-maps the file and assigns its tensors to a model built on the meta device, so the peak should stay near one
copy of the weights. Resident memory counts the pages of the memory-mapped file that the child has read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.convert_starflow import deprecated_buffers, expected_apple_shapes

from .memory import run_module_measuring_peak
from .timing import Results, report


def random_checkpoint(config: StarFlowConfig, path: Path) -> int:
    """Write Apple's state dict with random weights (deprecated buffers as Apple saves them); return its bytes."""
    buffers = deprecated_buffers(config)
    state = {}
    for key, shape in expected_apple_shapes(config).items():
        state[key] = buffers[key] if key in buffers else torch.empty(shape).normal_(0.0, 0.02)
    torch.save(state, path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deep-layers", type=int, default=24, help="layers of the deep block (released: 24)")
    parser.add_argument("--workdir", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    # StarFlowConfig's defaults are the released layout; only the deep block's depth varies here.
    config = StarFlowConfig(layers_per_block=[2, 2, 2, 2, 2, args.deep_layers])
    results = Results()
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        folder = Path(folder)
        checkpoint, converted, back = folder / "starflow.pth", folder / "starflow-hf", folder / "again.pth"
        size = random_checkpoint(config, checkpoint) / 2**30
        results["layout"] = f"widths 3072, blocks [2, 2, 2, 2, 2, {args.deep_layers}]"
        results["elements"] = sum(torch.Size(shape).numel() for shape in expected_apple_shapes(config).values())
        results["checkpoint_gib"] = size
        runs = {
            "convert": ["convert", str(checkpoint), str(converted), "--transformer-only"],
            "reverse": ["convert", "--reverse", str(converted), str(back)],
        }
        for name, arguments in runs.items():
            seconds, peak_mib = run_module_measuring_peak("tarflow_hf", arguments)
            results[f"{name}_seconds"] = seconds
            results[f"{name}_peak_gib"] = peak_mib / 1024
            results[f"{name}_peak_vs_file"] = peak_mib / 1024 / size
    return report(results, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
