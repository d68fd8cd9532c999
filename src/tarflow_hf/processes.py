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


def fsdp_on_cpu(accelerator) -> None:
    """Give launched CPU processes the FSDP an accelerate config asks for (`accelerate launch --config_file
    fsdp.yaml`). accelerate turns FSDP on for accelerators only: on CPU each process would silently keep a whole
    replica (DDP). torch's FSDP2 shards over gloo, so the processes get it, as they would on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not requested or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"fsdp_version {plugin.fsdp_version} on CPU processes: torch shards over gloo with FSDP2 only; set "
            "fsdp_version: 2 in the accelerate config"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # accelerate's states copy the process state's type back whenever one is created: set it there too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


__all__ = ["fsdp_on_cpu", "process_state", "use_cpu"]
