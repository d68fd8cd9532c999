"""The training loop: epochs of micro-batches, each through the family's inputs, forward and backward, and after
each optimizer step what is due: the prior update (`--no-nvp`), EMA, metrics, checkpoint and, last, the sample
grid (so a checkpoint is never missing because a grid failed)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .checkpoints import checkpoint_now, diverged_advice
from .ema import ema_model
from .layout import step_grid_name
from .metrics import add_to_window, log_metrics
from .outputs import write_sample_grid
from .recipe import cosine_lr, update_prior_variance
from .state import NonFiniteLossError

if TYPE_CHECKING:
    from .state import Batch, Run


def check_finite_loss(run: Run, loss: torch.Tensor, lr: float) -> None:
    """Stop at a non-finite loss (every process agrees, so none is left waiting), keeping the checkpoints."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if run.accelerator.num_processes > 1:
        bad = run.accelerator.reduce(bad, reduction="sum")
    if bad.item():
        raise NonFiniteLossError(
            f"non-finite loss at step {run.progress.step + 1} (learning rate {lr:.3g}): {diverged_advice(run)}"
        )


def training_step(run: Run, batch: Batch) -> None:
    """One micro-batch: the family's inputs (noise, label or caption dropout), forward, backward, and the optimizer
    step when accumulation is done."""
    args, accelerator = run.args, run.accelerator
    lr = cosine_lr(run.progress.step, run.total_steps, run.warmup_steps, args.lr, args.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inputs, condition = run.family.encode_batch(run, batch)
    with accelerator.accumulate(run.model):
        output = run.forward(inputs, condition)
        check_finite_loss(run, output.loss, lr)
        if not getattr(run.raw_model.config, "nvp", True):
            run.prior_window.append(output.latents.detach().float().square().mean(dim=0))
        accelerator.backward(output.loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    add_to_window(run, output.loss, output.bits_per_dim, lr)


def update_prior(run: Run) -> None:
    """Volume-preserving models, after each optimizer step: Apple's prior update from E[z^2] over the step's
    batch (every micro-batch and process)."""
    if not run.prior_window:
        return
    mean_square = torch.stack(run.prior_window).mean(dim=0)
    run.prior_window.clear()
    if run.accelerator.num_processes > 1:
        mean_square = run.accelerator.reduce(mean_square, reduction="mean")
    update_prior_variance(run.raw_model, mean_square)


def after_optimizer_step(run: Run) -> None:
    """Prior, EMA, bar, then what is due at this step: metrics, checkpoint, and last the sample grid."""
    args, progress = run.args, run.progress
    progress.step += 1
    update_prior(run)
    if run.ema is not None:
        run.ema.update(run.raw_model)
    if run.bar is not None:
        run.bar.update(1)
    if progress.step % args.log_every == 0 or progress.step == run.total_steps:
        log_metrics(run)
    if args.checkpoint_every and progress.step % args.checkpoint_every == 0:
        checkpoint_now(run)
    if args.sample_every and progress.step % args.sample_every == 0:
        write_sample_grid(run, ema_model(run.raw_model, run.ema), step_grid_name(progress.step))


def run_epochs(run: Run) -> None:
    """Epochs until the last step or `--stop-after-steps`, continuing mid-epoch after a resume."""
    args, progress, accelerator = run.args, run.progress, run.accelerator
    run.start_time = time.time() - progress.elapsed_seconds
    while progress.step < run.total_steps and progress.step != args.stop_after_steps:
        run.loader.set_epoch(progress.epoch)
        epoch_loader = run.loader
        if progress.batches_in_epoch:
            epoch_loader = accelerator.skip_first_batches(run.loader, progress.batches_in_epoch)
        for batch in epoch_loader:
            progress.batches_in_epoch += 1
            training_step(run, batch)
            if not accelerator.sync_gradients:
                continue
            after_optimizer_step(run)
            if progress.step >= run.total_steps or progress.step == args.stop_after_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    if run.bar is not None:
        run.bar.close()


__all__ = ["after_optimizer_step", "check_finite_loss", "run_epochs", "training_step", "update_prior"]
