"""What a training run holds (`Run`), its position (`Progress`), what `train` returns (`TrainResult`), and the
interface of a model family's adapter (`Family`). Types only: torch and the models are imported for type checkers
alone."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline
    from PIL.Image import Image
    from torch.utils.data import DataLoader, Dataset
    from tqdm import tqdm

    from ..modeling_starflow import StarFlowModel, StarFlowOutput
    from ..modeling_tarflow import TarFlowModel, TarFlowOutput
    from .ema import EMA

    FlowModel = TarFlowModel | StarFlowModel
    FlowOutput = TarFlowOutput | StarFlowOutput
    # A data-loader batch: images and their labels (TarFlow) or captions (STARFlow).
    Batch = tuple[torch.Tensor, torch.Tensor | Sequence[str]]


class NonFiniteLossError(FloatingPointError, ValueError):
    """Training diverged (a non-finite loss or weights). A ValueError too, so the command line prints one line."""


@dataclass
class Progress:
    """Position in the run, saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # data-loader batches (micro-batches) of `epoch` already consumed
    elapsed_seconds: float = 0.0


@dataclass
class MetricWindow:
    """Sums over the micro-batches since the last metrics line (tensors, so that no step waits for the device)."""

    loss: torch.Tensor | float = 0.0
    bits_per_dim: torch.Tensor | float = 0.0
    count: int = 0
    lr: float = 0.0


@dataclass
class TrainResult:
    """What `train` returns: the trained model (this process's copy), the EMA model, where things went."""

    model: FlowModel
    ema_model: FlowModel
    progress: Progress
    pipeline_dir: Path | None


class Family(Protocol):
    """What differs between the model families while training (`tarflow_hf.training.families`)."""

    title: str

    def check_args(self, args: argparse.Namespace) -> None:
        """Refuse the flags that do not apply to the family."""

    def load(self, run: Run) -> None:
        """Set `run.dataset`, `run.raw_model` (and `run.base_license`), resolving the defaults the model decides."""

    def encode_batch(self, run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the model's noisy inputs, its condition) for one batch, with the recipe's noise and dropout."""

    def sample_grid(self, run: Run, model: FlowModel) -> Image:
        """A captioned grid of samples from `model`."""

    def build_pipeline(self, model: FlowModel) -> DiffusionPipeline:
        """The pipeline saved around the trained model."""


@dataclass
class Run:
    """Everything a training run holds: given by `train`, then filled by its setup steps (the fields that are not
    arguments of the constructor) and used by the loop."""

    args: argparse.Namespace  # with the defaults resolved (learning rate, warm-up, noise, ...)
    command: str | None  # the command line that reproduces the run, for the model card
    accelerator: Accelerator
    output_dir: Path
    trackers: list[str]
    family: Family
    progress: Progress = field(default_factory=Progress)
    base_license: str | None = None  # the license of the model fine-tuned from
    recipe: dict[str, Any] = field(default_factory=dict)  # recipe.json: the resolved flags (JSON values)
    bar: tqdm | None = None
    start_time: float = 0.0
    window: MetricWindow = field(default_factory=MetricWindow)
    prior_window: list[torch.Tensor] = field(default_factory=list)  # E[z^2] of each micro-batch (--no-nvp)
    last_metrics: dict[str, float] = field(default_factory=dict)
    # Set by the setup steps.
    dataset: Dataset = field(init=False)
    raw_model: FlowModel = field(init=False)  # the model itself (unwrapped)
    model: torch.nn.Module = field(init=False)  # as accelerate prepared it (possibly wrapped: DDP, FSDP)
    forward: Callable[[torch.Tensor, torch.Tensor | None], FlowOutput] = field(init=False)  # or its torch.compile
    optimizer: torch.optim.Optimizer = field(init=False)
    loader: DataLoader = field(init=False)
    ema: EMA | None = field(init=False)
    generator: torch.Generator = field(init=False)  # noise and dropout, checkpointed
    micro_batch: int = field(init=False)
    total_steps: int = field(init=False)
    warmup_steps: int = field(init=False)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sample_guidance(self) -> float:
        """The sample grids' guidance: `--sample-guidance-scale`, else the model's default."""
        if self.args.sample_guidance_scale is not None:
            return self.args.sample_guidance_scale
        return float(self.raw_model.config.default_guidance_scale)


__all__ = ["Family", "MetricWindow", "NonFiniteLossError", "Progress", "Run", "TrainResult"]
