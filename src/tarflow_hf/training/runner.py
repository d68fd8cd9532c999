"""`train`: a run's steps in order (setup, resume, the loop, the end of the run) and what ends it: the final
outputs, or a checkpoint to resume from; an output that can no longer be written stops it with one line."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from .adapter import lora_requested
from .branches import start_branch
from .checkpoints import checkpoint_now, last_checkpoint_note, resume_training
from .ema import ema_model
from .families import family_for
from .layout import MODEL_DIR
from .loop import run_epochs
from .metrics import resolve_trackers
from .outputs import build_recipe, check_hub_target, push_to_hub, save_final_outputs, start_outputs
from .setup import check_args, init_model, prepare_training, resolve_args, start_accelerator
from .state import Run, TrainResult


def finish(run: Run) -> TrainResult:
    """Stopped early: a checkpoint to resume from. Done: the pipeline folder with its card, the summary and the
    final sample grid (see `outputs.save_final_outputs`)."""
    accelerator, progress = run.accelerator, run.progress
    wall = time.time() - run.start_time
    accelerator.wait_for_everyone()
    if progress.step < run.total_steps:
        checkpoint = checkpoint_now(run)
        accelerator.print(f"stopped at step {progress.step} of {run.total_steps}; resume with --resume {checkpoint}")
        return TrainResult(run.raw_model, ema_model(run.raw_model, run.ema), progress, None)
    final_model = ema_model(run.raw_model, run.ema)
    if run.is_main:
        summary = {**run.last_metrics, "train_wall_time_s": round(wall, 1), "ema": run.ema is not None}
        save_final_outputs(run, final_model, summary)
    if run.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(run.raw_model, final_model, progress, run.output_dir / MODEL_DIR)


@contextlib.contextmanager
def stopping_on_write_errors(run: Run) -> Iterator[None]:
    """An output that can no longer be written (a folder turned read-only, a full disk) or data that can no longer
    be read stops the run with one line: what failed, and the checkpoint to resume from."""
    try:
        yield
    except OSError as error:
        if run.bar is not None:
            run.bar.close()
        what = f"{error.strerror}: {error.filename}" if error.filename and error.strerror else str(error)
        what = what or type(error).__name__
        where = last_checkpoint_note(run.output_dir)
        raise OSError(f"{what}; training stopped at step {run.progress.step}, {where}") from error


def train(args: argparse.Namespace, command: str | None = None) -> TrainResult:
    """Train or fine-tune as `args` describes (the flags of `tarflow-hf train`, declared by
    `tarflow_hf.commands.arguments.train`). `command`: the command line that reproduces the run, for the model
    card (the command line passes it). Bad flags, data or output folders raise a ValueError or OSError."""
    check_args(args)
    family = family_for(args.init_from)
    family.check_args(args)
    resolved = resolve_args(args)
    if resolved.push_to_hub:
        check_hub_target(resolved.push_to_hub)
    trackers = resolve_trackers(args.report_to)
    accelerator = start_accelerator(resolved, trackers)
    run = Run(
        args=resolved,
        command=command,
        accelerator=accelerator,
        output_dir=Path(args.output_dir),
        trackers=trackers,
        family=family,
    )
    init_model(run)
    prepare_training(run)
    resume_training(run)
    run.recipe = build_recipe(run)
    start_branch(run)
    with stopping_on_write_errors(run):
        start_outputs(run)
        run_epochs(run)
        result = finish(run)
    if result.pipeline_dir is not None and resolved.push_to_hub and run.is_main:
        title = f"{family.title} LoRA" if lora_requested(resolved) else family.title
        url = push_to_hub(result.pipeline_dir, resolved.push_to_hub, resolved.hub_private, title)
        print(f"pushed to {url}")
    return result


__all__ = ["finish", "stopping_on_write_errors", "train"]
