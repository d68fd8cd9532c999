"""The model's work under ZeroGPU: on a Hugging Face Space with ZeroGPU hardware a GPU is lent to a function only
while it runs, and only to functions decorated with `spaces.GPU`. When the `spaces` package is importable (on the
Hub) the Space's model work runs under it; elsewhere it runs as it is.

`spaces.GPU` runs the function in a forked worker process: its arguments and result are pickled (so the Space
passes it only plain data: model references, request dataclasses, images, a `gr.Progress`), and what it changes
stays in that process (so the Space keeps its bookkeeping, timings and call counts, outside it).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from .limits import env_int

logger = logging.getLogger("tarflow_space")

Task = TypeVar("Task", bound=Callable[..., Any])
# Seconds a ZeroGPU task may hold the GPU (`spaces.GPU(duration=...)`; ZeroGPU's own default is 60).
DEFAULT_GPU_SECONDS = 60


def gpu_decorator() -> Callable[[Task], Task]:
    """`spaces.GPU(duration=$TARFLOW_GPU_SECONDS)` when the `spaces` package is importable, else no decorator."""
    try:
        spaces = importlib.import_module("spaces")
    except ImportError:
        return lambda task: task
    seconds = env_int("TARFLOW_GPU_SECONDS", DEFAULT_GPU_SECONDS)
    logger.info("model work runs under spaces.GPU (duration %d s)", seconds)
    return spaces.GPU(duration=seconds)
