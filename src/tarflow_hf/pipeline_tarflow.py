"""TarFlowPipeline: diffusers-style sampling from a TarFlowModel (skeleton; the pipeline issue fills it in)."""

from __future__ import annotations

from diffusers import DiffusionPipeline

from .modeling_tarflow import TarFlowModel


class TarFlowPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: TarFlowModel):
        super().__init__()
        self.register_modules(transformer=transformer)
