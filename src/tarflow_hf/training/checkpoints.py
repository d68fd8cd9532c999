"""Checkpoints: `OUTPUT/checkpoints/checkpoint-{step}/`, accelerate's state (model, optimizer, data position,
random states) plus ours (`progress.json`, the EMA weights, each process's noise generator). Written whole or not at
all (`fileio.atomic_folder`), rotated (`--keep-checkpoints`) and loaded for `--resume`, where a damaged latest
checkpoint falls back to the one before it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..fileio import atomic_folder, clean_stale_temporaries, discard
from .ema import EMA, full_tensor, shard_like
from .layout import CHECKPOINT_NAME, CHECKPOINTS, checkpoint_name
from .state import NonFiniteLossError, Progress

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .state import Run

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"  # what makes a folder a checkpoint


def is_checkpoint(path: Path) -> bool:
    """A checkpoint folder this program wrote (intact or not): a real folder holding progress.json."""
    return path.is_dir() and not path.is_symlink() and (path / PROGRESS_FILE).is_file()


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints of `output_dir`, oldest first; a folder of another name or without progress.json is not one
    (nothing here ever loads, rotates or moves it)."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(path), path) for path in folder.iterdir()]
    return [path for step, path in sorted(found) if step >= 0 and is_checkpoint(path)]


def resolve_resume(resume: str, output_dir: Path) -> list[Path]:
    """The checkpoints `--resume` may load, in order of preference: for 'latest' every checkpoint, newest first
    (a damaged one falls back to the next); else the folder given."""
    if resume == "latest":
        return list_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / PROGRESS_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {PROGRESS_FILE}); or use 'latest'")
    return [path]


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    progress: Progress,
    ema: EMA | None,
    generator: torch.Generator,
    keep: int,
) -> Path:
    """accelerator.save_state into a temporary folder, then one rename: a crash never leaves a half checkpoint
    under a real name. Our own state (position, EMA, noise generator) goes in safetensors/json. The main process
    owns the temporary folder (see `fileio.atomic_folder`) and tells the others its name; it removes what killed
    saves and deletions of any checkpoint left behind, and then the checkpoints beyond the newest `keep`."""
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save_file

    final = output_dir / CHECKPOINTS / checkpoint_name(progress.step)
    main = accelerator.is_main_process
    if main:
        clean_stale_temporaries(final.parent, CHECKPOINT_NAME)
    # A checkpoint of the same step (a rerun from an earlier one) is replaced.
    owner = atomic_folder(final, overwrite=True, may_replace=is_checkpoint) if main else contextlib.nullcontext()
    with owner as staging:
        staging = Path(broadcast_object_list([str(staging) if main else None])[0])
        accelerator.save_state(str(staging), safe_serialization=True)
        ema_state = {k: full_tensor(v).contiguous() for k, v in ema.shadow.items()} if ema is not None else None
        rank = accelerator.process_index
        save_file({"state": generator.get_state()}, str(staging / f"generator_{rank}.safetensors"))
        accelerator.wait_for_everyone()
        if main:
            if ema_state is not None:
                metadata = {"num_updates": str(ema.num_updates)}
                save_file(ema_state, str(staging / "ema.safetensors"), metadata=metadata)
            (staging / PROGRESS_FILE).write_text(json.dumps(dataclasses.asdict(progress), indent=2))
    if main:
        for old in list_checkpoints(output_dir)[:-keep]:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMA | None, generator: torch.Generator) -> Progress:
    """Load a checkpoint into the prepared objects; any damage (a truncated or missing file) raises."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    progress = Progress(**json.loads((path / PROGRESS_FILE).read_text()))
    generator_file = path / f"generator_{accelerator.process_index}.safetensors"
    if not generator_file.is_file():
        raise ValueError(f"{path} was written by a run with a different number of processes ({generator_file} missing)")
    if ema is not None and not (path / "ema.safetensors").is_file():
        raise ValueError(f"{path} has no EMA weights; resume with the same --ema-decay as the original run")
    accelerator.load_state(str(path))
    generator.set_state(load_file(str(generator_file))["state"])
    if ema is not None:
        ema_file = path / "ema.safetensors"
        ema.shadow = {k: shard_like(v.float(), ema.shadow[k]) for k, v in load_file(str(ema_file)).items()}
        with safe_open(str(ema_file), framework="pt") as handle:
            ema.num_updates = int(handle.metadata()["num_updates"])
    return progress


def resume_training(run: Run) -> None:
    """`--resume`: load the chosen checkpoint (for 'latest', the newest intact one: a damaged one is a warning and
    the next older is tried)."""
    args, accelerator = run.args, run.accelerator
    if not args.resume:
        return
    candidates = resolve_resume(args.resume, run.output_dir)
    errors = []
    for checkpoint in candidates:
        try:
            run.progress = load_checkpoint(accelerator, checkpoint, run.ema, run.generator)
        except Exception as error:
            if args.resume != "latest":
                raise ValueError(f"--resume {checkpoint}: cannot load this checkpoint ({error})") from error
            errors.append(f"{checkpoint.name}: {error}")
            if run.is_main:
                logger.warning("checkpoint %s is damaged (%s); trying the one before it", checkpoint, error)
            continue
        accelerator.print(f"resumed from {checkpoint} at step {run.progress.step}")
        return
    if candidates:
        raise ValueError(f"--resume latest: no checkpoint in {run.output_dir / CHECKPOINTS} loads ({errors[0]})")
    accelerator.print(f"--resume latest: no checkpoint in {run.output_dir / CHECKPOINTS}, starting fresh")


def checkpoint_now(run: Run) -> Path:
    """A checkpoint of the current step, unless the weights are no longer finite (then the last good one stays)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in run.raw_model.parameters())  # FSDP2: own shard
    if not all(torch.isfinite(p).all() for p in local):
        raise NonFiniteLossError(f"non-finite weights at step {run.progress.step}: {diverged_advice(run)}")
    run.progress.elapsed_seconds = time.time() - run.start_time
    args = run.args
    return save_checkpoint(run.accelerator, run.output_dir, run.progress, run.ema, run.generator, args.keep_checkpoints)


def last_checkpoint_note(output_dir: Path) -> str:
    """Where the run can go on from: its newest checkpoint, or that there is none."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return "no checkpoint was written"
    return f"the last good checkpoint is {checkpoints[-1]} (--resume it)"


def diverged_advice(run: Run) -> str:
    note = last_checkpoint_note(run.output_dir)
    return f"training stopped, {note}; lower --lr (now {run.args.lr:g}) or --max-grad-norm"


__all__ = [
    "checkpoint_now",
    "checkpoint_step",
    "diverged_advice",
    "is_checkpoint",
    "last_checkpoint_note",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume",
    "resume_training",
    "save_checkpoint",
]
