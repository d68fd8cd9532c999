"""Apple's float32 STARFlow decoder and ours timed on the deep block's first tokens (`benchmarks.starflow_full_size`'s
`deep_tokens` stage): the same noise and text for both, each stopped once those tokens are decoded."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from tarflow_hf.configuration_starflow import StarFlowConfig
from tarflow_hf.modeling_starflow import StarFlowModel
from tarflow_hf.samplers import SequentialSampler

from .stage_memory import timed


class DeepTokensDone(Exception):
    """Raised by `FirstDeepTokens` with the deep block's first tokens (`args[0]`): nothing more is sampled."""


class FirstDeepTokens(SequentialSampler):
    """The sequential sampler on the deep block's first `tokens` tokens, then a stop. A token depends only on
    those before it, so these are exactly the first tokens of a whole sequential inverse. With `compile_mode`, its
    steps compiled (`SequentialSampler`'s option; `freeze_weights` on a CPU), once for every later call."""

    def __init__(self, tokens: int, compile_mode: str | None = None, freeze_weights: bool = False):
        super().__init__(compile_mode=compile_mode, freeze_weights=freeze_weights)
        self.tokens = tokens

    def invert(self, block: Any, z: torch.Tensor, condition: Any) -> tuple[torch.Tensor, Any]:
        x, _ = super().invert(block, z[:, : self.tokens + 1], condition)
        raise DeepTokensDone(x[:, 1:].clone())


@dataclass
class DeepInputs:
    """The same noise, text and guidance for Apple's decoder and ours: the prompt's text rows (the first 41 of 128
    filled, the rest padding zeros, as T5's masked output) and the empty prompt's (one row)."""

    noise: torch.Tensor
    text: torch.Tensor
    negative: torch.Tensor
    guidance_scale: float
    tokens: int

    @classmethod
    def build(cls, config: StarFlowConfig, noise: torch.Tensor, words: int, seed: int, tokens: int) -> DeepInputs:
        """Text rows for a prompt of `words` words (and the end token), drawn from `seed`."""
        generator = torch.Generator().manual_seed(seed)
        text = torch.zeros(1, config.max_text_length, config.text_hidden_size)
        filled = min(words + 1, config.max_text_length)
        text[:, :filled] = torch.randn(1, filled, config.text_hidden_size, generator=generator)
        negative = torch.zeros_like(text)
        negative[:, 0] = torch.randn(config.text_hidden_size, generator=generator)
        return cls(noise, text, negative, config.default_guidance_scale, tokens)

    def to(self, device: str) -> DeepInputs:
        moved = (self.noise.to(device), self.text.to(device), self.negative.to(device))
        return DeepInputs(*moved, self.guidance_scale, self.tokens)


def our_deep_tokens(
    model: StarFlowModel, inputs: DeepInputs, sampler: FirstDeepTokens | None = None
) -> tuple[torch.Tensor, float]:
    """(our first deep-block tokens, seconds per token: the text prefix's pass left out), by `sampler` (default:
    the eager one)."""
    prefix: list[float] = []
    start = time.perf_counter()
    with timed(model.blocks[-1], "new_cache", prefix):
        try:
            model.inverse(
                inputs.noise,
                inputs.text,
                inputs.negative,
                inputs.guidance_scale,
                sampler=sampler or FirstDeepTokens(inputs.tokens),
            )
        except DeepTokensDone as done:
            (tokens,) = done.args
    return tokens.float(), (time.perf_counter() - start - sum(prefix)) / tokens.shape[1]


def apple_deep_tokens(module: ModuleType, apple: torch.nn.Module, inputs: DeepInputs) -> tuple[torch.Tensor, float]:
    """Apple's `Model.reverse` (float32, Apple's cfg g = guidance_scale - 1) stopped after the deep block's first
    tokens: its own token loop (`tqdm.trange`) limited to them, the shallow blocks skipped. -> (tokens in raster
    order, seconds per token without the text prefix's pass)."""
    prefix: list[float] = []

    class FirstSteps:
        @staticmethod
        def trange(steps: int, **_: Any) -> range:
            return range(min(steps, inputs.tokens))

    saved_tqdm, module.tqdm = module.tqdm, FirstSteps
    object.__setattr__(apple, "reverse_shallow", lambda x, *args, **kwargs: x)
    start = time.perf_counter()
    try:
        with torch.no_grad(), timed(apple.blocks[-1], "reverse_step_condition", prefix):
            both = torch.cat([inputs.text, inputs.negative])
            x = apple.reverse(inputs.noise, both, guidance=inputs.guidance_scale - 1.0)
    finally:
        module.tqdm = saved_tqdm
        object.__delattr__(apple, "reverse_shallow")
    seconds = time.perf_counter() - start - sum(prefix)
    tokens = x.permute(0, 2, 3, 1).flatten(1, 2)[:, : inputs.tokens]  # patch 1: a token is a pixel's channels
    return tokens, seconds / tokens.shape[1]
