"""Setting a run up: the flags checked and resolved, the accelerator, the model's training mode, the data loader,
the schedule's lengths, the optimizer, EMA and the noise generator."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from ..data import EpochShuffleSampler, dataset_summary
from ..processes import fsdp_on_cpu, use_cpu
from .adapter import add_training_adapter, check_lora_args, lora_requested
from .defaults import FINE_TUNE_LR, MODEL_SIZE_FLAGS, TRAIN_LR, WARMUP_PERCENT
from .ema import EMA

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .state import Run


def check_args(args: argparse.Namespace) -> None:
    """What argparse's types cannot check alone (they refuse nonsense numbers as they parse)."""
    if args.init_from and (args.config or any(getattr(args, f) is not None for f in MODEL_SIZE_FLAGS)):
        raise ValueError("--init-from keeps the pretrained architecture; drop --config and the model-size flags")
    if args.init_from and args.no_nvp:
        raise ValueError("--init-from keeps the pretrained architecture; drop --no-nvp")
    if args.replace_labels and not args.init_from:
        raise ValueError("--replace-labels only applies with --init-from")
    if args.stop_after_steps is not None and args.max_steps is not None and args.stop_after_steps > args.max_steps:
        raise ValueError(f"--stop-after-steps {args.stop_after_steps} is beyond --max-steps {args.max_steps}")
    check_lora_args(args)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with the learning rate resolved (new model or fine-tuning), checked against --min-lr."""
    resolved = argparse.Namespace(**vars(args))
    if resolved.lr is None:
        resolved.lr = FINE_TUNE_LR if args.init_from else TRAIN_LR
    if resolved.min_lr > resolved.lr:
        raise ValueError(f"--min-lr {resolved.min_lr} is above the learning rate {resolved.lr}")
    return resolved


def start_accelerator(args: argparse.Namespace, trackers: list[str]) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    accelerator = Accelerator(
        cpu=use_cpu(args.cpu),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(args.output_dir),
    )
    fsdp_on_cpu(accelerator)
    world = accelerator.num_processes * args.gradient_accumulation_steps
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {world}"
        )
    set_seed(args.seed)  # same initial weights on every process
    return accelerator


def init_model(run: Run) -> None:
    """The model to train, its data and the defaults it decides, as its family does it; with `--lora-rank`, the
    adapter that trains in it (after gradient checkpointing, which then needs no input gradients)."""
    run.family.load(run)
    if run.args.gradient_checkpointing:
        model = run.raw_model  # transformers' later v5 releases renamed the switch (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if lora_requested(run.args):
        add_training_adapter(run)
    run.raw_model.train()


def schedule_lengths(args: argparse.Namespace, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, warm-up steps): `--max-steps` or the epochs; `--warmup-steps`, else for fine-tuning 10% of the
    steps, for a new model one epoch as Apple's (at most 10%), at least one step."""
    total = args.max_steps or args.epochs * steps_per_epoch
    share = max(1, total * WARMUP_PERCENT // 100)
    if args.warmup_steps is not None:
        return total, args.warmup_steps
    return total, share if args.init_from else min(steps_per_epoch, share)


def prepare_training(run: Run) -> None:
    """Data loader, schedule lengths, optimizer, EMA and noise generator, prepared by accelerate."""
    args, accelerator = run.args, run.accelerator
    run.micro_batch = args.batch_size // (accelerator.num_processes * args.gradient_accumulation_steps)
    sampler = EpochShuffleSampler(len(run.dataset), seed=args.seed)
    loader = DataLoader(
        run.dataset, batch_size=run.micro_batch, sampler=sampler, drop_last=True, num_workers=args.num_workers
    )
    steps_per_epoch = len(loader) // accelerator.num_processes // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{dataset_summary(run.dataset)} is less than one batch of {args.batch_size}")
    run.total_steps, run.warmup_steps = schedule_lengths(args, steps_per_epoch)
    optimizer = torch.optim.AdamW(
        [parameter for parameter in run.raw_model.parameters() if parameter.requires_grad],  # a LoRA: the adapter
        lr=args.min_lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
    )
    run.model, run.optimizer, run.loader = accelerator.prepare(run.raw_model, optimizer, loader)
    run.raw_model = accelerator.unwrap_model(run.model)
    run.forward = torch.compile(run.model) if args.compile else run.model
    run.ema = EMA(run.raw_model, args.ema_decay) if args.ema_decay > 0 else None
    # Our own generator for noise and label dropout: its state is checkpointed, so resuming continues the
    # same random stream whatever the data loader or other code drew from the global generators.
    run.generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)


__all__ = [
    "check_args",
    "init_model",
    "prepare_training",
    "resolve_args",
    "schedule_lengths",
    "start_accelerator",
]
