"""Work split across processes: the accelerate state a process joins, for sampling, evaluation and training.

`accelerate launch` (or torchrun) starts the processes; on a machine without CUDA they must ask accelerate for CPU
mode to join one gloo group, otherwise each runs alone and does all the work.
"""

from __future__ import annotations

import os

import torch


def use_cpu(requested: bool) -> bool:
    """CPU mode for accelerate: when asked, or when launched as several processes on a machine without CUDA."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return requested or (launched and not torch.cuda.is_available())


def process_state():
    """This process's `accelerate.PartialState`: one process, or this one's place among the launched ones."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(False))


__all__ = ["process_state", "use_cpu"]
