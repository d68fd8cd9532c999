"""The run's metrics: `metrics.jsonl` (one JSON line per logged step), the progress bar, and accelerate's trackers
(metrics and sample grids)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..fileio import write_text_atomic
from .layout import METRICS_FILE
from .state import MetricWindow

if TYPE_CHECKING:
    from PIL.Image import Image

    from .state import Run

# The package each accelerate tracker needs (pip name).
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}


def resolve_trackers(report_to: str | None) -> list[str]:
    """The accelerate trackers `--report-to` names, each of them installed; else a ValueError naming the package to
    install (accelerate itself would silently drop a tracker whose package is missing)."""
    if report_to is None or report_to.strip().lower() in ("", "none"):
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = sorted(str(tracker) for tracker in get_available_trackers())
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    if "all" in names:
        if not available:
            raise ValueError("--report-to all: no tracker package is installed (pip install tensorboard, or wandb)")
        return available
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report-to {name}: unknown tracker; choose from {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            package = TRACKER_PACKAGES.get(name, name)
            raise ValueError(f"--report-to {name} needs the {package} package: pip install {package}")
    return list(dict.fromkeys(names))


def add_to_window(run: Run, loss: torch.Tensor, bits_per_dim: torch.Tensor, lr: float) -> None:
    window = run.window
    window.loss = window.loss + loss.detach()
    window.bits_per_dim = window.bits_per_dim + bits_per_dim.detach().mean()
    window.count += 1
    window.lr = lr


def log_metrics(run: Run) -> None:
    """The window's mean loss and bits/dim (over processes) to metrics.jsonl, the bar and the trackers."""
    window, accelerator = run.window, run.accelerator
    sums = (torch.as_tensor(window.loss), torch.as_tensor(window.bits_per_dim))
    stats = torch.stack([total / window.count for total in sums]).float()
    stats = accelerator.reduce(stats, reduction="mean")
    run.last_metrics = {
        "step": run.progress.step,
        "epoch": run.progress.epoch,
        "lr": window.lr,
        "loss": stats[0].item(),
        "bits_per_dim": stats[1].item(),
        "elapsed_s": round(time.time() - run.start_time, 1),
    }
    run.window = MetricWindow()
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{run.last_metrics['loss']:.4f}", bpd=f"{run.last_metrics['bits_per_dim']:.3f}")
    if run.is_main:
        with (run.output_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(run.last_metrics) + "\n")
    if run.trackers:
        accelerator.log({k: v for k, v in run.last_metrics.items() if k != "step"}, step=run.progress.step)


def _logged_step(line: str) -> int | None:
    """The step of a metrics line; None for a line that is not one (cut short when a run was killed mid-write)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def rewind_metrics(path: Path, step: int) -> list[str]:
    """Keep the lines of `metrics.jsonl` up to `step` (a run resumed there logs the later ones again), rewritten
    atomically; return the lines taken out (later steps, and lines cut short), each with its newline."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, dropped = [], []
    for line in lines:
        logged = _logged_step(line)
        (kept if logged is not None and logged <= step and line.endswith("\n") else dropped).append(line)
    if dropped:
        write_text_atomic(path, "".join(kept))
    return [line if line.endswith("\n") else line + "\n" for line in dropped]


def log_images(run: Run, grid: Image) -> None:
    """A sample grid to every tracker that takes images, at the current step."""
    import numpy as np

    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step=run.progress.step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": [grid]}, step=run.progress.step)


__all__ = ["add_to_window", "log_images", "log_metrics", "resolve_trackers", "rewind_metrics"]
