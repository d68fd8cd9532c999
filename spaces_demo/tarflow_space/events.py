"""How the page's buttons reach the model: every failure becomes a message that stays until the visitor closes it,
a request is checked before it queues for the model (so a refusal leaves every panel as it was), and model calls
are counted (tests and operators check that the queue's concurrency limit holds).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import gradio as gr
import torch

logger = logging.getLogger("tarflow_space")

# Every event that runs the model shares one concurrency limit (the queue's default, $TARFLOW_CONCURRENCY).
MODEL_EVENTS = {"concurrency_id": "model"}


def refusal(message: str) -> gr.Error:
    """A message shown until the visitor dismisses it (Gradio's default toast vanishes after 10 s)."""
    return gr.Error(message, duration=None, print_exception=False)


def as_refusal(fn: Callable[..., Any], error: Exception) -> gr.Error:
    """What the visitor reads about `error`: the mistake itself for a refused input, a summary otherwise (the
    details, which may hold server paths, go to the log)."""
    if isinstance(error, ValueError | FloatingPointError):
        return refusal(str(error))
    if isinstance(error, torch.OutOfMemoryError):
        return refusal("out of memory: ask for fewer images")
    logger.error("%s failed", getattr(fn, "__name__", "a handler"), exc_info=error)
    return refusal(f"internal error ({type(error).__name__}); the server log has the details")


class ActiveCalls:
    """Counts model calls running right now (and the most seen at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.total = 0

    def __enter__(self) -> ActiveCalls:
        with self._lock:
            self.current += 1
            self.total += 1
            self.peak = max(self.peak, self.current)
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self.current -= 1

    def reset(self) -> None:
        with self._lock:
            self.peak = self.current
            self.total = 0

    def counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` (a handler that runs the model) counted here, its failures turned into messages."""

        refusing = checked(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return refusing(*args, **kwargs)

        return wrapper


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A check run by the page before a model call: a mistake becomes a message, nothing else changes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise as_refusal(fn, error) from None

    return wrapper


def guarded(
    trigger: Callable[..., Any],
    check: Callable[..., Any],
    handler: Callable[..., Any],
    inputs: list[Any],
    outputs: list[Any],
    api_name: str,
    fields: dict[str, Any],
    check_fields: dict[str, Any] | None = None,
    check_outputs: list[Any] | None = None,
    progress_on: Any = None,
) -> Any:
    """`trigger(check)` then, only if it passed, `handler`. API clients call `handler` by `api_name`, with
    `fields` as its named parameters (it checks the same things itself); the page runs `check` first (given
    `check_fields`, by default the same fields), so that a refusal leaves every output as it was. `check` may
    fill `check_outputs`, hidden fields the handler reads (a sampler's spec composed from its option fields).
    The progress bar shows on `progress_on` alone."""
    first = trigger(
        checked(check),
        inputs,
        check_outputs or None,
        inputs_kwargs=check_fields if check_fields is not None else fields,
        concurrency_limit=None,
        api_visibility="undocumented",
        show_progress="hidden",
    )
    return first.success(
        handler,
        inputs,
        outputs,
        inputs_kwargs=fields,
        api_name=api_name,
        show_progress_on=progress_on,
        **MODEL_EVENTS,
    )
