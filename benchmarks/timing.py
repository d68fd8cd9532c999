"""How the benchmarks time and report: round-robin rounds whose compared pairs run back to back, medians of the
pairs' ratios, the samplers with weight packing off, and results printed as they come and written as JSON.

The machine these benchmarks run on is shared, and its speed drifts by up to 1.5x over minutes, so two
implementations timed minutes apart can differ by more than their real gap. A pair timed back to back, each first
in half of the rounds, sees the same machine; the median over rounds of its ratio is the figure to quote."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tarflow_hf import layers
from tarflow_hf.fileio import write_json_atomic

Sample = Callable[[], Any]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a timer see the end of the device's work: a CUDA sync, or nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


@dataclass
class Rounds:
    """What `round_robin` measured: per name, the seconds of each round by the wall clock (`wall`) and in this
    process's CPU time (`cpu`), and the result of the warm-up run (`results`). With one thread, CPU time leaves out
    the time the process waited for a core that another job held: on a shared machine it is the steadier
    figure, though the neighbours still slow it through the caches and memory they share."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    results: dict[str, Any]


def round_robin(samplers: dict[str, Sample], repeats: int, synchronize: Callable[[], None] = lambda: None) -> Rounds:
    """Each sampler once to warm up (its result kept), then `repeats` rounds that time every sampler once in turn,
    so that a slow spell of the machine falls on all of them alike; every other round runs in reverse order, so
    that neighbours in `samplers` (ours next to Apple's) are timed back to back, each first in half of the rounds
    (use an even `repeats`). Each round's times go to stderr as it ends, so that a long run shows its progress."""
    rounds = Rounds({name: [] for name in samplers}, {name: [] for name in samplers}, {})
    rounds.results.update((name, sample()) for name, sample in samplers.items())
    order = list(samplers.items())
    for round_index in range(repeats):
        for name, sample in order if round_index % 2 == 0 else reversed(order):
            synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            sample()
            synchronize()
            rounds.wall[name].append(time.perf_counter() - start)
            rounds.cpu[name].append(time.process_time() - start_cpu)
        shown_times = ", ".join(f"{name} {seconds[-1]:.2f} s" for name, seconds in rounds.wall.items())
        print(f"round {round_index + 1}/{repeats}: {shown_times}", file=sys.stderr, flush=True)
    return rounds


def best_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The shortest of `repeats` runs of `fn` by the wall clock (for rates: the machine at its least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def paired_speedup(times: dict[str, list[float]], fast: str, slow: str) -> float:
    """Median over rounds of slow / fast, each round's pair timed back to back."""
    return statistics.median(s / f for f, s in zip(times[fast], times[slow], strict=True))


def per_round_ratios(times: dict[str, list[float]], fast: str, slow: str) -> str:
    """Each round's slow / fast, for the JSON record of how much the rounds spread."""
    return ", ".join(f"{s / f:.2f}" for f, s in zip(times[fast], times[slow], strict=True))


def record_speedup(results: dict[str, Any], key: str, rounds: Rounds, fast: str, slow: str) -> None:
    """`key`: how many times faster `fast` ran than `slow`, the median of the rounds' paired wall-clock ratios;
    `key_cpu_time`: the same from CPU time; `key_per_round`: each round's wall-clock ratio."""
    results[key] = paired_speedup(rounds.wall, fast, slow)
    results[f"{key}_cpu_time"] = paired_speedup(rounds.cpu, fast, slow)
    results[f"{key}_per_round"] = per_round_ratios(rounds.wall, fast, slow)


@contextlib.contextmanager
def plain_linear_layers() -> Iterator[None]:
    """Our samplers with plain `addmm` instead of packed weights (`layers.PACKING_BUDGET_BYTES = 0`), to show
    what the packing contributes."""
    budget = layers.PACKING_BUDGET_BYTES
    layers.PACKING_BUDGET_BYTES = 0
    try:
        yield
    finally:
        layers.PACKING_BUDGET_BYTES = budget


def shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Results(dict):
    """Results printed as they come, so that a long run shows its progress."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{key}: {shown(value)}", flush=True)


def report(results: dict[str, Any], json_path: Path | None) -> dict[str, Any]:
    """Print every result as an aligned table, and write them to `json_path` if given (atomically: never a
    half-written results file)."""
    width = max(map(len, results), default=0)
    for key, value in results.items():
        print(f"{key:<{width}}  {shown(value)}")
    if json_path:
        write_json_atomic(json_path, results)
    return results
