"""EMA weights of `tarflow_hf.training.train`, recomputed by hand from the raw weights of every optimizer step.

The documented rule (`--ema-decay d`, `tarflow_hf.training.ema.EMA`): after update n (n = 1, 2, ...),
    shadow <- decay_n * shadow + (1 - decay_n) * weights,   decay_n = min(d, (1 + n) / (10 + n)),
starting from the initial weights. The raw weights after each optimizer step are recorded with torch's global
optimizer hooks, so the expected EMA comes from the training run itself, not from the EMA code. A constant
learning rate (--min-lr = --lr) keeps every step large, so the average visibly lags the last weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import parse_train_args, write_idx_split
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from tarflow_hf.training import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class WeightRecorder:
    """The parameters before the first optimizer step and after every step, by global optimizer hooks."""

    def __init__(self):
        self.initial: list[torch.Tensor] | None = None
        self.steps: list[list[torch.Tensor]] = []
        self.params: list[torch.Tensor] = []

    @staticmethod
    def _params(optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def pre(self, optimizer, args, kwargs):
        if self.initial is None:
            self.params = self._params(optimizer)
            self.initial = [p.detach().clone() for p in self.params]

    def post(self, optimizer, args, kwargs):
        self.steps.append([p.detach().clone() for p in self._params(optimizer)])

    def __enter__(self):
        self.handles = [register_optimizer_step_pre_hook(self.pre), register_optimizer_step_post_hook(self.post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("decay", [0.3, 0.9])
def test_ema_weights_are_the_average_of_the_recorded_steps(tmp_path, decay):
    write_idx_split(tmp_path / "idx", count=16)
    steps = 6
    args = parse_train_args(
        [
            "--dataset", "mnist", "--data-dir", str(tmp_path / "idx"), "--output-dir", str(tmp_path / "run"),
            "--patch-size", "4", "--hidden-size", "16", "--head-dim", "16", "--num-blocks", "2",
            "--layers-per-block", "1", "--batch-size", "4", "--max-steps", str(steps),
            "--lr", "2e-2", "--min-lr", "2e-2",
            "--ema-decay", str(decay), "--checkpoint-every", "0", "--no-progress", "--seed", "3", "--cpu",
        ]
    )  # fmt: skip
    with WeightRecorder() as recorder:
        result = train(args)
    assert len(recorder.steps) == steps

    expected = [w.double() for w in recorder.initial]
    for n, weights in enumerate(recorder.steps, start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w.double() for e, w in zip(expected, weights, strict=True)]

    names = {id(p): name for name, p in result.model.named_parameters()}
    ema = dict(result.ema_model.named_parameters())
    raw = dict(result.model.named_parameters())
    moved = 0.0
    for param, want, last in zip(recorder.params, expected, recorder.steps[-1], strict=True):
        name = names[id(param)]
        torch.testing.assert_close(
            ema[name].detach().double(), want, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
        torch.testing.assert_close(
            raw[name].detach(), last, atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )  # the recording is the run
        moved = max(moved, (ema[name].detach() - raw[name].detach()).abs().max().item())
    # The average lags the last weights by far more than the tolerance (a copy of the weights fails above).
    assert moved > 1e-3

    # The saved pipeline holds the EMA weights.
    from tarflow_hf import TarFlowPipeline

    saved = TarFlowPipeline.from_pretrained(str(result.pipeline_dir)).transformer
    for name, value in saved.named_parameters():
        torch.testing.assert_close(
            value.detach(), ema[name].detach(), atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
