"""EMA weights, and the whole tensors of FSDP2 shards that saving them needs."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from ..lora import loaded_adapters

if TYPE_CHECKING:
    from .state import FlowModel


class EMA:
    """Exponential moving average of the parameters that train (buffers are copied; frozen parameters, a LoRA run's
    base weights, are left out), with the usual warm-up of the decay `min(decay, (1 + step) / (10 + step))` so early
    averages are not dominated by the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        self.shadow = {name: p.detach().clone().float() for name, p in model.state_dict().items() if name not in frozen}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in model.state_dict().items():
            if name not in self.shadow:
                continue
            if value.is_floating_point():
                self.shadow[name].lerp_(value.float(), 1 - decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; every process must call this), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` placed as `like`: sharded the same way under FSDP2 (DTensor), else on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor.to(like.device)


def ema_model(model: FlowModel, ema: EMA | None) -> FlowModel:
    """An unsharded copy of `model` holding the EMA weights (without EMA the model itself, or under FSDP2 its
    gathered copy). Every process calls it: gathering shards is collective."""
    if ema is None and not is_sharded(model):
        return model
    if loaded_adapters(model):
        return adapter_ema_model(model, ema)
    state = ema.shadow if ema is not None else model.state_dict()
    state = {name: full_tensor(value) for name, value in state.items()}
    with torch.device("meta"):  # no initialisation: every weight is loaded below
        copy = type(model)(type(model.config).from_dict(model.config.to_dict()))
    copy.to_empty(device=model.device)
    dtypes = {name: value.dtype for name, value in copy.state_dict().items()}
    copy.load_state_dict({name: value.to(dtypes[name]) for name, value in state.items()})
    copy.eval()
    return copy


def adapter_ema_model(model: FlowModel, ema: EMA) -> FlowModel:
    """A LoRA run's EMA model: a copy of `model` that shares its frozen weights (no second copy of a large base) and
    holds its own adapter, with the EMA weights."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    average = copy.deepcopy(model, memo=shared)
    state = {name: value.to(average.state_dict()[name].dtype) for name, value in ema.shadow.items()}
    unexpected = average.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the EMA weights do not fit the model: {unexpected[0]}")
    return average.eval()


__all__ = ["EMA", "adapter_ema_model", "ema_model", "full_tensor", "is_sharded", "shard_like"]
